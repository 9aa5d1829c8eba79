"""Real provider counterparts for the messenger's tests, started once per session.

- ``twilio_prism`` / ``sendgrid_prism``: Stoplight Prism validating every request against the
  providers' official OpenAPI specs (``../shared/specs``), see tests/support/prism.py;
- ``smtp_server``: a real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it receives.
  Recipients whose local part starts with ``unknown`` are refused with 550 5.1.1, ``busy``
  with 451 4.3.0, and ``flaky`` with 451 the first time an address is seen, then accepted.
"""

from __future__ import annotations

import email
import email.policy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.support.infra import free_port
from tests.support.prism import PrismServer, prism_mock, sendgrid_spec_with_v3, twilio_spec_for_mock


@pytest.fixture(scope="session")
def twilio_prism(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismServer]:
    spec = twilio_spec_for_mock(tmp_path_factory.mktemp("twilio-spec"))
    with prism_mock(spec, "twilio") as server:
        yield server


@pytest.fixture(scope="session")
def sendgrid_prism(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismServer]:
    spec = sendgrid_spec_with_v3(tmp_path_factory.mktemp("sendgrid-spec"))
    with prism_mock(spec, "sendgrid") as server:
        yield server


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    def parsed(self) -> EmailMessage:
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class CollectingHandler:
    received: list[ReceivedMail] = field(default_factory=list)
    _seen_flaky: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        local = address.split("@", 1)[0]
        if local.startswith("unknown"):
            return "550 5.1.1 mailbox unavailable"
        if local.startswith("busy"):
            return "451 4.3.0 try again later"
        if local.startswith("flaky"):
            with self._lock:
                first = address not in self._seen_flaky
                self._seen_flaky.add(address)
            if first:
                return "451 4.3.0 greylisted, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        data = envelope.original_content or envelope.content
        with self._lock:
            self.received.append(ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), bytes(data)))
        return "250 2.0.0 OK queued"

    def with_message_id(self, message_id_header: str) -> list[ReceivedMail]:
        with self._lock:
            mails = list(self.received)
        return [m for m in mails if m.parsed()["Message-ID"] == message_id_header]


@dataclass
class SmtpServer:
    host: str
    port: int
    handler: CollectingHandler


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    handler = CollectingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SmtpServer("127.0.0.1", port, handler)
    finally:
        controller.stop()
