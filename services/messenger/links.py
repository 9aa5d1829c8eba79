"""Signed one-click unsubscribe links, per customer and channel, and the short survey links.
Pure (the secret is passed in).

The token is ``<payload>.<signature>``: the payload names the channel (one letter) and the
customer (its id as text, or, for an id that is a UUID in its usual form, its 16 bytes under
the channel's upper-case letter: 35 characters instead of 62), the signature (HMAC-SHA256
truncated to 64 bits, compared in constant time) proves Retain issued it. Short on purpose: a
Hebrew or Arabic SMS has 134 characters in two segments, and the link must fit beside the text.
64 bits are plenty for a link whose only power is to unsubscribe, and which a guesser would have
to try against the server one request at a time.
It never expires: an unsubscribe link in an old message must still work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_CODES = {"email": "e", "sms": "s", "whatsapp": "w"}
_CHANNELS = {v: k for k, v in _CODES.items()}


def _uuid_bytes(customer_id: str) -> bytes | None:
    """The id's 16 bytes when it is a UUID written as ``str(uuid)`` writes one (lower case, with
    hyphens), so that the bytes give the same text back; else None."""
    try:
        parsed = uuid.UUID(customer_id)
    except ValueError:
        return None
    return parsed.bytes if str(parsed) == customer_id else None


def sign_unsubscribe(secret: str, customer_id: str, channel: str) -> str:
    code = _CODES[channel]
    packed = _uuid_bytes(customer_id)
    payload = code.upper().encode() + packed if packed is not None else f"{code}{customer_id}".encode()
    signature = hmac.new(secret.encode(), b"unsubscribe|" + payload, hashlib.sha256).digest()[:8]
    return f"{_b64(payload)}.{_b64(signature)}"


def verify_unsubscribe(secret: str, token: str) -> tuple[str, str] | None:
    """(customer_id, channel) when the token is genuine, else None."""
    try:
        payload_text, signature_text = token.split(".", 1)
        payload = _unb64(payload_text)
        signature = _unb64(signature_text)
    except (ValueError, UnicodeDecodeError):
        return None
    expected = hmac.new(secret.encode(), b"unsubscribe|" + payload, hashlib.sha256).digest()[:8]
    if not hmac.compare_digest(signature, expected):
        return None
    code, rest = payload[:1].decode(errors="replace"), payload[1:]
    if code.isupper():
        channel = _CHANNELS.get(code.lower())
        customer_id = str(uuid.UUID(bytes=rest)) if len(rest) == 16 else ""
    else:
        channel, customer_id = _CHANNELS.get(code), rest.decode(errors="replace")
    if channel is None or not customer_id:
        return None
    return customer_id, channel


def unsubscribe_url(base_url: str, secret: str, customer_id: str, channel: str) -> str:
    return f"{base_url.rstrip('/')}/u/{sign_unsubscribe(secret, customer_id, channel)}"


def survey_token(message_id: str) -> str:
    """A message's id as its survey link carries it: a UUID in 22 characters (base64url of its
    16 bytes) instead of 36, which a Hebrew or Arabic SMS has no room for beside the text."""
    try:
        return _b64(uuid.UUID(message_id).bytes)
    except ValueError:
        return message_id  # not a UUID: as it is


def message_id_of(token: str) -> str:
    """The message id of a survey link: its short form, or the id itself (links sent before)."""
    if len(token) == 22:
        try:
            return str(uuid.UUID(bytes=_unb64(token)))
        except ValueError:
            pass
    return token
