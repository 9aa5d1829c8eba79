"""Posts a demo stream to ingest the way a backend would: JSON arrays to ``POST /v1/events``.

Three pacings: as fast as ingest takes them, a steady ``rate`` of events per second, or a
time-compressed replay of the history (``speed`` = event seconds per wall second). A batch
that meets 503 or 429 is sent again unchanged after ``Retry-After``; that is safe because
every event keeps its ``event_id`` and ingest's consumers deduplicate by it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import orjson

from shared.demo.generator import generate
from shared.demo.live import live_round
from shared.demo.respondents import Respondents

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# Events whose replay times lie this close together (in wall seconds) go in one request.
_REPLAY_WINDOW = 0.5
_MAX_RETRY_DELAY = 60.0

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


class SendError(RuntimeError):
    """Ingest refused a batch, or kept failing until we gave up."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(f"{message}: {body}" if body else message)
        self.status = status
        self.body = body


@dataclass(frozen=True, slots=True)
class SendReport:
    events: int
    batches: int
    retries: int


@dataclass(frozen=True, slots=True)
class _Batch:
    due: float  # wall seconds after the start of sending
    events: Sequence[Mapping[str, object]]


def _fixed_batches(events: Sequence[Mapping[str, object]], size: int, rate: float | None) -> Iterator[_Batch]:
    for first in range(0, len(events), size):
        due = 0.0 if rate is None else first / rate
        yield _Batch(due, events[first : first + size])


def _replay_batches(
    events: Sequence[Mapping[str, object]], size: int, speed: float, start_clock: datetime | None
) -> Iterator[_Batch]:
    """Groups events by when they fall due in a replay compressed ``speed`` times."""
    if not events:
        return
    origin = start_clock or _occurred_at(events[0])
    pending: list[Mapping[str, object]] = []
    opened_at = last_due = 0.0
    for event in events:
        due = max(0.0, (_occurred_at(event) - origin).total_seconds() / speed)
        if pending and (len(pending) >= size or due - opened_at > _REPLAY_WINDOW):
            yield _Batch(last_due, pending)
            pending = []
        if not pending:
            opened_at = due
        pending.append(event)
        last_due = due
    yield _Batch(last_due, pending)


def _occurred_at(event: Mapping[str, object]) -> datetime:
    value = event.get("occurred_at")
    if not isinstance(value, str):
        raise ValueError(f"event {event.get('event_id')!r} has no occurred_at string")
    return datetime.fromisoformat(value)


def _retry_after(response: httpx.Response) -> float | None:
    header = response.headers.get("Retry-After")
    if header is None:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _backoff(attempt: int) -> float:
    return float(min(_MAX_RETRY_DELAY, 0.5 * 2 ** (attempt - 1)))


async def _post(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    batch: Sequence[Mapping[str, object]],
    *,
    max_attempts: int,
    sleep: Sleep,
) -> int:
    """Posts one batch until it is accepted; returns how many retries that took."""
    body = orjson.dumps(list(batch))
    for attempt in range(1, max_attempts + 1):
        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.TransportError as exc:
            if attempt == max_attempts:
                raise SendError(f"ingest unreachable after {attempt} attempts ({exc})") from exc
            delay = _backoff(attempt)
            logger.warning("ingest unreachable (%s); retrying in %.1fs", exc, delay)
        else:
            if response.is_success:
                return attempt - 1
            if response.status_code not in RETRYABLE_STATUSES:
                raise SendError(
                    f"ingest refused a batch of {len(batch)} with HTTP {response.status_code}",
                    status=response.status_code,
                    body=response.text,
                )
            if attempt == max_attempts:
                raise SendError(
                    f"ingest still answers HTTP {response.status_code} after {attempt} attempts",
                    status=response.status_code,
                    body=response.text,
                )
            retry_after = _retry_after(response)
            delay = _backoff(attempt) if retry_after is None else retry_after
            delay = min(delay, _MAX_RETRY_DELAY)
            logger.warning(
                "ingest answered HTTP %d; resending the same batch in %.1fs",
                response.status_code,
                delay,
            )
        await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


async def send(
    events: Sequence[Mapping[str, object]],
    base_url: str,
    api_key: str,
    *,
    rate: float | None = None,
    batch_size: int = 100,
    speed: float | None = None,
    start_clock: datetime | None = None,
    max_attempts: int = 8,
    client: httpx.AsyncClient | None = None,
    sleep: Sleep = asyncio.sleep,
    clock: Clock = time.monotonic,
) -> SendReport:
    """Posts ``events`` in order to ``{base_url}/v1/events``.

    ``rate``: events per second (None: as fast as ingest answers). ``speed``: replay the
    history so that one wall second covers ``speed`` seconds of ``occurred_at``, starting at
    ``start_clock`` (default: the first event); events before it go at once. Only one of
    ``rate`` and ``speed`` may be given. Raises :class:`SendError` on a 4xx other than 429
    (with the response body) or when retries run out.
    """
    if rate is not None and speed is not None:
        raise ValueError("give rate or speed, not both")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0")
    if speed is not None and speed <= 0:
        raise ValueError("speed must be > 0")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")

    if speed is not None:
        batches = _replay_batches(events, batch_size, speed, start_clock)
    else:
        # At a steady rate, keep batches small enough that one goes out about every second.
        size = batch_size if rate is None else min(batch_size, max(1, math.ceil(rate)))
        batches = _fixed_batches(events, size, rate)

    url = f"{base_url.rstrip('/')}/v1/events"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    own_client = client is None
    http = client if client is not None else httpx.AsyncClient(timeout=30.0)
    sent = posted = retries = 0
    began = clock()
    try:
        for batch in batches:
            wait = began + batch.due - clock()
            if wait > 0:
                await sleep(wait)
            retries += await _post(http, url, headers, batch.events, max_attempts=max_attempts, sleep=sleep)
            sent += len(batch.events)
            posted += 1
            logger.debug("posted batch %d (%d events, %d so far)", posted, len(batch.events), sent)
    finally:
        if own_client:
            await http.aclose()
    elapsed = clock() - began
    logger.info("sent %d events in %d batches (%d retries) in %.1fs", sent, posted, retries, elapsed)
    return SendReport(events=sent, batches=posted, retries=retries)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shared.demo",
        description="Generate a seeded demo history of backend events and post it to ingest.",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument(
        "--start",
        type=datetime.fromisoformat,
        help="RFC 3339 start of the history (default: --days before now, so it ends now)",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8001", help="ingest base URL")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("RETAIN_API_KEY"),
        help="ingest API key with the events:write scope (default: $RETAIN_API_KEY, which keeps it "
        "off the process list)",
    )
    pacing = parser.add_mutually_exclusive_group()
    pacing.add_argument("--rate", type=float, help="events per second")
    pacing.add_argument(
        "--speed",
        type=float,
        help="replay: seconds of event time per wall second (86400 = a day/s)",
    )
    pacing.add_argument("--fast", action="store_true", help="as fast as ingest accepts (default)")
    parser.add_argument("--batch", type=int, default=100, help="events per request")
    parser.add_argument(
        "--dump", type=Path, help="write the events as JSONL to this file ('-' = stdout), no send"
    )
    parser.add_argument(
        "--then-live",
        type=float,
        metavar="RATE",
        help="after the history, keep sending events of new customers happening now, RATE per second",
    )
    parser.add_argument(
        "--answer-surveys",
        metavar="MESSENGER_URL",
        help="with --then-live: play the customers who open the survey link in a message the "
        "messenger sent and answer it (the key needs messages:read)",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def _dump(events: Sequence[Mapping[str, object]], target: Path) -> None:
    lines = b"".join(orjson.dumps(event) + b"\n" for event in events)
    if str(target) == "-":
        sys.stdout.buffer.write(lines)
        sys.stdout.buffer.flush()
    else:
        target.write_bytes(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One line per request from httpx would drown the progress of a long replay.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    start: datetime | None = args.start
    if start is None:
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=args.days)
    elif start.tzinfo is None:
        parser.error("--start needs an offset, e.g. 2025-01-01T00:00:00+02:00")
    if args.dump is None and not args.api_key:
        parser.error("--api-key (or RETAIN_API_KEY) is required unless --dump is given")

    began = time.perf_counter()
    events = generate(args.seed, args.customers, start, args.days)
    logger.info(
        "generated %d events for %d customers over %d days from %s in %.2fs",
        len(events),
        args.customers,
        args.days,
        start.isoformat(),
        time.perf_counter() - began,
    )
    if args.dump is not None:
        _dump(events, args.dump)
        return 0
    try:
        asyncio.run(
            send(
                events,
                args.url,
                args.api_key,
                rate=args.rate,
                batch_size=args.batch,
                speed=args.speed,
            )
        )
        if args.then_live:
            asyncio.run(
                _live(args.seed, args.url, args.api_key, args.then_live, args.batch, args.answer_surveys)
            )
    except SendError as exc:
        logger.error("%s", exc)
        return 1
    return 0


async def _live(
    seed: int, url: str, api_key: str, rate: float, batch: int, messenger_url: str | None = None
) -> None:
    run_id = uuid.uuid4().hex[:6]
    logger.info("history sent; now a live trickle of %.1f events/s (run %s)", rate, run_id)
    async with httpx.AsyncClient(timeout=30.0) as client:
        # Beside the trickle, not in a TaskGroup with it: a SendError of the trickle must reach
        # main() as itself (a clean exit 1), and the respondents stop with it.
        respondents = (
            asyncio.create_task(Respondents(client, messenger_url, api_key, seed).run())
            if messenger_url
            else None
        )
        try:
            round_no = 0
            while True:
                events = live_round(seed, run_id, round_no, datetime.now(UTC), rate)
                await send(events, url, api_key, rate=rate, batch_size=batch)
                round_no += 1
        finally:
            if respondents is not None:
                respondents.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await respondents
