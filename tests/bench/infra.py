"""What the benchmark sections start: a Kafka broker, uvicorn servers; and how they are observed."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]  # no stubs
import httpx
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.config import REPO_ROOT

if TYPE_CHECKING:
    from shared.infra.postgres import LocalPostgres

BENCH_VAR = REPO_ROOT / "var" / "bench"
HOST = "127.0.0.1"


def say(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the report."""
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text("ascii")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time of a process and of its direct children, by pid (PostgreSQL's backends)."""
    out: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text("ascii").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def machine_busy_seconds() -> float | None:
    """CPU time every core of the machine has spent busy (not idle or iowait), from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text("ascii").split("\n", 1)[0]
    except OSError:
        return None
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    values = [int(v) for v in first.split()[1:9]]
    busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    return busy / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------
# Kafka


@dataclass(frozen=True)
class KafkaInfo:
    bootstrap: str
    version: str
    pid: int | None  # the local broker's pid (None for an external cluster)


@contextlib.contextmanager
def kafka_cluster(partitions: int) -> Iterator[KafkaInfo]:
    """RETAIN_KAFKA_BOOTSTRAP if set, else a local broker of our own, removed afterwards."""
    external = os.environ.get("RETAIN_KAFKA_BOOTSTRAP")
    if external:
        say(f"using the Kafka cluster at {external} (RETAIN_KAFKA_BOOTSTRAP)")
        yield KafkaInfo(external, "external cluster (version not probed)", None)
        return
    from shared.infra.kafka_broker import LocalKafkaBroker, ensure_jars, kafka_version  # noqa: PLC0415

    libs = ensure_jars(REPO_ROOT / "var")
    var = BENCH_VAR / f"kafka-{os.getpid()}"
    port = free_port()
    controller_port = free_port()
    while controller_port == port:  # the kernel may hand the same free port out twice
        controller_port = free_port()
    broker = LocalKafkaBroker(
        var, port=port, controller_port=controller_port, num_partitions=partitions, libs_dir=libs
    )
    say(f"starting a local Kafka {kafka_version()} broker (data in {var})")
    started = time.monotonic()
    broker.start()
    say(f"Kafka ready on {broker.bootstrap} in {time.monotonic() - started:.1f}s")
    try:
        yield KafkaInfo(broker.bootstrap, kafka_version(), broker.pid)
    finally:
        say("stopping Kafka")
        broker.stop()
        shutil.rmtree(var, ignore_errors=True)


# --------------------------------------------------------------------------------------
# PostgreSQL


@dataclass(frozen=True)
class PostgresInfo:
    server: LocalPostgres
    version: str  # the major version, from the binaries' directory

    def create_database(self, name: str) -> str:
        """A new empty database (removed with the cluster); its asyncpg URL."""
        return self.server.create_database(name)

    @property
    def postmaster_pid(self) -> int | None:
        try:
            return int((self.server.data_dir / "postmaster.pid").read_text("ascii").split()[0])
        except (OSError, ValueError, IndexError):
            return None


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresInfo]:
    """A throwaway cluster of the distro's PostgreSQL under var/bench/, removed afterwards."""
    from shared.infra.postgres import LocalPostgres  # noqa: PLC0415 - only when a section asks

    root = BENCH_VAR / f"pg-{os.getpid()}"
    server = LocalPostgres(root)
    say(f"starting a local PostgreSQL from {server.bin_dir} (data in {root})")
    started = time.monotonic()
    server.start()
    say(f"PostgreSQL ready on port {server.port} in {time.monotonic() - started:.1f}s")
    try:
        yield PostgresInfo(server, server.bin_dir.parent.name)
    finally:
        say("stopping PostgreSQL")
        server.stop("fast")
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Watch:
    """Processes whose CPU a measurement reports: by pid, and with their direct children."""

    pids: dict[str, int] = field(default_factory=dict)
    families: dict[str, int] = field(default_factory=dict)


@dataclass
class Cpu:
    """CPU seconds over a timed window: this process's event-loop thread and its other threads
    (aiosqlite's SQLite thread, ``to_thread`` work), watched processes (the broker, Prism,
    PostgreSQL with its backends), and the whole machine. What the machine spent beyond all of
    them was spent by someone else: a sign the numbers are noisy."""

    seconds: float = 0.0
    loop_thread: float = 0.0
    other_threads: float = 0.0
    watched: dict[str, float] = field(default_factory=dict)
    machine: float | None = None

    @property
    def total(self) -> float:
        """This process and the watched processes: the CPU the measurement itself cost."""
        return self.loop_thread + self.other_threads + sum(self.watched.values())

    @property
    def unaccounted(self) -> float | None:
        if self.machine is None:
            return None
        return max(0.0, self.machine - self.loop_thread - self.other_threads - sum(self.watched.values()))

    def share(self, value: float | None) -> str:
        """``value`` CPU seconds as a share of one core over the window."""
        return "" if value is None or self.seconds <= 0 else f"{value / self.seconds:.0%}"

    @classmethod
    @contextlib.contextmanager
    def measure(cls, pids: Mapping[str, int], families: Mapping[str, int] | None = None) -> Iterator[Cpu]:
        """``pids``: processes by name; ``families``: a process and its direct children."""
        cpu = cls()
        families = families or {}

        def sample() -> dict[str, dict[int, float]]:
            out = {k: family_cpu_seconds(p) for k, p in families.items()}
            for k, p in pids.items():
                value = cpu_seconds(p)
                out[k] = {} if value is None else {p: value}
            return out

        thread0, process0, wall0 = time.thread_time(), time.process_time(), time.perf_counter()
        before, machine0 = sample(), machine_busy_seconds()
        yield cpu
        cpu.seconds = time.perf_counter() - wall0
        thread, process = time.thread_time() - thread0, time.process_time() - process0
        cpu.loop_thread, cpu.other_threads = thread, max(0.0, process - thread)
        after, machine1 = sample(), machine_busy_seconds()
        for name, now in after.items():
            cpu.watched[name] = sum(v - before[name].get(pid, 0.0) for pid, v in now.items())
        if machine0 is not None and machine1 is not None:
            cpu.machine = machine1 - machine0


def noise_warning(cpus: Sequence[Cpu], limit: float = 0.25) -> str | None:
    """A warning when other processes used more than ``limit`` of a core in some measurement."""
    worst = max(
        (c.unaccounted / c.seconds for c in cpus if c.unaccounted is not None and c.seconds > 0), default=0.0
    )
    if worst <= limit:
        return None
    return (
        f"WARNING: other processes on this machine used up to {worst:.0%} of a core during the measured "
        "runs (see 'others'): absolute numbers are noisy, and ratios less reliable than usual."
    )


class StatementCounter:
    """SQL statements (BEGIN included) and transactions an engine runs, from SQLAlchemy's events:
    the round trips a consumer pays per record, whatever the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.statements = 0
        self.transactions = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._statement)
        event.listen(engine.sync_engine, "begin", self._begin)

    def _statement(self, *_: object) -> None:
        self.statements += 1

    @contextlib.contextmanager
    def counting_copies(self) -> Iterator[None]:
        """Also count PostgreSQL COPYs (``shared.db.copy_new_rows``), which go to asyncpg
        directly and so past SQLAlchemy's events: every COPY in this process meanwhile."""
        original = asyncpg.Connection.copy_records_to_table

        async def counted(connection: asyncpg.Connection, *args: Any, **kwargs: Any) -> str:
            self.statements += 1
            status: str = await original(connection, *args, **kwargs)
            return status

        asyncpg.Connection.copy_records_to_table = counted
        try:
            yield
        finally:
            asyncpg.Connection.copy_records_to_table = original

    def _begin(self, *_: object) -> None:
        self.transactions += 1


# --------------------------------------------------------------------------------------
# servers


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn: the child gets SIGTERM if the bench dies, so no server outlives it."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def _set() -> None:
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG

    return _set


def uvicorn_argv(app: str, port: int) -> list[str]:
    """The same uvicorn flags for every server the bench measures."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--factory",
        "--host",
        HOST,
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]


class Process:
    """One process of the pipeline under measurement, its output in a log file under var/bench/
    (the last run's, kept for a look afterwards); it dies with the bench."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = BENCH_VAR / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self) -> None:
        BENCH_VAR.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        env = {**os.environ, **self.env, "PYTHONPATH": str(REPO_ROOT)}
        self._proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only prctl(PDEATHSIG)
        )

    def check(self) -> None:
        """Raise if the process has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Server(Process):
    """One uvicorn process; started means every ready path answers 200."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], port: int) -> None:
        super().__init__(name, argv, env)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, ready_paths: Sequence[str] = ("/healthz",), timeout: float = 60.0) -> None:
        super().start()
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            for path in ready_paths:
                while True:
                    if self._proc is not None and self._proc.poll() is not None:
                        code = self._proc.returncode
                        raise RuntimeError(
                            f"{self.name} exited with {code} while starting:\n{self.log_tail()}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(path).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{self.name}: {path} not 200 within {timeout:.0f}s\n{self.log_tail()}"
                        )
                    time.sleep(0.1)


@contextlib.contextmanager
def running(server: Server, ready_paths: Sequence[str] = ("/healthz",)) -> Iterator[Server]:
    say(f"starting {server.name} on {server.url}")
    try:
        server.start(ready_paths)
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------
# the machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text("utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_info(kafka_version: str | None, postgres_version: str | None = None) -> list[tuple[str, str]]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    libs = ", ".join(
        f"{d} {_version(d)}"
        for d in (
            "fastapi",
            "starlette",
            "uvicorn",
            "uvloop",
            "httptools",
            "pydantic",
            "aiokafka",
            "sqlalchemy",
            "aiosqlite",
            "asyncpg",
            "twilio",
            "aiohttp",
        )
    )
    info = [
        ("nproc", str(cpus)),
        ("cpu", _cpu_model()),
        ("memory", f"{mem_gib:.1f} GiB"),
        ("os", f"{platform.system()} {platform.release()}"),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("libraries", libs),
        ("sqlite", sqlite3.sqlite_version),
    ]
    if kafka_version is not None:
        info.append(("kafka", kafka_version))
    if postgres_version is not None:
        info.append(("postgresql", postgres_version))
    return info


@contextlib.contextmanager
def collector_as_settled() -> Iterator[None]:
    """Inside (or around a section's ``run``, as a decorator): the collector as a worker
    process runs it (``settle_collector``, called where the section's service starts);
    afterwards as it was, so that the sections that follow measure their services and
    baselines as they did before, each on its own terms."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
