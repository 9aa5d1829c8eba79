"""The demo sender against an in-process ingest stand-in (httpx.MockTransport), on a fake clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.demo import DemoEvent, generate
from shared.demo.sender import SendError, SendReport, _parser, main, send

URL = "http://ingest.test"
KEY = "demo-key"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)

Send = Callable[..., Coroutine[Any, Any, SendReport]]


def make_events(count: int, step: timedelta = timedelta(minutes=1)) -> list[DemoEvent]:
    return [
        {
            "event_id": f"e-{n}",
            "type": "profile",
            "customer_id": f"c-{n:06d}",
            "occurred_at": (T0 + n * step).isoformat(),
            "schema_version": 1,
            "locale": "he-IL",
        }
        for n in range(count)
    ]


@dataclass
class FakeTime:
    """A monotonic clock that only moves when the sender sleeps."""

    now: float = 0.0
    slept: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass
class Ingest:
    """Records what it receives; ``answers`` scripts the status of each successive request."""

    time: FakeTime
    answers: list[httpx.Response] = field(default_factory=list)
    received: list[tuple[float, httpx.Request, list[dict[str, Any]]]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        batch = json.loads(request.content)
        self.received.append((self.time.now, request, batch))
        if self.answers:
            return self.answers.pop(0)
        return httpx.Response(202, json={"accepted": [event["event_id"] for event in batch]})

    def batches(self) -> list[list[str]]:
        return [[str(event["event_id"]) for event in batch] for _, _, batch in self.received]


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def ingest(fake_time: FakeTime) -> Ingest:
    return Ingest(fake_time)


@pytest.fixture
def sender(ingest: Ingest, fake_time: FakeTime) -> Send:
    def run(events: list[DemoEvent], **options: Any) -> Coroutine[Any, Any, SendReport]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(ingest))
        return send(
            events,
            URL,
            KEY,
            client=client,
            sleep=fake_time.sleep,
            clock=fake_time.clock,
            **options,
        )

    return run


async def test_posts_batches_in_order_with_the_bearer_key(ingest: Ingest, sender: Send) -> None:
    events = make_events(250)
    report = await sender(events, batch_size=100)
    assert ingest.batches() == [
        [f"e-{n}" for n in range(100)],
        [f"e-{n}" for n in range(100, 200)],
        [f"e-{n}" for n in range(200, 250)],
    ]
    for _, request, batch in ingest.received:
        assert request.method == "POST"
        assert str(request.url) == f"{URL}/v1/events"
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert request.headers["Content-Type"] == "application/json"
        first = int(batch[0]["event_id"].removeprefix("e-"))
        assert batch == events[first : first + len(batch)]
    assert (report.events, report.batches, report.retries) == (250, 3, 0)


async def test_503_is_retried_after_retry_after_with_the_same_batch(
    ingest: Ingest, fake_time: FakeTime, sender: Send
) -> None:
    ingest.answers = [httpx.Response(503, headers={"Retry-After": "7"}, text="broker away")]
    report = await sender(make_events(30), batch_size=20)
    batches = ingest.batches()
    assert batches[0] == batches[1]
    assert [when for when, _, _ in ingest.received] == [0.0, 7.0, 7.0]
    first, again = (request.content for _, request, _ in ingest.received[:2])
    assert first == again
    assert fake_time.slept == [7.0]
    assert (report.events, report.batches, report.retries) == (30, 2, 1)


async def test_429_without_retry_after_backs_off(ingest: Ingest, fake_time: FakeTime, sender: Send) -> None:
    ingest.answers = [httpx.Response(429), httpx.Response(429)]
    report = await sender(make_events(5))
    assert len(ingest.received) == 3
    assert fake_time.slept == [0.5, 1.0]
    assert report.retries == 2


async def test_422_raises_with_the_body_and_is_not_retried(ingest: Ingest, sender: Send) -> None:
    body = '{"detail": [{"loc": ["body", 0, "amount"], "msg": "must be >= 0"}]}'
    ingest.answers = [httpx.Response(422, text=body)]
    with pytest.raises(SendError, match="must be >= 0") as info:
        await sender(make_events(10))
    assert info.value.status == 422
    assert info.value.body == body
    assert len(ingest.received) == 1


async def test_gives_up_when_ingest_stays_unavailable(ingest: Ingest, sender: Send) -> None:
    ingest.answers = [httpx.Response(503, headers={"Retry-After": "1"}) for _ in range(3)]
    with pytest.raises(SendError, match="503 after 3 attempts"):
        await sender(make_events(3), max_attempts=3)
    assert len(ingest.received) == 3


async def test_connection_errors_are_retried(fake_time: FakeTime) -> None:
    calls: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(len(json.loads(request.content)))
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(202)

    client = httpx.AsyncClient(transport=httpx.MockTransport(flaky))
    report = await send(make_events(4), URL, KEY, client=client, sleep=fake_time.sleep, clock=fake_time.clock)
    assert calls == [4, 4]
    assert report.retries == 1


async def test_rate_paces_events_per_second(ingest: Ingest, fake_time: FakeTime, sender: Send) -> None:
    await sender(make_events(50), rate=10.0, batch_size=100)
    # At 10 events/s, batches shrink to 10 events and go out once a second.
    assert [len(b) for b in ingest.batches()] == [10] * 5
    assert [when for when, _, _ in ingest.received] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])


async def test_speed_replays_history_time_compressed(ingest: Ingest, sender: Send) -> None:
    # One event an hour, replayed at an hour per second.
    await sender(make_events(4, step=timedelta(hours=1)), speed=3600.0)
    assert ingest.batches() == [["e-0"], ["e-1"], ["e-2"], ["e-3"]]
    assert [when for when, _, _ in ingest.received] == pytest.approx([0.0, 1.0, 2.0, 3.0])


async def test_speed_groups_events_that_fall_due_together(ingest: Ingest, sender: Send) -> None:
    # A minute apart at a day per second: all due within a fraction of a second.
    await sender(make_events(30), speed=86_400.0, batch_size=12)
    assert [len(batch) for batch in ingest.batches()] == [12, 12, 6]


async def test_speed_starts_at_start_clock(ingest: Ingest, sender: Send) -> None:
    events = make_events(5, step=timedelta(hours=1))
    await sender(events, speed=3600.0, start_clock=T0 + timedelta(hours=2))
    # What lies before the start clock goes at once; the rest follows in replay time.
    assert [when for when, _, _ in ingest.received] == pytest.approx([0.0, 1.0, 2.0])
    assert ingest.batches()[0] == ["e-0", "e-1", "e-2"]


async def test_rate_and_speed_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="not both"):
        await send([], URL, KEY, rate=1.0, speed=2.0)


def test_cli_dump_writes_the_generated_events_as_jsonl(tmp_path: Path) -> None:
    target = tmp_path / "demo.jsonl"
    argv = ["--seed", "4", "--customers", "20", "--days", "30", "--dump", str(target)]
    assert main([*argv, "--start", "2025-01-01T00:00:00+02:00"]) == 0
    lines = target.read_text(encoding="utf-8").splitlines()
    expected = generate(4, 20, datetime.fromisoformat("2025-01-01T00:00:00+02:00"), 30)
    assert [json.loads(line) for line in lines] == expected


def test_cli_needs_a_key_to_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETAIN_API_KEY", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["--customers", "1"])
    assert info.value.code == 2


def test_cli_takes_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """make run passes the demo's key this way: a command line is on every user's process list."""
    monkeypatch.setenv("RETAIN_API_KEY", "rk_from_env")
    assert _parser().parse_args([]).api_key == "rk_from_env"
    assert _parser().parse_args(["--api-key", "rk_flag"]).api_key == "rk_flag"


def test_a_live_trickle_that_ingest_refuses_ends_with_exit_1_and_stops_the_respondents(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The history goes; the live trickle's first batch is refused: main() logs it and returns
    1 (a SendError, not a traceback), and the survey respondents running beside it are stopped."""
    from shared.demo import sender as module  # noqa: PLC0415

    calls: list[int] = []
    stopped: list[bool] = []

    async def fake_send(events: Any, *_args: Any, **_kwargs: Any) -> SendReport:
        calls.append(len(events))
        await asyncio.sleep(0)  # a request: the respondents' task gets to run
        if len(calls) > 1:
            raise SendError("ingest answered 422: bad batch", status=422)
        return SendReport(events=len(events), batches=1, retries=0)

    class FakeRespondents:
        def __init__(self, *_args: Any) -> None:
            pass

        async def run(self) -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                stopped.append(True)

    monkeypatch.setattr(module, "send", fake_send)
    monkeypatch.setattr(module, "Respondents", FakeRespondents)
    argv = ["--customers", "3", "--days", "30", "--api-key", KEY, "--then-live", "5"]
    assert main([*argv, "--answer-surveys", "http://127.0.0.1:8003"]) == 1
    assert len(calls) == 2
    assert stopped == [True]
