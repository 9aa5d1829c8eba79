"""The kpi service's HTTP API (KPIs, CLV, /metrics). Its consumer runs separately:
``python -m services.kpi.consumer``."""

from __future__ import annotations

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


class RefreshGaugesOnScrape:
    """Recomputes the KPI gauges (at most every kpi_metrics_ttl_s) before /metrics answers, so
    Prometheus reads current values without a background task in the web process."""

    def __init__(self, app: ASGIApp, service: KpiService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") == "/metrics":
            try:
                await self.service.refresh_gauges()
            except Exception as exc:  # noqa: BLE001 - stale gauges beat a failed scrape; logged by type
                log.warning("KPI gauges not refreshed", error=type(exc).__name__, detail=str(exc)[:300])
        await self.app(scope, receive, send)


def create_app(settings: KpiSettings | None = None) -> FastAPI:
    settings = settings or KpiSettings()
    start_logging(settings, api=True)
    db = Database(settings.database_url)
    service = KpiService(db, settings)
    expose(KPI_GAUGES)  # the KPI values are the API's: computed when /metrics is scraped

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await migrate(db, MIGRATIONS)
        settle_collector()
        yield
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
    app.add_middleware(RefreshGaugesOnScrape, service=service)
    app.include_router(router)
    return app
