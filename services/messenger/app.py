"""The messenger's HTTP API: messages and their reasons, caps, journeys, templates, and the
providers' callbacks. The consumer and the sender run as their own processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text

from services.messenger.admin_api import router as admin_router
from services.messenger.api import router
from services.messenger.config import MessengerSettings
from services.messenger.consumer import MIGRATIONS
from services.messenger.service import REFRESHED_GAUGES, MessengerService
from shared.auth import KeyStore
from shared.collector import settle_collector
from shared.config import start_logging
from shared.db import Database, migrate
from shared.http import setup_app
from shared.metrics import expose


def create_app(settings: MessengerSettings | None = None) -> FastAPI:
    settings = settings or MessengerSettings()
    start_logging(settings, api=True)
    db = Database(settings.database_url)
    service = MessengerService(db, settings)
    expose(REFRESHED_GAUGES)  # refreshed on /readyz, as by the sender; not by the consumer

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await migrate(db, MIGRATIONS)
        await service.ensure_defaults()
        settle_collector()
        yield
        await db.dispose()

    app = FastAPI(
        title="Retain messenger",
        version="1.0",
        description="Personal messages on the customer's channel, within caps, quiet hours and consent.",
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
        await service.refresh_gauges()
        return {"database": True}

    setup_app(app, "messenger", ready, max_body_bytes=settings.http_max_body_bytes)
    app.include_router(router)
    app.include_router(admin_router)
    return app
