"""The sandbox outbox: every message becomes a file a person can open, nothing leaves the host.

Channels without provider credentials use it (``make run`` does, and says so). Email is an
.eml file (the same MIME bytes SMTP would send; open it in any mail client); SMS and WhatsApp
are JSON with the body, sender, recipient, SMS segment count and WhatsApp template fields.

Files are named ``<created_at as UTC>_<channel>_<message_id>.<eml|json>`` and written
atomically (temporary file in the same directory, fsync, rename), so a reader never sees half a
message. Sending is idempotent: the name depends only on the ledger row, and a message whose
file already exists is not written again, so a resend after a crash changes nothing and
``lookup`` settles the row from the file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.messenger.providers.base import OutgoingMessage, ProviderResult
from services.messenger.providers.mime import email_bytes
from shared.events import Channel

# GSM 03.38 default alphabet (one septet each) and its extension table (escape + one septet).
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = frozenset("\f^{}\\[~]|€")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def sms_encoding(text: str) -> str:
    return "GSM-7" if all(c in _GSM7_BASIC or c in _GSM7_EXTENDED for c in text) else "UCS-2"


def sms_segments(text: str) -> int:
    """How many SMS parts ``text`` takes: 160/153 GSM-7 septets or 70/67 UCS-2 code units."""
    if sms_encoding(text) == "GSM-7":
        units = sum(2 if c in _GSM7_EXTENDED else 1 for c in text)
        single, part = 160, 153
    else:
        units = len(text.encode("utf-16-le")) // 2  # characters beyond the BMP take two
        single, part = 70, 67
    if units <= single:
        return 1
    return -(-units // part)


def safe_name(message_id: str) -> str:
    """A file-name-safe form of the id (deterministic, so ``lookup`` finds the same name)."""
    return _UNSAFE_NAME.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), message_id)


class OutboxProvider:
    """Writes messages under ``directory`` (``var/outbox/`` by default)."""

    paced = False
    can_look_up = True  # the file is there, named by the message id

    def __init__(self, directory: str | os.PathLike[str], *, name: str = "outbox") -> None:
        self.directory = Path(directory)
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def path_for(self, msg: OutgoingMessage) -> Path:
        stamp = msg.created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        ext = "eml" if msg.channel is Channel.EMAIL else "json"
        return self.directory / f"{stamp}_{msg.channel.value}_{safe_name(msg.message_id)}.{ext}"

    async def send(self, msg: OutgoingMessage) -> ProviderResult:
        path = await asyncio.to_thread(self._write, msg)
        return self._result(path, "written")

    async def lookup(self, msg: OutgoingMessage) -> ProviderResult | None:
        path = await asyncio.to_thread(self._find, msg)
        return None if path is None else self._result(path, "found")

    async def close(self) -> None:
        return None

    def _result(self, path: Path, raw: str) -> ProviderResult:
        return ProviderResult(
            provider=self.name, provider_message_id=path.name, status="sent", raw_status=raw
        )

    def _find(self, msg: OutgoingMessage) -> Path | None:
        path = self.path_for(msg)
        if path.exists():
            return path
        if not self.directory.is_dir():
            return None
        # The ledger row's created_at may have been stored with less precision: match the id.
        suffix = f"_{safe_name(msg.message_id)}"
        for path in self.directory.iterdir():
            if path.name.startswith(".") or path.suffix not in {".eml", ".json"}:
                continue
            if path.stem.endswith(suffix):
                return path
        return None

    def _write(self, msg: OutgoingMessage) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(msg)
        if path.exists():
            return path
        data = email_bytes(msg) if msg.channel is Channel.EMAIL else _sms_json(msg)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _sms_json(msg: OutgoingMessage) -> bytes:
    doc: dict[str, Any] = {
        "message_id": msg.message_id,
        "channel": msg.channel.value,
        "to": msg.to,
        "from": msg.from_,
        "locale": msg.locale,
        "created_at": msg.created_at.isoformat(),
        "written_at": datetime.now(UTC).isoformat(),
    }
    doc["body"] = msg.text  # for a WhatsApp template: the rendered preview
    if msg.channel is Channel.SMS:
        doc["segments"] = sms_segments(msg.text)
        doc["encoding"] = sms_encoding(msg.text)
    if msg.content_sid is not None:
        doc["content_sid"] = msg.content_sid
        doc["content_variables"] = dict(msg.content_variables or {})
    return json.dumps(doc, ensure_ascii=False, indent=2).encode() + b"\n"
