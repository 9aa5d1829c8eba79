"""The ingest service: HTTP in, Kafka out. It owns nothing but the producer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import Receive, Scope, Send

from services.ingest.api import _BODY, PATH, EventsEndpoint, router
from services.ingest.config import IngestSettings
from services.ingest.dedupe import RecentIds
from services.ingest.schemas import events_request_body
from services.ingest.service import IngestService
from shared.auth import KeyStore
from shared.collector import settle_collector
from shared.config import start_logging
from shared.http import document_errors, setup_app
from shared.kafka.producer import BrokerUnavailableError, Producer
from shared.ratelimit import RateLimiter
from shared.topics import ALL_TOPICS


class IngestApp(FastAPI):
    """FastAPI, with ``POST /v1/events`` served by its endpoint directly (see api.py).

    Only a request the FastAPI route would get unchanged takes the short way: no query string
    (the URL checks of shared/http.py have nothing to look at) and no root path. The metrics
    the middleware records for every other route, the endpoint records itself; FastAPI's own
    OpenTelemetry instrumentation, which Retain does not use, does not see it.
    """

    events: EventsEndpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == PATH
            and scope["method"] == "POST"
            and not scope.get("query_string")
            and not scope.get("root_path")
        ):
            await self.events(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    start_logging(settings, api=True)
    producer = Producer(
        settings.kafka_bootstrap, client_id="retain-ingest", ack_timeout_s=settings.ingest_ack_timeout_s
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The producer starts on first use too; starting here only warms it up.
        # Kafka may be down at start: the service still serves /healthz and 503s until it is back.
        with contextlib.suppress(BrokerUnavailableError):
            await producer.start()
        settle_collector()  # the modules, the app, its validators and the Kafka client are built
        yield
        await producer.stop()

    app = IngestApp(
        title="Retain ingest",
        version="1.0",
        description="Takes purchase, support, cancellation and profile events and puts them on Kafka.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keys = KeyStore(settings.keys_path)
    app.state.limiter = RateLimiter(settings.ingest_rate_limit_per_s, settings.ingest_rate_limit_burst)
    app.state.producer = producer
    app.state.service = IngestService(
        producer,
        topic_prefix=settings.topic_prefix,
        max_batch=settings.ingest_max_batch,
        recent=RecentIds(settings.ingest_dedupe_ttl_s, settings.ingest_dedupe_max_ids),
        max_future=settings.max_future,
    )
    app.events = app.state.events = EventsEndpoint(
        settings, app.state.keys, app.state.limiter, app.state.service
    )
    ready_cache: dict[str, Any] = {"at": 0.0, "checks": None}

    async def ready() -> dict[str, Any]:
        if ready_cache["checks"] is not None and time.monotonic() - ready_cache["at"] < 2.0:
            return dict(ready_cache["checks"])
        checks: dict[str, Any] = {}
        try:
            topics = await asyncio.wait_for(producer.topics(), 5.0)
            wanted = {f"{settings.topic_prefix}{t}" for t in ALL_TOPICS}
            missing = sorted(wanted - topics)
            checks["kafka"] = True
            checks["topics"] = {"ok": not missing, "missing": missing}
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported by type
            checks["kafka"] = {"ok": False, "error": type(exc).__name__}
        ready_cache.update(at=time.monotonic(), checks=checks)
        return checks

    # The events route first: every request is matched against the routes in order.
    for route in router.routes:
        app.router.routes.append(route)
    setup_app(app, "ingest", ready)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(_BODY["defs"])
            # The batch's bound as this deployment sets it (the route's body has the default).
            body = events_request_body(settings.ingest_max_batch)["requestBody"]
            schema["paths"][PATH]["post"]["requestBody"] = body
            # The key schemes, per operation that needs one (not /healthz, /metrics): document_errors.
            app.openapi_schema = document_errors(schema, app.routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
