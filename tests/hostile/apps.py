"""The four services' apps as the hostile-input tests build them: real settings, a key file of
their own, and the lifespan's work (migrations, defaults) done up front, because
httpx.ASGITransport does not run a lifespan."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from services.ingest.app import create_app as create_ingest
from services.ingest.config import IngestSettings
from services.kpi.app import create_app as create_kpi
from services.kpi.config import KpiSettings
from services.kpi.consumer import MIGRATIONS as KPI_MIGRATIONS
from services.messenger.app import create_app as create_messenger
from services.messenger.config import MessengerSettings
from services.messenger.consumer import MIGRATIONS as MESSENGER_MIGRATIONS
from services.segmenter.app import create_app as create_segmenter
from services.segmenter.config import SegmenterSettings
from services.segmenter.consumer import MIGRATIONS as SEGMENTER_MIGRATIONS
from shared.auth import create_key
from shared.db import migrate

SERVICES = ("ingest", "segmenter", "messenger", "kpi")


@dataclass(frozen=True, slots=True)
class Keys:
    path: Path

    def make(self, scopes: Iterable[str]) -> str:
        return create_key(self.path, scopes, "hostile")[1]


def sqlite_url(tmp_path: Path, service: str) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / f'{service}.db'}"


def build(
    service: str,
    tmp_path: Path,
    *,
    keys: Path,
    database_url: str | None = None,
    kafka_bootstrap: str = "127.0.0.1:1",
    topic_prefix: str = "hostile.",
    **overrides: Any,
) -> FastAPI:
    """The app of ``service``, not started: call :func:`prepare` (or run its lifespan) first."""
    common: dict[str, Any] = {
        "api_keys_file": keys,
        "var_dir": tmp_path,
        "kafka_bootstrap": kafka_bootstrap,
        "topic_prefix": topic_prefix,
        "log_level": "WARNING",
    }
    url = database_url or sqlite_url(tmp_path, service)
    if service == "ingest":
        return create_ingest(IngestSettings(**common, **overrides))
    if service == "segmenter":
        return create_segmenter(SegmenterSettings(**common, segmenter_database_url=url, **overrides))
    if service == "messenger":
        return create_messenger(
            MessengerSettings(
                **common,
                messenger_database_url=url,
                messenger_outbox_dir=str(tmp_path / "outbox"),
                **overrides,
            )
        )
    if service == "kpi":
        return create_kpi(KpiSettings(**common, kpi_database_url=url, **overrides))
    raise ValueError(f"unknown service {service!r}")


async def prepare(service: str, app: FastAPI) -> None:
    """What the lifespan does before serving, for the services that own a database."""
    state = app.state.service
    if service == "segmenter":
        await migrate(state.db, SEGMENTER_MIGRATIONS)
        await state.ensure_default_rules()
    elif service == "messenger":
        await migrate(state.db, MESSENGER_MIGRATIONS)
        await state.ensure_defaults()
    elif service == "kpi":
        await migrate(state.db, KPI_MIGRATIONS)


async def dispose(service: str, app: FastAPI) -> None:
    if service == "ingest":
        await app.state.producer.stop()
    else:
        await app.state.service.db.dispose()
