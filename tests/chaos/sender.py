"""The messenger's sender with a provider call log: ``python -m tests.chaos.sender``.

Every provider call that returned successfully appends one JSON line (message id, channel,
when the call began, pid) to ``RETAIN_CHAOS_CALL_LOG``. The line is written after the call, so
a SIGKILL between the call and the line loses the line, never invents one: a message id that
appears twice in the log was handed to a provider twice.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from services.messenger import sender
from services.messenger.providers.base import OutgoingMessage, Provider, ProviderResult
from services.messenger.providers.registry import ProviderSettings, build_providers
from shared.events import Channel
from tests.support.providers import Wrapping

CALL_LOG_ENV = "RETAIN_CHAOS_CALL_LOG"


class CallLogged(Wrapping):
    """A provider that writes down each successful ``send`` of the provider it wraps."""

    def __init__(self, inner: Provider, log_path: Path) -> None:
        super().__init__(inner)
        self._log_path = log_path

    async def send(self, msg: OutgoingMessage) -> ProviderResult:
        began = datetime.now(UTC)
        result = await self._inner.send(msg)
        line = {
            "message_id": msg.message_id,
            "channel": msg.channel.value,
            "called_at": began.isoformat(),
            "pid": os.getpid(),
        }
        # One write() of one line with O_APPEND: whole lines, even from several processes.
        fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
        return result


def main() -> None:
    log_path = Path(os.environ[CALL_LOG_ENV])
    real = build_providers

    def logged(settings: ProviderSettings) -> dict[Channel, Provider]:
        wrapped: dict[int, CallLogged] = {}
        out: dict[Channel, Provider] = {}
        for channel, provider in real(settings).items():
            # One wrapper per provider object: channels that share a provider share its wrapper.
            out[channel] = wrapped.setdefault(id(provider), CallLogged(provider, log_path))
        return out

    # The real sender's main(), with its providers wrapped (it imported build_providers by name).
    setattr(sender, "build_providers", logged)  # noqa: B010 - mypy sees no re-export to assign
    asyncio.run(sender.main())


if __name__ == "__main__":
    main()
