"""The kpi service's HTTP API (KPIs, CLV, /metrics). Its consumer runs separately:
``python -m services.kpi.consumer``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text
from starlette.types import ASGIApp, Receive, Scope, Send

from services.kpi.api import router
from services.kpi.config import KpiSettings
from services.kpi.consumer import MIGRATIONS
from services.kpi.service import KPI_GAUGES, KpiService
from shared.auth import KeyStore
from shared.collector import settle_collector
from shared.config import start_logging
from shared.db import Database, migrate
from shared.http import setup_app
from shared.logs import get_logger
from shared.metrics import expose

log = get_logger(__name__)


# How long a scrape waits for the KPI gauges to be recomputed before it is answered with the
# values as they stand: well under Prometheus's scrape_timeout (10 s in deploy/prometheus).
SCRAPE_WAIT_S = 5.0


class GaugeRefresher:
    """Recomputes the KPI gauges (at most every kpi_metrics_ttl_s) when /metrics is scraped, so
    Prometheus reads current values without a background task in the web process. A scrape
    waits for the recomputation up to ``SCRAPE_WAIT_S``, then is answered with the last values
    while it goes on: on a large history (a second for a few thousand customers), or with the
    database slow to answer, a scrape that waited for it ran past Prometheus's timeout, and the
    API read as down (RetainTargetDown) with every KPI alert blind."""

    def __init__(self, service: KpiService) -> None:
        self.service = service
        self._task: asyncio.Task[None] | None = None

    async def before_scrape(self, wait_s: float = SCRAPE_WAIT_S) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refresh())
        await asyncio.wait({self._task}, timeout=wait_s)

    async def _refresh(self) -> None:
        try:
            await self.service.refresh_gauges()
        except Exception as exc:  # noqa: BLE001 - stale gauges beat a failed scrape; logged by type
            log.warning("KPI gauges not refreshed", error=type(exc).__name__, detail=str(exc)[:300])

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class RefreshGaugesOnScrape:
    def __init__(self, app: ASGIApp, refresher: GaugeRefresher) -> None:
        self.app = app
        self.refresher = refresher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") == "/metrics":
            await self.refresher.before_scrape()
        await self.app(scope, receive, send)


def create_app(settings: KpiSettings | None = None) -> FastAPI:
    settings = settings or KpiSettings()
    start_logging(settings, api=True)
    db = Database(settings.database_url)
    service = KpiService(db, settings)
    refresher = GaugeRefresher(service)
    expose(KPI_GAUGES)  # the KPI values are the API's: computed when /metrics is scraped

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await migrate(db, MIGRATIONS)
        settle_collector()
        yield
        await refresher.stop()
        await db.dispose()

    app = FastAPI(
        title="Retain KPIs",
        version="1.0",
        description="Response time, churn, conversion of outreach and customer lifetime value. "
        "Definitions: docs/kpis.md.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keys = KeyStore(settings.keys_path)
    app.state.service = service

    async def ready() -> dict[str, Any]:
        try:
            async with db.sessions() as session:
                await session.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported by type
            return {"database": {"ok": False, "error": type(exc).__name__}}
        return {"database": True}

    setup_app(app, "kpi", ready, max_body_bytes=settings.http_max_body_bytes)
    app.add_middleware(RefreshGaugesOnScrape, refresher=refresher)
    app.include_router(router)
    return app
