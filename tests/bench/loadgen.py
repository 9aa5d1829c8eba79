"""An HTTP/1.1 load generator that is not the bottleneck, run in a process of its own.

``run_load(spec)`` starts ``python -m tests.bench.loadgen``, hands it the spec on stdin and reads
the result from stdout. The child pre-builds every request (headers and body, each event with a
unique id) before any timing, opens ``concurrency`` keep-alive connections with raw asyncio
streams (uvloop), warms up, then counts the responses completed inside the timed window. Only
202s count as done; everything else is counted as an error by status or exception type.

It also samples the CPU time of the processes it is told to watch (the server, the broker) and
its own, so the report shows who was busy: a load generator far from 100% of a core is not
what limits the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.config import REPO_ROOT
from tests.bench.infra import cpu_seconds
from tests.bench.payloads import batch_bodies, single_bodies


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    path: str
    api_key: str | None
    batch_size: int  # 1: a single JSON object per request; >1: a JSON array of that many events
    pool: int  # distinct requests pre-built; used in order, wrapping (and so repeating ids) at the end
    concurrency: int
    warmup_s: float
    seconds: float
    watch_pids: dict[str, int] = field(default_factory=dict)
    expect_status: int = 202
    profile_pid: int | None = None  # gets SIGUSR1 when the window opens and SIGUSR2 when it closes


@dataclass(frozen=True)
class LoadResult:
    ok: int  # responses with the expected status completed inside the window
    events: int  # ok * batch_size
    elapsed_s: float
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    loadgen_cpu: float  # CPU seconds of the load generator per second of window (1.0 = one core)
    watched_cpu: dict[str, float]  # the same for each watched process
    wrapped: bool  # the pool ran out and requests (with their event ids) were sent again
    build_s: float

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_load(spec: LoadSpec) -> LoadResult:
    """Run one measurement in a child process and return what it counted."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.loadgen"],
        input=json.dumps(asdict(spec)).encode(),
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=spec.warmup_s + spec.seconds + 300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed (exit {proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    data = json.loads(proc.stdout)
    return LoadResult(**data)


# --------------------------------------------------------------------------------------
# the child process


def _requests(spec: LoadSpec) -> list[bytes]:
    run_id = uuid.uuid4().hex[:12]
    if spec.batch_size == 1:
        bodies = single_bodies(run_id, spec.pool)
    else:
        bodies = batch_bodies(run_id, spec.pool, spec.batch_size)
    head = f"POST {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\nContent-Type: application/json\r\n"
    if spec.api_key:
        head += f"Authorization: Bearer {spec.api_key}\r\n"
    prefix = head.encode()
    return [b"%sContent-Length: %d\r\n\r\n%s" % (prefix, len(b), b) for b in bodies]


class _ClosedError(Exception):
    """The server closed the connection (or asked to)."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return its status and whether the server will close the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        length = int(lower[at + 17 : end])
        if length:
            await reader.readexactly(length)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, b"\r\nconnection: close" in lower


class _State:
    def __init__(self, requests: list[bytes]) -> None:
        self.requests = requests
        self.next = 0
        self.measuring = False
        self.stopping = False
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []

    def take(self) -> bytes:
        i = self.next
        self.next = i + 1
        return self.requests[i % len(self.requests)]


async def _connection(spec: LoadSpec, state: _State) -> None:
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    perf = time.perf_counter
    while not state.stopping:
        try:
            if writer is None or reader is None:
                reader, writer = await asyncio.open_connection(spec.host, spec.port)
            request = state.take()
            started = perf()
            writer.write(request)
            status, close = await read_response(reader)
            if state.measuring:
                if status == spec.expect_status:
                    state.ok += 1
                    state.latencies.append(perf() - started)
                else:
                    state.errors[f"HTTP {status}"] += 1
            if close:
                raise _ClosedError
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            _ClosedError,
        ) as exc:
            if state.measuring and not isinstance(exc, _ClosedError):
                state.errors[type(exc).__name__] += 1
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            reader = writer = None
            if not isinstance(exc, _ClosedError):
                await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _cpu_snapshot(spec: LoadSpec) -> dict[str, float | None]:
    snap: dict[str, float | None] = {name: cpu_seconds(pid) for name, pid in spec.watch_pids.items()}
    snap["__self__"] = time.process_time()
    return snap


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _measure(spec: LoadSpec, requests: list[bytes], build_s: float) -> LoadResult:
    state = _State(requests)
    tasks = [asyncio.create_task(_connection(spec, state)) for _ in range(spec.concurrency)]
    await asyncio.sleep(spec.warmup_s)
    if spec.profile_pid is not None:
        os.kill(spec.profile_pid, signal.SIGUSR1)
    before = _cpu_snapshot(spec)
    started = time.perf_counter()
    state.measuring = True
    await asyncio.sleep(spec.seconds)
    state.measuring = False
    elapsed = time.perf_counter() - started
    after = _cpu_snapshot(spec)
    if spec.profile_pid is not None:
        os.kill(spec.profile_pid, signal.SIGUSR2)
    state.stopping = True
    # Let the requests in flight finish (they are not counted), so no server sees a reset.
    _done, pending = await asyncio.wait(tasks, timeout=30.0)
    for task in pending:
        task.cancel()
    watched: dict[str, float] = {}
    for name, value in after.items():
        start = before.get(name)
        if value is not None and start is not None and name != "__self__":
            watched[name] = (value - start) / elapsed
    self_before, self_after = before["__self__"], after["__self__"]
    assert self_before is not None
    assert self_after is not None
    latencies = sorted(state.latencies)
    return LoadResult(
        ok=state.ok,
        events=state.ok * spec.batch_size,
        elapsed_s=elapsed,
        errors=dict(state.errors),
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        loadgen_cpu=(self_after - self_before) / elapsed,
        watched_cpu=watched,
        wrapped=state.next > len(requests),
        build_s=build_s,
    )


def main() -> int:
    spec = LoadSpec(**json.loads(sys.stdin.buffer.read()))
    started = time.perf_counter()
    requests = _requests(spec)
    build_s = time.perf_counter() - started
    gc.collect()
    gc.freeze()  # the pool lives until the end; the collector need not walk it again
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, as uvicorn uses it too

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(_measure(spec, requests, build_s))
    out: dict[str, Any] = asdict(result)
    sys.stdout.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
