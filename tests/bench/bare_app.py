"""The baseline ingest is measured against: FastAPI that only parses and validates.

``POST /v1/events`` reads the body, parses it with orjson, wraps a single object into a list
as ingest does, validates it with the same ``EVENT_LIST_ADAPTER`` and answers 202 with the
ids, in the same shape as ingest. No auth, no middleware, no Kafka. Served by uvicorn with
the same flags as ingest::

    python -m uvicorn tests.bench.bare_app:create_app --factory --port 8101 --no-access-log
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from shared.events import EVENT_LIST_ADAPTER


def create_app() -> FastAPI:
    app = FastAPI(title="bench: bare validating endpoint")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/events", status_code=202)
    async def post_events(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return JSONResponse({"error": {"code": "bad_request", "message": str(exc)}}, status_code=400)
        items = data if isinstance(data, list) else [data]
        try:
            events = EVENT_LIST_ADAPTER.validate_python(items)
        except ValidationError as exc:
            return JSONResponse(
                {"error": {"code": "invalid", "message": str(exc.error_count())}}, status_code=422
            )
        ids = [e.event_id for e in events]
        return JSONResponse({"accepted": len(ids), "event_ids": ids, "duplicates": 0}, status_code=202)

    return app
