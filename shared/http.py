"""What every service's HTTP app has: errors as JSON, request metrics, /healthz /readyz /metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import install_error_handlers
from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS

ReadinessCheck = Callable[[], Awaitable[dict[str, Any]]]


class MetricsMiddleware:
    """Counts requests by route template (never the raw path: ids would explode the labels)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            # Labelled children are looked up once per label set: .labels() is not free.
            key = (path, method, status)
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (
                    HTTP_REQUESTS.labels(self.service, path, method, str(status)),
                    HTTP_LATENCY.labels(self.service, path, method),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - started)


def ops_router(ready: ReadinessCheck) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz", summary="Dependencies are reachable", responses={503: {"description": "not ready"}}
    )
    async def readyz() -> JSONResponse:
        checks = await ready()
        ok = all(v is True or (isinstance(v, dict) and v.get("ok")) for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503
        )

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def setup_app(app: FastAPI, service: str, ready: ReadinessCheck) -> None:
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, service=service)
    app.include_router(ops_router(ready))
