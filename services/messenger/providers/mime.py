"""The one MIME builder: the sandbox outbox's .eml files and SMTP send the same bytes.

The message is 7-bit clean on the wire (non-ASCII headers as RFC 2047 encoded words, non-ASCII
bodies as quoted-printable or base64, whichever the stdlib finds shorter), so it passes any
SMTP server with or without 8BITMIME/SMTPUTF8. Bodies are UTF-8; HTML passes through untouched,
so right-to-left markup (``dir="rtl"``, Hebrew, Arabic) arrives exactly as rendered.

Message-ID and Date come from the ledger row (``message_id``, ``created_at``), not from the
clock: a resend after a crash produces the same message, which lets receivers and our
reconciliation recognise it (see ``smtp``).
"""

from __future__ import annotations

import email.policy
import hashlib
import re
from email.message import EmailMessage
from email.utils import format_datetime

from services.messenger.providers.base import OutgoingMessage

MESSAGE_ID_DOMAIN = "retain"
# Line endings are CRLF as on the wire; .eml readers and email.parser accept them.
POLICY = email.policy.SMTP.clone(cte_type="7bit")

# Headers the builder owns; a caller's copy in ``OutgoingMessage.headers`` is ignored.
_OWN_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Language",
    )
)
# RFC 5322 atext without "=", which escapes everything else (so the mapping stays one-to-one).
_NOT_ATEXT = re.compile(r"[^A-Za-z0-9!#$%&'*+/?^_`{|}~.-]")


def message_id_header(message_id: str) -> str:
    """``<{message_id}@retain>``, deterministic; characters a msg-id cannot hold become =XX."""
    left = _NOT_ATEXT.sub(lambda m: "".join(f"={b:02X}" for b in m.group().encode()), message_id)
    left = ".".join(part or "=" for part in left.split("."))  # no empty dot-atom parts
    return f"<{left}@{MESSAGE_ID_DOMAIN}>"


def subject_of(msg: OutgoingMessage) -> str:
    """The subject, or the text's first non-empty line when a template gave none."""
    if msg.subject:
        return msg.subject
    first = next((line.strip() for line in msg.text.splitlines() if line.strip()), "")
    return first[:78] or "(no subject)"


def wants_one_click(list_unsubscribe: str) -> bool:
    """RFC 8058 one-click needs an http(s) URI in List-Unsubscribe (mailto alone can't POST)."""
    return bool(re.search(r"<https?://", list_unsubscribe, re.IGNORECASE))


def unsubscribe_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus List-Unsubscribe-Post when List-Unsubscribe allows one-click."""
    lowered = {k.lower(): v for k, v in headers.items()}
    out = dict(headers)
    lu = lowered.get("list-unsubscribe")
    if lu is not None and "list-unsubscribe-post" not in lowered and wants_one_click(lu):
        out["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return out


def build_email(msg: OutgoingMessage) -> EmailMessage:
    em = EmailMessage(policy=POLICY)
    em["From"] = msg.from_
    em["To"] = msg.to
    em["Subject"] = subject_of(msg)
    em["Date"] = format_datetime(msg.created_at)
    em["Message-ID"] = message_id_header(msg.message_id)
    for name, value in unsubscribe_headers(dict(msg.headers)).items():
        if name.lower() not in _OWN_HEADERS:
            em[name] = value
    em.set_content(msg.text, subtype="plain", charset="utf-8")
    if msg.html is not None:
        em.add_alternative(msg.html, subtype="html", charset="utf-8")
        # A boundary derived from the id keeps a resend byte-identical. "=_" cannot occur in
        # quoted-printable or base64 bodies, so it cannot collide with the content.
        em.set_boundary(f"=_retain_{hashlib.sha256(msg.message_id.encode()).hexdigest()[:32]}")
    # After set_content, which clears every Content-* header it finds.
    em["Content-Language"] = msg.locale
    return em


def email_bytes(msg: OutgoingMessage) -> bytes:
    return build_email(msg).as_bytes(policy=POLICY)
