"""Settings every service shares. Each service's own settings extend ``CommonSettings``."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import TypedDict

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.logs import configure_logging, get_logger

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConsumerOptions(TypedDict):
    """``ConsumerLoop``'s keyword arguments from the settings (``consumer_options``)."""

    session_timeout_ms: int
    fetch_max_wait_ms: int
    fetch_min_bytes: int
    commit_interval_ms: int


def check_fx_table(
    reporting: str, rates: Mapping[str, Decimal], currency_setting: str, rates_setting: str
) -> None:
    """Refuse an exchange-rate table made for another reporting currency: one that gives the
    reporting currency itself a rate other than 1. (Changing the reporting currency alone left a
    table of ILS per unit in force: its USD entry ignored, every ILS amount unconverted.)"""
    rate = rates.get(reporting)
    if rate is not None and rate != 1:
        raise ValueError(
            f"{rates_setting} gives {reporting}, the reporting currency ({currency_setting}), the rate "
            f"{rate}: the rates are units of the reporting currency per unit of each other currency, "
            "so this table was made for another one"
        )


class CommonSettings(BaseSettings):
    # No inf or NaN in any setting: "inf" turned the segmenter's sweep off without a word, and an
    # interval or a window of inf failed at the first batch rather than at start.
    model_config = SettingsConfigDict(env_prefix="RETAIN_", extra="ignore", allow_inf_nan=False)

    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma separated."
    )
    topic_prefix: str = Field(default="retain.", description="Prefix of every topic name.")
    # Shared: ingest refuses an event further ahead (422), and the consumers dead-letter one
    # produced straight to Kafka, by the same bound.
    # At most a year: 1e12 ("no limit") overflowed the date arithmetic, every ingest request a 500.
    ingest_max_future_s: float = Field(
        default=86400.0,
        gt=0,
        le=366 * 86400,
        description="How far ahead of this server's clock an occurred_at may be (at most 366 days).",
    )
    partitions: int = Field(
        default=6, ge=1, le=1000, description="Partition count of every topic (same for all)."
    )
    var_dir: Path = Field(
        default=REPO_ROOT / "var", description="Where SQLite files, keys and the broker live."
    )
    api_keys_file: Path | None = Field(
        default=None, description="JSON file of hashed API keys; default <var_dir>/api_keys.json."
    )
    consumer_session_timeout_ms: int = Field(
        default=10000,
        ge=1000,
        description="How long the group waits for a silent consumer before giving its partitions away.",
    )
    consumer_fetch_max_wait_ms: int = Field(
        default=5,
        ge=0,
        le=500,
        description="How long the broker may hold a consumer's fetch to gather consumer_fetch_min_bytes.",
    )
    consumer_fetch_min_bytes: int = Field(
        default=64 * 1024, ge=1, description="What a consumer's fetch waits for, up to its max wait."
    )
    consumer_commit_interval_ms: int = Field(
        default=1000,
        ge=0,
        le=60_000,
        description="How often a busy consumer commits its offsets (0: after every batch); an idle "
        "or stopping one commits at once.",
    )
    http_max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body of the segmenter, messenger and kpi APIs (ingest: its own).",
    )
    log_level: str = Field(
        default="INFO", description="Log level of every process: DEBUG, INFO, WARNING, ERROR or CRITICAL."
    )
    log_json: bool = Field(default=False, description="Log as JSON lines instead of console.")

    @field_validator("log_level")
    @classmethod
    def _a_level_logging_knows(cls, value: str) -> str:
        # Any name Python's logging takes (WARN, fatal …), as its canonical one.
        level = logging.getLevelName(value.upper())
        if not isinstance(level, int):
            raise ValueError(f"{value!r} is not a log level: DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return str(logging.getLevelName(level))

    @property
    def max_future(self) -> timedelta:
        """``ingest_max_future_s``: ingest's bound, and the consumers' for what skips ingest."""
        return timedelta(seconds=self.ingest_max_future_s)

    @property
    def keys_path(self) -> Path:
        return self.api_keys_file or self.var_dir / "api_keys.json"

    def consumer_options(self) -> ConsumerOptions:
        """The group and fetch settings of every ``ConsumerLoop``.

        A worker's batch costs a database transaction however few records it holds, and under a
        steady trickle the workers took them one or two at a time: the segmenter and the
        messenger were each busy over half a core at 300 events/s as at 600. Letting the broker
        gather a fetch for a few milliseconds (Kafka's fetch.min.bytes / fetch.max.wait.ms)
        makes the batches larger and the machine quieter. Interleaved runs at 600 events/s
        through make bench's end-to-end pipeline: p50 91 and 119 ms → 76, 81, 83; p99 267 and
        269 → 187, 212, 248; the 2-core machine 1.92 → 1.75 cores busy (a third run before, on
        a broker still warming up, was worse still). 5 ms did as well, 20 and 40 ms worse again.
        A backlog fills the bytes at once, so catching up is not slowed.

        5 ms, not 10: once the messenger relayed from memory (shared/outbox.py) it had the CPU
        to spare, and the wait was what a record spent at each hop. make bench's end to end,
        3 rounds each, at ~900 events/s: the segmenter's hop p50 24-27 → 15-19 ms, the
        decision's p50 53-60 → 40-49 ms and p99 94-147 → 70-131 ms; the maximum sustained rate
        the same (1,897 and 1,805/s). 2 ms halved the hop again but cost an idle consumer 10%
        of a core and the broker 30%; at 5 ms an idle consumer took 5-7% and the broker 9-29%,
        at 10 ms 4-5% and 9-19% (5 s samples on this 2-core machine).

        Offsets once a second while busy, not after every batch: each commit is a round trip
        to the group coordinator that the next batch waited for. At ~950 events/s through make
        bench's end to end, commits took 14% of the segmenter loop's time and 7% of the
        messenger's (2.2 and 1.6 ms a batch); with the interval the decision's p99 went 110 and
        208 ms → 70, 74, 76 ms and its p50 49-57 → 39-41 ms. The ledgers make the longer replay
        after a crash harmless (tests/shared/kafka/test_consumer_loop.py).
        """
        return {
            "session_timeout_ms": self.consumer_session_timeout_ms,
            "fetch_max_wait_ms": self.consumer_fetch_max_wait_ms,
            "fetch_min_bytes": self.consumer_fetch_min_bytes,
            "commit_interval_ms": self.consumer_commit_interval_ms,
        }

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def sqlite_url(self, service: str) -> str:
        return f"sqlite+aiosqlite:///{self.var_dir / f'{service}.db'}"


# Every service's settings, found by name when a process starts (shared code imports no service).
SETTINGS_CLASSES = (
    "services.ingest.config:IngestSettings",
    "services.segmenter.config:SegmenterSettings",
    "services.messenger.config:MessengerSettings",
    "services.kpi.config:KpiSettings",
)
# RETAIN_* variables that are not settings: compose's, Grafana's provisioning, the scripts' and
# the tests' (tests/shared/test_config.py checks that the repository uses no other).
NOT_SETTINGS = frozenset(
    {
        "RETAIN_API_KEY",
        "RETAIN_AUDIT_ADVISORIES",
        "RETAIN_AUDIT_SOURCE",
        "RETAIN_CHAOS_CALL_LOG",
        "RETAIN_DB_PASSWORD",
        "RETAIN_DEMO_KEY",
        "RETAIN_IMAGE",
        "RETAIN_INIT_SQL",
        "RETAIN_KAFKA_VERSION",
        "RETAIN_METRICS_HOST",
        "RETAIN_METRICS_PORT",
        "RETAIN_TEST_DATABASE_URL",
        "RETAIN_UID",
    }
)
NOT_SETTINGS_PREFIXES = ("RETAIN_GRAFANA_",)


def setting_names() -> frozenset[str]:
    """The environment name of every setting of every service."""
    names: set[str] = set()
    for path in SETTINGS_CLASSES:
        module, _, name = path.partition(":")
        settings: type[BaseSettings] = getattr(importlib.import_module(module), name)
        prefix = str(settings.model_config.get("env_prefix", "")).upper()
        names.update(f"{prefix}{field.upper()}" for field in settings.model_fields)
    return frozenset(names)


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The RETAIN_* variables that no service reads, each with the setting it most likely
    misspells (None: none close). Settings ignore what they do not declare, so a typo
    (RETAIN_MESSENGER_MPS_TOLLFREE) left the default in force without a word."""
    known = setting_names()
    out: list[tuple[str, str | None]] = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("RETAIN_") or upper in known or upper in NOT_SETTINGS:
            continue
        if upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        out.append((name, close[0] if close else None))
    return out


def start_logging(settings: CommonSettings, *, api: bool = False) -> None:
    """Every process's first step: its logging, then what an operator should hear at start
    (``warn_at_start``; ``api``: a process that checks API keys)."""
    configure_logging(settings.log_level, settings.log_json)
    warn_at_start(settings, api=api)


def warn_at_start(settings: CommonSettings, *, api: bool = False) -> None:
    """Log what the settings cannot refuse but an operator would want to know at start."""
    for name, meant in unknown_variables(os.environ):
        log.warning(
            "environment variable ignored: no Retain service has this setting",
            variable=name,
            did_you_mean=meant,
        )
    if api and not settings.keys_path.exists():
        log.warning(
            "no API keys file: every request needing a key is refused (401) until one is created "
            "(retain keys create --scopes …)",
            api_keys_file=str(settings.keys_path),
        )
