"""The segmenter's HTTP API (rules for marketing, customers). Its consumer runs separately:
``python -m services.segmenter.consumer``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text

from services.segmenter.api import router
from services.segmenter.config import SegmenterSettings
from services.segmenter.consumer import MIGRATIONS
from services.segmenter.service import SegmenterService
from shared.auth import KeyStore
from shared.collector import settle_collector
from shared.config import start_logging
from shared.db import Database, migrate
from shared.http import setup_app


def create_app(settings: SegmenterSettings | None = None) -> FastAPI:
    settings = settings or SegmenterSettings()
    start_logging(settings, api=True)
    db = Database(settings.database_url)
    service = SegmenterService(db, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await migrate(db, MIGRATIONS)
        await service.ensure_default_rules()
        settle_collector()
        yield
        await db.dispose()

    app = FastAPI(
        title="Retain segmenter",
        version="1.0",
        description="Customer profiles, loyalty tiers and segments, and the segment-rules API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keys = KeyStore(settings.keys_path)
    app.state.service = service

    async def ready() -> dict[str, Any]:
        try:
            async with db.sessions() as session:
                await session.execute(text("SELECT 1"))
                version = await service.repo.published_version(session)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported by type
            return {"database": {"ok": False, "error": type(exc).__name__}}
        await service.refresh_gauges()
        return {"database": True, "rules": {"ok": version is not None, "published_version": version}}

    setup_app(app, "segmenter", ready, max_body_bytes=settings.http_max_body_bytes)
    app.include_router(router)
    return app
