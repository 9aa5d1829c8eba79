"""The end-to-end bench's sender, in a process of its own: an open loop at a fixed rate.

``python -m tests.bench.pacer`` reads a JSON spec on stdin and writes to the spec's output file
when each key was acknowledged (ingest's 202, or the broker's ack for the echo), on
``time.monotonic()``: the system-wide monotonic clock, the one the bench's topic readers stamp
arrivals with in another process. Sending here keeps the readers' event loop free of the sends'
work, so neither timestamp carries the other's lag (the reason a decision could once be read
"before" its 202).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

from shared.collector import settle_collector
from shared.events import EXAMPLES
from shared.kafka.producer import OutboundRecord, Producer
from tests.bench.loadgen import read_response


def profile_event(customer: str) -> dict[str, Any]:
    """A new customer's one profile event (the end-to-end bench's unit), its id the customer's."""
    return {**EXAMPLES["profile"], "event_id": customer, "customer_id": customer}


async def pace(spec: dict[str, Any]) -> dict[str, Any]:
    keys: list[str] = spec["keys"]
    rate = float(spec["rate"])
    acked: dict[str, float] = {}
    errors: list[str] = []
    send, close = await _sender(spec)

    async def one(key: str) -> None:
        try:
            await send(key)
        except Exception as exc:  # noqa: BLE001 - counted and shown by the bench
            errors.append(repr(exc)[:300])
            return
        acked[key] = time.monotonic()

    # The sends in flight only: finished tasks kept to the end made a heap that the collector
    # walked in full every few seconds, 40-77 ms at a time, while the sends waited.
    tasks: set[asyncio.Task[None]] = set()
    settle_collector()
    try:
        start = time.monotonic()
        for i, key in enumerate(keys):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(key))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        await close()
    return {"acked": acked, "errors": len(errors), "first_errors": errors[:3]}


async def _sender(spec: dict[str, Any]) -> tuple[Any, Any]:
    if spec["mode"] == "http":
        pool = _HttpPool(spec)
        return pool.post, pool.close

    producer = Producer(spec["bootstrap"], client_id="bench-echo-source")
    await producer.start()
    topic = spec["topic"]

    async def produce(key: str) -> None:
        await producer.send_all([OutboundRecord(topic, key.encode(), key.encode())])

    return produce, producer.stop


class _HttpPool:
    """Keep-alive HTTP/1.1 connections on raw asyncio streams, one request at a time each, a
    new one whenever every open one is busy (an open loop never waits for a connection). An
    HTTP client library costs about a millisecond of CPU a request; at several hundred requests
    a second that would be this process's lag, and so the acknowledgements' stamps'."""

    def __init__(self, spec: dict[str, Any]) -> None:
        url = httpx.URL(spec["url"])
        self.host, self.port = url.host, url.port or 80
        self.head = (
            f"POST /v1/events HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {spec['api_key']}\r\n"
        ).encode()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened: list[asyncio.StreamWriter] = []

    async def post(self, customer: str) -> None:
        body = orjson.dumps(profile_event(customer))
        request = b"%sContent-Length: %d\r\n\r\n%s" % (self.head, len(body), body)
        while self.idle:
            reader, writer = self.idle.pop()
            writer.write(request)
            try:
                status, closing = await read_response(reader)
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                # The server closed it while idle (uvicorn's keep-alive timeout): the request
                # was not read, so sending it again on another connection is safe.
                writer.close()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened.append(writer)
            writer.write(request)
            status, closing = await read_response(reader)
        if closing:
            writer.close()
        else:
            self.idle.append((reader, writer))
        if status != 202:
            raise RuntimeError(f"ingest answered {status}")

    async def close(self) -> None:
        for writer in self.opened:
            writer.close()


def main() -> int:
    spec = orjson.loads(sys.stdin.buffer.read())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(pace(spec))
    # A file, not stdout: the event loop may leave the pipe non-blocking, and a result bigger
    # than the pipe's buffer would be cut short.
    Path(spec["output"]).write_bytes(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
