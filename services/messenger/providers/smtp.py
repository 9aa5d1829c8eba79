"""Email over SMTP (aiosmtplib), with a small pool of open connections.

The bytes are those of ``mime.email_bytes``, the same the sandbox outbox writes.

Reconciliation: SMTP has no way to ask a server "did you take this message?", so ``lookup``
returns None and a message left ``pending`` by a crash is sent again. That resend is safe to
recognise because everything in it is derived from the ledger row: the Message-ID is
``<{message_id}@retain>`` and Date is the row's ``created_at``, so the second copy is
byte-identical to the first. Receiving systems that deduplicate on Message-ID (many do, and our
tests do) drop it; a reconciler that can read the relay's log can match the same header.

Errors: 4xx replies, timeouts and dropped connections are retryable; 5xx replies are permanent,
and a recipient refused as unknown (550, 551, 553, or an enhanced 5.1.x status) also suppresses
the address.
"""

from __future__ import annotations

import asyncio
import re
from email.utils import parseaddr

import aiosmtplib

from services.messenger.providers.base import OutgoingMessage, ProviderError, ProviderResult
from services.messenger.providers.mime import email_bytes, message_id_header
from shared.logs import get_logger

log = get_logger(__name__)

_DEAD_MAILBOX_CODES = frozenset({550, 551, 553})
_ENHANCED_BAD_ADDRESS = re.compile(r"\b5\.1\.\d\b")


class SmtpProvider:
    paced = False
    can_look_up = False

    def __init__(
        self,
        host: str,
        port: int = 587,
        *,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool = False,
        start_tls: bool | None = None,
        validate_certs: bool = True,
        timeout: float = 30.0,
        max_connections: int = 4,
    ) -> None:
        """``use_tls``: implicit TLS (port 465). ``start_tls``: True requires STARTTLS, False
        never uses it, None uses it when the server offers it."""
        self.host = host
        self.port = port
        self._username = username
        self._password = password
        self._use_tls = use_tls
        self._start_tls = False if use_tls else start_tls
        self._validate_certs = validate_certs
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[aiosmtplib.SMTP] = []

    @property
    def name(self) -> str:
        return "smtp"

    async def send(self, msg: OutgoingMessage) -> ProviderResult:
        data = email_bytes(msg)
        sender = parseaddr(msg.from_)[1]
        recipient = parseaddr(msg.to)[1]
        if not recipient:
            raise ProviderError("bad_address", f"no address in {msg.to!r}", permanent=True, provider="smtp")
        async with self._slots:
            conn = await self._connection()
            try:
                _, reply = await conn.sendmail(sender, [recipient], data)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                self._release(conn)
                first = exc.recipients[0]
                raise _reply_error(first.code, first.message, recipient_refused=True) from exc
            except aiosmtplib.SMTPResponseException as exc:
                self._release(conn)
                raise _reply_error(exc.code, exc.message, recipient_refused=False) from exc
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
                conn.close()
                # The server may have taken the message before the connection broke.
                raise ProviderError(
                    "timeout" if isinstance(exc, TimeoutError) else "network",
                    str(exc) or type(exc).__name__,
                    permanent=False,
                    maybe_delivered=True,
                    provider="smtp",
                ) from exc
            self._release(conn)
        return ProviderResult("smtp", message_id_header(msg.message_id), "sent", reply)

    async def lookup(self, msg: OutgoingMessage) -> ProviderResult | None:
        # SMTP cannot be asked; a resend is recognisable by its Message-ID (module docstring).
        return None

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await conn.quit()
            except (aiosmtplib.SMTPException, OSError):
                conn.close()

    def _release(self, conn: aiosmtplib.SMTP) -> None:
        if conn.is_connected:
            self._idle.append(conn)

    async def _connection(self) -> aiosmtplib.SMTP:
        while self._idle:
            conn = self._idle.pop()
            if conn.is_connected:
                return conn
        conn = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self._username,
            password=self._password,
            use_tls=self._use_tls,
            start_tls=self._start_tls,
            validate_certs=self._validate_certs,
            timeout=self._timeout,
        )
        try:
            await conn.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise ProviderError(str(exc.code), exc.message, permanent=True, provider="smtp") from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise _reply_error(exc.code, exc.message, recipient_refused=False) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Nothing was sent on a connection that never opened.
            raise ProviderError(
                "timeout" if isinstance(exc, TimeoutError) else "network",
                f"cannot connect to {self.host}:{self.port}: {exc}",
                permanent=False,
                provider="smtp",
            ) from exc
        return conn


def _reply_error(code: int, message: str, *, recipient_refused: bool) -> ProviderError:
    permanent = code >= 500
    dead = (
        recipient_refused
        and permanent
        and (code in _DEAD_MAILBOX_CODES or bool(_ENHANCED_BAD_ADDRESS.search(message)))
    )
    return ProviderError(
        str(code),
        message,
        permanent=permanent,
        suppress_address=dead,
        provider="smtp",
    )
