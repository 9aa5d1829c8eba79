"""Running a consumer process: signals → a clean stop (finish the batch, commit, leave)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from shared.kafka.consumer import ConsumerLoop
from shared.logs import get_logger

log = get_logger(__name__)


async def run_until_signalled(loop: ConsumerLoop[Any]) -> None:
    running = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        running.add_signal_handler(sig, loop.stop)
    await loop.run()
