"""The baseline ingest is measured against: FastAPI that only parses and validates.

``POST /v1/events`` reads the body and validates it with ingest's own
``services.ingest.batch.validate_body`` (one object or an array, ingest's largest batch), so
the same bytes take the same path as in ingest: the bench's events carry their ids, which
ingest validates straight from the bytes with pydantic's JSON parser
(``EVENT_LIST_ADAPTER.validate_json``, or ``EVENT_ADAPTER`` for one object), not with
``orjson.loads`` then ``validate_python``. It answers 202 with the ids, in the same shape as
ingest. No auth, no middleware, no Kafka. Served by uvicorn with the same flags as ingest::

    python -m uvicorn tests.bench.bare_app:create_app --factory --port 8101 --no-access-log
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.ingest.batch import BatchTooLargeError, InvalidBatchError, MalformedJsonError, validate_body
from services.ingest.config import IngestSettings


def create_app() -> FastAPI:
    app = FastAPI(title="bench: bare validating endpoint")
    max_batch = IngestSettings().ingest_max_batch  # ingest's, from the same environment

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/events", status_code=202)
    async def post_events(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            events = validate_body(body, max_batch)
        except MalformedJsonError as exc:
            return JSONResponse({"error": {"code": "bad_request", "message": str(exc)}}, status_code=400)
        except (InvalidBatchError, BatchTooLargeError) as exc:
            return JSONResponse({"error": {"code": "invalid", "message": str(exc)}}, status_code=422)
        ids = [e.event_id for e in events]
        return JSONResponse({"accepted": len(ids), "event_ids": ids, "duplicates": 0}, status_code=202)

    return app
