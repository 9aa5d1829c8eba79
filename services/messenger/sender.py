"""The messenger's sender: due messages → providers, and reconciliation of messages a crash
left between the provider call and the commit. Run: ``python -m services.messenger.sender``.

It is its own process so that a slow provider never holds up the consumer's decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from services.messenger.config import MessengerSettings
from services.messenger.consumer import MIGRATIONS
from services.messenger.providers.registry import build_limiter, build_providers, close_providers, describe
from services.messenger.service import REFRESHED_GAUGES, MessengerService
from shared.kafka.consumer import is_transient
from shared.logs import get_logger
from shared.metrics import forget_loop, heartbeat
from shared.service_main import worker

log = get_logger(__name__)
LOOP = "retain-messenger-sender"  # its heartbeat's label (shared.metrics.heartbeat)


async def run(service: MessengerService, interval_s: float, stop: asyncio.Event) -> None:
    heartbeat(LOOP)  # from here on, a pass that hangs is a stall
    started = False
    while not stop.is_set():
        try:
            if not started:
                # First, and retried as a pass is: a database restarting as the sender starts
                # (57P03) must not end the process.
                await service.ensure_defaults()
                await service.reconcile()  # whatever a crash left half-sent
                started = True
            outcomes = await service.send_due()
            await service.reconcile()
            await service.refresh_gauges()
            heartbeat(LOOP)
        except Exception as exc:
            if not is_transient(exc):
                raise
            # The database or broker is away (a restart): try again at the next pass.
            log.warning("sender pass failed; retrying", error=type(exc).__name__)
            outcomes = []
        if outcomes:
            log.info("sent", messages=len(outcomes), statuses=sorted({o.status for o in outcomes}))
        if not outcomes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


async def main(settings: MessengerSettings | None = None) -> None:
    settings = settings or MessengerSettings()
    client_id = LOOP
    async with worker(
        settings, settings.database_url, MIGRATIONS, client_id, 8203, own_metrics=REFRESHED_GAUGES
    ) as (db, producer):
        providers = build_providers(settings)
        for channel, provider in providers.items():
            log.info("provider", channel=channel.value, provider=describe(provider))
        service = MessengerService(db, settings, producer, providers, limiter=build_limiter(settings))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run(service, settings.messenger_sender_interval_s, stop)
        finally:
            forget_loop(LOOP)
            await service.flush()
            await close_providers(providers)


if __name__ == "__main__":
    asyncio.run(main())
