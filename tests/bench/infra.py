"""What the benchmark sections start: a Kafka broker, uvicorn servers; and how they are observed."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO

import httpx

from shared.config import REPO_ROOT

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
    broker = LocalKafkaBroker(
        var, port=free_port(), controller_port=free_port(), num_partitions=partitions, libs_dir=libs
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


class Server:
    """One uvicorn process, its output in a log file under var/bench/."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], port: int) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.port = port
        self.log_path = BENCH_VAR / f"{name}.log"  # the last run's, kept for a look afterwards
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self, ready_paths: Sequence[str] = ("/healthz",), timeout: float = 60.0) -> None:
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
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            for path in ready_paths:
                while True:
                    if self._proc.poll() is not None:
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


def machine_info(kafka_version: str | None) -> list[tuple[str, str]]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    libs = ", ".join(
        f"{d} {_version(d)}"
        for d in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "aiokafka")
    )
    info = [
        ("nproc", str(cpus)),
        ("cpu", _cpu_model()),
        ("memory", f"{mem_gib:.1f} GiB"),
        ("os", f"{platform.system()} {platform.release()}"),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("libraries", libs),
    ]
    if kafka_version is not None:
        info.append(("kafka", kafka_version))
    return info
