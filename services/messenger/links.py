"""Signed one-click unsubscribe links, per customer and channel. Pure (the secret is passed in).

The token is ``<payload>.<signature>``: the payload names the customer and the channel, the
signature (HMAC-SHA256, compared in constant time) proves Retain issued it. It never expires:
an unsubscribe link in an old email must still work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_unsubscribe(secret: str, customer_id: str, channel: str) -> str:
    payload = f"{channel}:{customer_id}".encode()
    signature = hmac.new(secret.encode(), b"unsubscribe|" + payload, hashlib.sha256).digest()[:16]
    return f"{_b64(payload)}.{_b64(signature)}"


def verify_unsubscribe(secret: str, token: str) -> tuple[str, str] | None:
    """(customer_id, channel) when the token is genuine, else None."""
    try:
        payload_text, signature_text = token.split(".", 1)
        payload = _unb64(payload_text)
        signature = _unb64(signature_text)
    except (ValueError, UnicodeDecodeError):
        return None
    expected = hmac.new(secret.encode(), b"unsubscribe|" + payload, hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(signature, expected):
        return None
    channel, _, customer_id = payload.decode(errors="replace").partition(":")
    if channel not in ("email", "sms", "whatsapp") or not customer_id:
        return None
    return customer_id, channel


def unsubscribe_url(base_url: str, secret: str, customer_id: str, channel: str) -> str:
    return f"{base_url.rstrip('/')}/u/{sign_unsubscribe(secret, customer_id, channel)}"
