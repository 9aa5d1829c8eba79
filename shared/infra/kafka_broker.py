"""A real Apache Kafka broker (KRaft, combined broker+controller) as a local child process.

The jars come from Maven Central through ``deploy/kafka/pom.xml`` (see :func:`ensure_jars`);
the broker runs as ``java -cp 'libs/*' kafka.Kafka server.properties`` with everything it
writes under ``<var_dir>/kafka``::

    kafka/libs/              jars (+ .complete marker: Kafka version and pom hash)
    kafka/server.properties  rewritten on every start
    kafka/cluster.id         chosen once; the storage is formatted once with it
    kafka/data/              KRaft metadata log and topic data (survives restarts)
    kafka/logs/              server.log, controller.log, state-change.log, kafka.out
    kafka/broker.pid         pid of the running broker

Command line (supervisor friendly: SIGINT/SIGTERM stop the broker cleanly and exit 0; exits
non-zero if the broker dies)::

    python -m shared.infra.kafka_broker run --var var [--port 9092] [--controller-port 9093]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

__all__ = [
    "KafkaBrokerError",
    "LocalKafkaBroker",
    "ensure_jars",
    "kafka_version",
    "main",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"
POM = DEPLOY_DIR / "pom.xml"
LOG4J_CONFIG = DEPLOY_DIR / "log4j2.yaml"

MARKER_NAME = ".complete"
NODE_ID = 1
MVN_TIMEOUT_S = 900.0

JVM_OPTS: tuple[str, ...] = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)


class KafkaBrokerError(RuntimeError):
    """The local broker could not be set up, started or stopped."""


# --------------------------------------------------------------------------------------
# jars


def kafka_version(pom: Path = POM) -> str:
    """The ``kafka.version`` property of ``deploy/kafka/pom.xml``."""
    match = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text("utf-8"))
    if match is None:
        raise KafkaBrokerError(f"{pom}: no <kafka.version> property")
    return match.group(1)


def _marker_text(pom: Path) -> str:
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    return f"kafka {kafka_version(pom)}\npom-sha256 {digest}\n"


def _jars_complete(libs: Path, pom: Path) -> bool:
    marker = libs / MARKER_NAME
    try:
        if marker.read_text("utf-8") != _marker_text(pom):
            return False
    except OSError:
        return False
    return (libs / f"kafka_2.13-{kafka_version(pom)}.jar").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_jars(var_dir: Path) -> Path:
    """Make sure ``var_dir/kafka/libs`` holds the broker's jars; return that directory.

    Runs ``mvn dependency:copy-dependencies`` on ``deploy/kafka/pom.xml`` only when the
    marker file (Kafka version + pom hash) is missing or stale. Safe to call concurrently.
    """
    kafka_dir = Path(var_dir).resolve() / "kafka"
    libs = kafka_dir / "libs"
    if _jars_complete(libs, POM):
        return libs
    with _file_lock(kafka_dir / ".libs.lock"):
        if _jars_complete(libs, POM):
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaBrokerError(
                "Apache Maven ('mvn') is not on PATH; it is needed once to fetch the Kafka "
                f"broker jars from Maven Central into {libs} (e.g. `apt-get install maven`)."
            )
        staging = kafka_dir / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        log.info("fetching Kafka %s jars: %s", kafka_version(), " ".join(cmd))
        started = time.monotonic()
        try:
            proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
                cmd,
                capture_output=True,
                text=True,
                timeout=MVN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaBrokerError(f"mvn did not finish within {MVN_TIMEOUT_S:.0f}s") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
            raise KafkaBrokerError(f"mvn failed (exit {proc.returncode}):\n{tail}")
        (staging / MARKER_NAME).write_text(_marker_text(POM), "utf-8")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        log.info("Kafka jars ready in %s (%.1fs)", libs, time.monotonic() - started)
    return libs


# --------------------------------------------------------------------------------------
# wire-level probes (no event loop needed, so start() works inside async tests too)

_API_METADATA = 3
_API_VERSIONS = 18


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str | None:
        length = self.take(">h")
        if length < 0:
            return None
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        buf += chunk
    return bytes(buf)


def _kafka_request(
    sock: socket.socket, api_key: int, api_version: int, correlation_id: int, body: bytes
) -> _Reader:
    client_id = b"retain-probe"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    reader = _Reader(_recv_exact(sock, size))
    if reader.take(">i") != correlation_id:
        raise ConnectionError("response correlation id mismatch")
    return reader


def _api_versions(sock: socket.socket) -> dict[int, tuple[int, int]]:
    """ApiVersions v0; a broker answers it (in v0 form) whatever versions it supports."""
    reader = _kafka_request(sock, _API_VERSIONS, 0, 1, b"")
    reader.take(">h")  # error_code (UNSUPPORTED_VERSION still carries the list)
    versions: dict[int, tuple[int, int]] = {}
    for _ in range(reader.take(">i")):
        key, low, high = reader.take(">h"), reader.take(">h"), reader.take(">h")
        versions[key] = (low, high)
    return versions


def _metadata_brokers(sock: socket.socket, versions: dict[int, tuple[int, int]]) -> list[int]:
    """Metadata (all-topics-null) request; returns the ports of the registered brokers."""
    low, high = versions.get(_API_METADATA, (0, -1))
    # v4..v8 share the non-flexible layout parsed below (brokers with rack, cluster id).
    version = max(low, 4)
    if version > min(high, 8):
        raise KafkaBrokerError(f"broker supports Metadata v{low}..v{high} only")
    body = struct.pack(">ib", -1, 0)  # topics = null (none needed), allow_auto_topic_creation
    if version >= 8:
        body += struct.pack(">bb", 0, 0)
    reader = _kafka_request(sock, _API_METADATA, version, 2, body)
    reader.take(">i")  # throttle_time_ms
    ports = []
    for _ in range(reader.take(">i")):
        reader.take(">i")  # node_id
        reader.string()  # host
        ports.append(reader.take(">i"))
        reader.string()  # rack
    return ports


def probe_kafka(host: str, port: int, timeout: float = 2.0) -> bool | None:
    """None: nothing listens; False: something that is not Kafka; True: a Kafka broker."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    with sock:
        try:
            _api_versions(sock)
        except (OSError, ConnectionError, struct.error, UnicodeDecodeError):
            return False
    return True


def _broker_ready(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            versions = _api_versions(sock)
            return port in _metadata_brokers(sock, versions)
    except (OSError, ConnectionError, struct.error, UnicodeDecodeError):
        return False


# --------------------------------------------------------------------------------------
# the broker


def _random_cluster_id() -> str:
    """Like Kafka's ``Uuid.randomUuid().toString()``: url-safe base64, no padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaBrokerError("no 'java' on PATH (and no JAVA_HOME): Kafka needs Java 17+")
    return java


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn that SIGKILLs the broker when the thread that started it dies (Linux).

    Only used from the main thread: PR_SET_PDEATHSIG fires when the *thread* exits.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def _set() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return _set


def _pid_alive_as_broker(pid: int, config: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"kafka.Kafka" in cmdline and str(config).encode() in cmdline


class LocalKafkaBroker:
    """One single-node KRaft broker+controller (node id 1) on 127.0.0.1."""

    host = "127.0.0.1"

    def __init__(
        self,
        var_dir: Path,
        port: int = 9092,
        controller_port: int = 9093,
        num_partitions: int = 6,
        *,
        libs_dir: Path | None = None,
        extra_properties: Mapping[str, str] | None = None,
    ) -> None:
        """``libs_dir``: use jars from there (as returned by :func:`ensure_jars`) instead of
        ``var_dir/kafka/libs``. ``extra_properties`` override/extend server.properties."""
        self.var_dir = Path(var_dir).resolve()
        self.port = port
        self.controller_port = controller_port
        self.num_partitions = num_partitions
        self.kafka_dir = self.var_dir / "kafka"
        self.data_dir = self.kafka_dir / "data"
        self.logs_dir = self.kafka_dir / "logs"
        self.config_path = self.kafka_dir / "server.properties"
        self.cluster_id_path = self.kafka_dir / "cluster.id"
        self.pid_path = self.kafka_dir / "broker.pid"
        self._libs_dir = libs_dir.resolve() if libs_dir is not None else None
        self._extra = dict(extra_properties or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    # ---- public API -------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last broker process (None while running / never started)."""
        return self._proc.poll() if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker and wait until it serves metadata; return the bootstrap address.

        ``timeout`` covers formatting + JVM start, not a first-time jar download.
        """
        if self.is_running():
            raise KafkaBrokerError(f"broker already started by this object (pid {self.pid})")
        self._check_not_running_elsewhere()
        libs = self._libs_dir if self._libs_dir is not None else ensure_jars(self.var_dir)
        deadline = time.monotonic() + timeout
        java = _java()
        classpath = f"{libs}/*"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._format_storage(java, classpath, deadline)

        cmd = [
            java,
            *JVM_OPTS,
            f"-Dkafka.logs.dir={self.logs_dir}",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(self.config_path),
        ]
        self._out = (self.logs_dir / "kafka.out").open("ab")
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd,
            cwd=self.kafka_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the broker cleanly
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only prctl(PDEATHSIG)
        )
        self.pid_path.write_text(f"{self._proc.pid}\n", "utf-8")
        log.info("Kafka broker pid %d starting on %s", self._proc.pid, self.bootstrap)

        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._cleanup()
                raise KafkaBrokerError(f"Kafka broker exited with {code} during startup\n{self.log_tail()}")
            if _broker_ready(self.host, self.port):
                return self.bootstrap
            if time.monotonic() > deadline:
                self.kill()
                raise KafkaBrokerError(
                    f"Kafka broker not ready on {self.bootstrap} within {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (controlled shutdown) and wait; SIGKILL only after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("Kafka broker pid %d ignored SIGTERM for %.0fs", proc.pid, timeout)
                proc.kill()
                proc.wait()
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL the broker (no shutdown at all; for chaos tests)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._cleanup()

    # ---- internals ----------------------------------------------------------------------

    def _check_not_running_elsewhere(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_path.read_text("utf-8").strip())
            if _pid_alive_as_broker(pid, self.config_path):
                raise KafkaBrokerError(
                    f"a Kafka broker for {self.kafka_dir} is already running (pid {pid}); "
                    f"stop it first (kill {pid})"
                )
        for port, what in ((self.port, "broker"), (self.controller_port, "controller")):
            found = probe_kafka(self.host, port)
            if found is True:
                raise KafkaBrokerError(
                    f"a Kafka broker is already listening on {self.host}:{port}; "
                    "not starting a second one (use it, or stop it first)"
                )
            if found is False:
                raise KafkaBrokerError(
                    f"{self.host}:{port} ({what} port) is in use by something that is not Kafka"
                )

    def _properties(self) -> dict[str, str]:
        props = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "controller.quorum.voters": f"{NODE_ID}@{self.host}:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            # topics
            "num.partitions": str(self.num_partitions),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            # internal topics on one node (fewer partitions: faster first group/txn use)
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # fast groups for tests (classic protocol, as aiokafka uses)
            "group.initial.rebalance.delay.ms": "0",
            "group.min.session.timeout.ms": "1000",
            # after a SIGKILL the restarted broker must wait for its old session to expire
            # before it may re-register (default 9 s); keep that short, but safe on 2 cores
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "4000",
            # small machine: 2 cores, 512 MiB heap
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "2",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "log.retention.hours": "168",
            "log.segment.bytes": str(128 * 1024 * 1024),
        }
        props.update(self._extra)
        return props

    def _write_config(self) -> None:
        lines = ["# written by shared/infra/kafka_broker.py on every start; edits are lost"]
        lines += [f"{key}={value}" for key, value in self._properties().items()]
        self.config_path.write_text("\n".join(lines) + "\n", "utf-8")

    def _cluster_id(self) -> str:
        with contextlib.suppress(OSError):
            existing = self.cluster_id_path.read_text("utf-8").strip()
            if existing:
                return existing
        cluster_id = _random_cluster_id()
        self.cluster_id_path.write_text(cluster_id + "\n", "utf-8")
        return cluster_id

    def _format_storage(self, java: str, classpath: str, deadline: float) -> None:
        if (self.data_dir / "meta.properties").is_file():
            return  # formatted before: reuse the data
        cmd = [
            java,
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            f"-Dkafka.logs.dir={self.logs_dir}",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "--cluster-id",
            self._cluster_id(),
            "--config",
            str(self.config_path),
        ]
        try:
            proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
                cmd,
                capture_output=True,
                text=True,
                timeout=max(5.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaBrokerError("kafka storage format timed out") from exc
        if proc.returncode != 0:
            raise KafkaBrokerError(
                f"kafka storage format failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for name in ("kafka.out", "server.log"):
            with contextlib.suppress(OSError):
                text = (self.logs_dir / name).read_text("utf-8", errors="replace")
                parts.append(f"--- {name} (tail) ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def _cleanup(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        with contextlib.suppress(OSError, ValueError):
            if self._proc is not None and int(self.pid_path.read_text("utf-8")) == self._proc.pid:
                self.pid_path.unlink()


# --------------------------------------------------------------------------------------
# command line


def _run(args: argparse.Namespace) -> int:
    broker = LocalKafkaBroker(
        Path(args.var),
        port=args.port,
        controller_port=args.controller_port,
        num_partitions=args.partitions,
    )
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("got signal %d; stopping the Kafka broker", signum)
        stop_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)

    started = time.monotonic()
    try:
        bootstrap = broker.start(timeout=args.timeout)
    except KafkaBrokerError as exc:
        log.error("%s", exc)
        return 1
    log.info("Kafka broker ready on %s in %.1fs", bootstrap, time.monotonic() - started)
    if stop_requested.is_set():
        broker.stop()
        return 0

    while not stop_requested.wait(0.5):
        if not broker.is_running():
            code = broker.returncode
            log.error("Kafka broker died (exit %s)\n%s", code, broker.log_tail())
            broker.stop()
            return 1
    broker.stop()
    log.info("Kafka broker stopped (exit %s)", broker.returncode)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.infra.kafka_broker",
        description="Run a local single-node Apache Kafka broker (KRaft).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the broker and keep it in the foreground")
    run.add_argument("--var", default="var", help="state directory (default: var)")
    run.add_argument("--port", type=int, default=9092)
    run.add_argument("--controller-port", type=int, default=9093)
    run.add_argument("--partitions", type=int, default=6, help="num.partitions")
    run.add_argument("--timeout", type=float, default=90.0, help="startup timeout, seconds")
    sub.add_parser("jars", help="only fetch the jars (into <var>/kafka/libs)").add_argument(
        "--var", default="var"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s kafka-broker: %(message)s")
    if args.command == "jars":
        try:
            libs = ensure_jars(Path(args.var))
        except KafkaBrokerError as exc:
            log.error("%s", exc)
            return 1
        log.info("jars in %s", libs)
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
