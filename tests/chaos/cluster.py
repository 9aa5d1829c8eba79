"""The pipeline the chaos run attacks: its own Kafka broker and PostgreSQL, ingest's API and
every worker as a separate process (as ``make run`` starts them), each one killable."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import func, select

from shared.auth import create_key
from shared.config import REPO_ROOT
from shared.db import Database
from shared.infra.kafka_broker import LocalKafkaBroker, ensure_jars
from shared.infra.postgres import LocalPostgres
from shared.topics import (
    CANCELLATIONS,
    CLV,
    MESSAGES,
    PROFILES,
    PURCHASES,
    SEGMENTS,
    SUPPORT,
    all_topic_names,
    ensure_topics,
)
from tests.chaos.sender import CALL_LOG_ENV
from tests.support.infra import free_port

CHAOS_VAR = REPO_ROOT / "var" / "chaos"
BACKEND_TOPICS = (PROFILES, PURCHASES, SUPPORT, CANCELLATIONS)
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    # worker → (consumer group, the topics it consumes)
    "segmenter": ("chaos-segmenter", (*BACKEND_TOPICS, CLV)),
    "messenger": ("chaos-messenger", (SEGMENTS,)),
    "kpi": ("chaos-kpi", (*BACKEND_TOPICS, MESSAGES)),
}
WORKER_MODULES = {
    "segmenter": "services.segmenter.consumer",
    "messenger": "services.messenger.consumer",
    "kpi": "services.kpi.consumer",
    "sender": "tests.chaos.sender",
}
SESSION_TIMEOUT_MS = 6000  # a SIGKILLed member's partitions move on after this long


def say(message: str) -> None:
    """Progress on stderr (stdout carries the figures)."""
    sys.stderr.write(f"[chaos {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


class Proc:
    """One service process; its output appended to ``<name>.log`` across restarts."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._log.write(f"\n==== start {self.starts + 1} ====\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or committed."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (finish the batch, commit, leave the group); SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"{self.name} ignored SIGTERM for {timeout:.0f}s; killing it")
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        self.terminate()
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        """Until ``text`` appears in this start's output."""
        deadline = time.monotonic() + timeout
        marker = f"==== start {self.starts} ===="
        while True:
            output = self.log_path.read_text("utf-8", errors="replace").rsplit(marker, 1)[-1]
            if text in output:
                return
            if not self.alive:
                raise RuntimeError(f"{self.name} exited while starting:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {text!r} within {timeout:.0f}s\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Cluster:
    """Everything one chaos run starts, under ``root`` (removed by :meth:`close` unless kept)."""

    root: Path
    partitions: int = 3
    prefix: str = "chaos.retain."
    broker: LocalKafkaBroker | None = None
    postgres: LocalPostgres | None = None
    database_urls: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    api_key: str = ""
    ingest_port: int = 0

    @property
    def bootstrap(self) -> str:
        assert self.broker is not None, "not started"
        return self.broker.bootstrap

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    @property
    def call_log(self) -> Path:
        return self.root / "provider_calls.jsonl"

    @property
    def outbox_dir(self) -> Path:
        return self.root / "outbox"

    def topic(self, name: str) -> str:
        return self.prefix + name

    # --- infrastructure --------------------------------------------------------------------

    def start_infra(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        libs = ensure_jars(REPO_ROOT / "var")
        port, controller_port = free_port(), free_port()
        while controller_port == port:  # the kernel may hand the port just released out again
            controller_port = free_port()
        self.broker = LocalKafkaBroker(
            self.root,
            port=port,
            controller_port=controller_port,
            num_partitions=self.partitions,
            libs_dir=libs,
        )
        say(f"starting Kafka (data in {self.broker.kafka_dir})")
        self.broker.start()
        self.postgres = LocalPostgres(self.root / "pg")
        say(f"starting PostgreSQL on port {self.postgres.port}")
        self.postgres.start()
        for service in ("segmenter", "messenger", "kpi"):
            self.database_urls[service] = self.postgres.create_database(f"chaos_{service}")
        asyncio.run(ensure_topics(self.bootstrap, all_topic_names(self.prefix), self.partitions))
        _key, self.api_key = create_key(self.root / "api_keys.json", ["events:write"], "chaos")

    def restart_broker(self) -> float:
        """Controlled shutdown, then a start on the same port and data; seconds it was away."""
        assert self.broker is not None
        began = time.monotonic()
        self.broker.stop()
        self.broker.start()
        return time.monotonic() - began

    def crash_postgres(self) -> float:
        """``pg_ctl stop -m immediate`` (no checkpoint: crash recovery at the next start)."""
        assert self.postgres is not None
        began = time.monotonic()
        self.postgres.stop("immediate")
        # Part of the fault, not a wait for something: the database stays away a moment, so
        # every client's open connection breaks and has to be made again, as after a real crash.
        time.sleep(1.0)
        self.postgres.start()
        return time.monotonic() - began

    # --- services ----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            "RETAIN_KAFKA_BOOTSTRAP": self.bootstrap,
            "RETAIN_TOPIC_PREFIX": self.prefix,
            "RETAIN_PARTITIONS": str(self.partitions),
            "RETAIN_VAR_DIR": str(self.root),
            "RETAIN_API_KEYS_FILE": str(self.root / "api_keys.json"),
            "RETAIN_METRICS_PORT": "0",
            "RETAIN_CONSUMER_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
            "RETAIN_SEGMENTER_DATABASE_URL": self.database_urls["segmenter"],
            "RETAIN_MESSENGER_DATABASE_URL": self.database_urls["messenger"],
            "RETAIN_KPI_DATABASE_URL": self.database_urls["kpi"],
            "RETAIN_SEGMENTER_GROUP_ID": GROUPS["segmenter"][0],
            "RETAIN_MESSENGER_GROUP_ID": GROUPS["messenger"][0],
            "RETAIN_KPI_GROUP_ID": GROUPS["kpi"][0],
            "RETAIN_SEGMENTER_SWEEP_INTERVAL_S": "5",
            "RETAIN_MESSENGER_OUTBOX_DIR": str(self.outbox_dir),
            "RETAIN_MESSENGER_SENDER_INTERVAL_S": "0.5",
            # A message a SIGKILL left 'sending' is looked up at the provider this soon: after
            # the longest a send may take (the outbox provider writes a file).
            "RETAIN_MESSENGER_SEND_TIMEOUT_S": "5",
            "RETAIN_MESSENGER_RECONCILE_AFTER_S": "6",
            "RETAIN_INGEST_RATE_LIMIT_PER_S": "0",
            "RETAIN_INGEST_ACK_TIMEOUT_S": "5",
            "RETAIN_INGEST_RETRY_AFTER_S": "1",
            CALL_LOG_ENV: str(self.call_log),
        }

    def start_services(self) -> None:
        env = self.env()
        logs = self.root / "logs"
        self.ingest_port = free_port()
        ingest = [
            sys.executable, "-m", "uvicorn", "services.ingest.app:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(self.ingest_port), "--no-access-log",
        ]  # fmt: skip
        self.procs["ingest"] = Proc("ingest", ingest, env, logs)
        for name, module in WORKER_MODULES.items():
            self.procs[name] = Proc(name, [sys.executable, "-m", module], env, logs)
        for proc in self.procs.values():
            proc.start()
        self._wait_http(self.procs["ingest"], f"{self.ingest_url}/healthz")
        # Faults should strike a running pipeline, not one still importing its modules.
        for name in GROUPS:
            self.procs[name].wait_for("consumer started")
        self.procs["sender"].wait_for("provider")

    def second_instance(self, name: str) -> Proc:
        proc = Proc(f"{name}-2", [sys.executable, "-m", WORKER_MODULES[name]], self.env(), self.root / "logs")
        proc.start()
        return proc

    def _wait_http(self, proc: Proc, url: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited while starting:\n{proc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name}: {url} not 200 within {timeout:.0f}s\n{proc.tail()}")
            time.sleep(0.2)

    def check_alive(self) -> list[str]:
        """Names of service processes that died on their own (nobody killed them just now)."""
        return [p.name for p in self.procs.values() if not p.alive]

    def stop_services(self, names: Sequence[str] | None = None) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for name in names if names is not None else list(self.procs):
            codes[name] = self.procs[name].terminate()
        return codes

    def close(self, keep: bool = False) -> None:
        for proc in self.procs.values():
            proc.close()
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop("fast")
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- observation -----------------------------------------------------------------------------

    async def lag(self) -> dict[str, int]:
        """Per worker: records of its topics its group has not committed (end − committed)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await admin.start()
        await consumer.start()
        try:
            out: dict[str, int] = {}
            for worker, (group, topics) in GROUPS.items():
                committed = await admin.list_consumer_group_offsets(group)
                partitions = [
                    TopicPartition(self.topic(t), p) for t in topics for p in range(self.partitions)
                ]
                end = await consumer.end_offsets(partitions)
                out[worker] = sum(
                    end[tp] - (committed[tp].offset if tp in committed else 0) for tp in partitions
                )
            return out
        finally:
            await consumer.stop()
            await admin.close()

    async def due_checks(self, at: datetime) -> int:
        """Segmenter customers whose next check is at or before ``at``: changes time alone has
        brought that the sweep has still to make (events are judged as of themselves, so after
        a replay of history most customers are due at once)."""
        from services.segmenter.tables import customers  # noqa: PLC0415

        db = Database(self.database_urls["segmenter"])
        try:
            async with db.sessions() as session:
                due = customers.c.next_check_at <= at
                return int(await session.scalar(select(func.count()).select_from(customers).where(due)) or 0)
        finally:
            await db.dispose()

    async def pending_work(self, due_within_s: float = 0.0) -> dict[str, int]:
        """What the services still have to do: outbox rows, and messages due (or due within
        ``due_within_s``) or mid-send."""
        from services.messenger.repository import DUE  # noqa: PLC0415
        from services.messenger.tables import messages  # noqa: PLC0415
        from services.segmenter.tables import outbox  # noqa: PLC0415

        out: dict[str, int] = {}
        for service, url in self.database_urls.items():
            db = Database(url)
            try:
                async with db.sessions() as session:
                    out[f"{service} outbox"] = int(
                        await session.scalar(select(func.count()).select_from(outbox)) or 0
                    )
                    if service == "messenger":
                        # What the sender claims: queued, and held for quiet hours whose
                        # window has opened (DUE), not only queued.
                        soon = datetime.now(UTC) + timedelta(seconds=due_within_s)
                        due = messages.c.status.in_(DUE) & (
                            messages.c.send_at.is_(None) | (messages.c.send_at <= soon)
                        )
                        out["messages due"] = int(
                            await session.scalar(select(func.count()).select_from(messages).where(due)) or 0
                        )
                        out["messages sending"] = int(
                            await session.scalar(
                                select(func.count())
                                .select_from(messages)
                                .where(messages.c.status == "sending")
                            )
                            or 0
                        )
            finally:
                await db.dispose()
        return out
