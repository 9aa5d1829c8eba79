"""The end-to-end baseline's echo: consume one topic and produce every record to another.

``python -m tests.bench.echo <bootstrap> <from-topic> <to-topic>``. It is the least a
consume → produce hop through the broker can do: aiokafka's consumer with its defaults
(which return a fetch as soon as a record is there) committing after each batch, the
textbook at-least-once hop, and the shared producer (acks=all, idempotent, lz4) and the
services' collector settings, no decoding and no database. (The services' loops commit once
a second while busy, ``consumer_commit_interval_ms``: their ledgers make a replay harmless,
which the echo has no way to know.) SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from aiokafka import AIOKafkaConsumer

from shared.collector import settle_collector
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await consumer.start()
    await producer.start()
    # As the services' consumer processes do: with the default thresholds the collector
    # walked this process in full during the runs, 20-70 ms at a time.
    settle_collector()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            records = [
                OutboundRecord(target, r.key or b"", r.value or b"") for rs in batch.values() for r in rs
            ]
            if records:
                await producer.send_all(records)
                await consumer.commit()
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
