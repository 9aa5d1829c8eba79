"""`make run`: the broker, the topics, every service and the demo, under one supervisor.

The broker runs outside the supervisor on purpose: honcho stops everything together and
SIGKILLs after five seconds, while consumers need the broker to commit their last offsets on
the way down. So services stop first, then the broker gets a clean, unhurried shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from honcho.manager import Manager

from shared.auth import create_key
from shared.config import REPO_ROOT, CommonSettings
from shared.logs import configure_logging, get_logger
from shared.topics import all_topic_names, ensure_topics, wait_for_group_coordinators

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceProcess:
    name: str
    port: int | None  # an HTTP API on this port, or a consumer when None
    command: list[str]


def _api(module: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", f"services.{module}.app:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--timeout-graceful-shutdown", "4",
    ]  # fmt: skip


def service_processes() -> list[ServiceProcess]:
    """Every service that exists in this checkout, API and consumer as separate processes."""
    processes: list[ServiceProcess] = []
    for module, port in (("ingest", 8001), ("segmenter", 8002), ("messenger", 8003), ("kpi", 8004)):
        base = REPO_ROOT / "services" / module
        if (base / "app.py").exists():
            processes.append(ServiceProcess(f"{module}", port, _api(module, port)))
        for worker in ("consumer", "sender"):
            if (base / f"{worker}.py").exists():
                command = [sys.executable, "-m", f"services.{module}.{worker}"]
                processes.append(ServiceProcess(f"{module}-{worker}", None, command))
    return processes


def consumer_groups(processes: Sequence[ServiceProcess]) -> list[str]:
    """The Kafka consumer group of each service with a consumer: RETAIN_<SERVICE>_GROUP_ID as
    its settings read it, else their default, retain-<service>."""
    modules = [p.name.removesuffix("-consumer") for p in processes if p.name.endswith("-consumer")]
    return [os.environ.get(f"RETAIN_{m.upper()}_GROUP_ID", f"retain-{m}") for m in modules]


async def _prepare_kafka(settings: CommonSettings, processes: Sequence[ServiceProcess]) -> None:
    await ensure_topics(settings.kafka_bootstrap, all_topic_names(settings.topic_prefix), settings.partitions)
    await wait_for_group_coordinators(settings.kafka_bootstrap, consumer_groups(processes))


def _replace_demo_key(keys_path: Path) -> str:
    """A fresh key for this run's demo; the previous run's demo key stops working."""
    if keys_path.exists():
        data = json.loads(keys_path.read_text(encoding="utf-8"))
        data["keys"] = [k for k in data.get("keys", []) if k.get("name") != "demo"]
        keys_path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    _key, plain = create_key(keys_path, ["admin"], "demo")
    return plain


def _banner(settings: CommonSettings, processes: list[ServiceProcess], key: str, demo: bool) -> str:
    lines = ["", "Retain is starting. Where to look:"]
    lines += [f"  {p.name:<10} http://127.0.0.1:{p.port}/docs" for p in processes if p.port]
    lines += [
        f"  Kafka      {settings.kafka_bootstrap}  (topics {settings.topic_prefix}*)",
        f"  data       {settings.var_dir}/  (SQLite files, broker data and logs)",
        f"  outbox     {settings.var_dir / 'outbox'}/  (the demo's messages: no provider credentials,"
        " so nothing leaves this machine; .eml for email, .json for SMS/WhatsApp)",
        "",
        "Demo API key (all scopes; shown once, stored hashed; a new one each run):",
        f"  {key}",
        f"  curl -s -H 'Authorization: Bearer {key}' http://127.0.0.1:8001/readyz",
    ]
    if demo:
        lines.append(
            "The demo replays a year of history for 3,000 customers, then keeps a live trickle; "
            "its customers answer some of the surveys they are sent."
        )
    lines += ["Ctrl-C stops everything cleanly; `make run` again resumes where it stopped.", ""]
    return "\n".join(lines)


def run(with_demo: bool = True) -> int:
    settings = CommonSettings()
    configure_logging(settings.log_level, settings.log_json)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    if "RETAIN_KAFKA_BOOTSTRAP" not in os.environ:
        from shared.infra.kafka_broker import LocalKafkaBroker  # noqa: PLC0415

        port = int(settings.kafka_bootstrap.rsplit(":", 1)[-1])
        broker = LocalKafkaBroker(settings.var_dir, port=port, num_partitions=settings.partitions)
        log.info("starting the local Kafka broker (first run downloads its jars)", var=str(settings.var_dir))
        broker.start()
    else:
        log.info("using the Kafka cluster from RETAIN_KAFKA_BOOTSTRAP", bootstrap=settings.kafka_bootstrap)
    try:
        processes = service_processes()
        asyncio.run(_prepare_kafka(settings, processes))
        key = _replace_demo_key(settings.keys_path)
        manager = Manager()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RETAIN_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}
        if with_demo:
            env = {**DEMO_SHOP, **env}  # the demo shop's own settings, unless set
        for p in processes:
            manager.add_process(p.name, shlex.join(p.command), env=env, cwd=str(REPO_ROOT))
        if with_demo:
            # The key goes in the environment: a command line is readable by every user of the machine.
            manager.add_process(
                "demo",
                shlex.join(demo_command(settings.var_dir)),
                env={**env, "RETAIN_API_KEY": key},
                cwd=str(REPO_ROOT),
            )
        sys.stdout.write(_banner(settings, processes, key, with_demo))
        sys.stdout.flush()
        manager.loop()
        # Ctrl-C or a TERM is how a person stops the pipeline: that is a clean exit.
        return 0 if manager.returncode in (None, 0, 130, 143) else int(manager.returncode)
    finally:
        if broker is not None:
            log.info("stopping the Kafka broker")
            broker.stop()
            log.info(
                "Kafka broker stopped; everything is down", logs=str(settings.var_dir / "kafka" / "logs")
            )


# What the demo shop offers the customers it wins back (a business decides its own: unset, a
# win-back shows the code alone).
DEMO_SHOP = {
    "RETAIN_MESSENGER_OFFER_VALUE": json.dumps({"he": "15% הנחה", "ar": "خصم 15%", "en": "15% off"}),
    "RETAIN_MESSENGER_OFFER_VALID_DAYS": "30",
}


def demo_command(var_dir: Path) -> list[str]:
    """The demo stream's sender; its API key comes from RETAIN_API_KEY."""
    return [
        sys.executable, "-m", "shared.demo", "--url", "http://127.0.0.1:8001",
        "--seed", "7", "--customers", "3000", "--days", "365", "--start", _demo_start(var_dir),
        "--fast", "--then-live", "2", "--answer-surveys", "http://127.0.0.1:8003",
    ]  # fmt: skip


def _demo_start(var_dir: Path) -> str:
    """The history's start, fixed by the first run: later runs resend identical events,
    which the pipeline recognises as duplicates, instead of a shifted copy of the year."""
    path = var_dir / "demo_start.txt"
    if not path.exists():
        start = datetime.now(UTC).replace(microsecond=0, second=0) - timedelta(days=365)
        path.write_text(start.isoformat(), encoding="utf-8")
    return path.read_text(encoding="utf-8").strip()
