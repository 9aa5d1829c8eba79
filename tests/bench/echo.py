"""The end-to-end baseline's echo: consume one topic and produce every record to another.

``python -m tests.bench.echo <bootstrap> <from-topic> <to-topic>``. It is the least a
consume → produce hop through the broker can do: aiokafka's consumer with its defaults
(which return a fetch as soon as a record is there) and the shared producer (acks=all,
idempotent, lz4) and the services' collector settings, no decoding and no database. Its
offsets are committed as the services' consumer loops commit theirs
(``shared.kafka.consumer.ConsumerLoop``): at most once per ``consumer_commit_interval_ms``
while busy, read from the same settings and environment as theirs, and at once when a fetch
comes back empty or the echo stops. A commit after every batch would add a round trip to the
group coordinator to each hop of the echo that the pipeline's hops do not wait for, and so
flatter the end-to-end ratio. SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time

from aiokafka import AIOKafkaConsumer

from shared.collector import settle_collector
from shared.config import CommonSettings
from shared.kafka.producer import OutboundRecord, Producer


async def echo(bootstrap: str, source: str, target: str) -> None:
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=f"echo-{source}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = Producer(bootstrap, client_id="bench-echo")
    # The setting the services' loops get from ``consumer_options()``, from the same environment.
    commit_interval_s = CommonSettings().consumer_commit_interval_ms / 1000
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await consumer.start()
    await producer.start()
    # As the services' consumer processes do: with the default thresholds the collector
    # walked this process in full during the runs, 20-70 ms at a time.
    settle_collector()
    pending = False  # records echoed since the last commit
    last_commit = float("-inf")

    async def commit() -> None:
        nonlocal pending, last_commit
        # Stamped before the round trip, as ConsumerLoop.commit_pending does.
        pending, last_commit = False, time.monotonic()
        await consumer.commit()  # the positions fetched, every record of which was echoed

    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            records = [
                OutboundRecord(target, r.key or b"", r.value or b"") for rs in batch.values() for r in rs
            ]
            if not records:
                if pending:
                    await commit()  # caught up: as the loops, commit what was echoed at once
                continue
            await producer.send_all(records)
            pending = True
            if time.monotonic() - last_commit >= commit_interval_s:
                await commit()
        if pending:
            with contextlib.suppress(Exception):  # as the loops: a commit at stop is not retried
                await commit()
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        await producer.stop()


def main() -> int:
    bootstrap, source, target = sys.argv[1:4]
    asyncio.run(echo(bootstrap, source, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
