"""What every service's HTTP app has: errors as JSON, request metrics, /healthz /readyz /metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, iter_route_contexts
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import ScopeRequirement
from shared.errors import ErrorResponse, InvalidInputError, error_body, install_error_handlers
from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS

ReadinessCheck = Callable[[], Awaitable[dict[str, Any]]]


class MetricsMiddleware:
    """Counts requests by route template (never the raw path: ids would explode the labels)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._endpoint_paths: dict[Any, str] = {}

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
            path = self._route_path(scope)
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

    def _route_path(self, scope: Scope) -> str:
        """The template of the route that answered ("/v1/customers/{customer_id}"), never the raw
        path: customer ids in a label would grow the series without bound."""
        path = getattr(scope.get("route"), "path", None)
        if path is not None:
            return str(path)
        # FastAPI's own pages (/openapi.json, /docs) are plain Starlette routes, which leave only
        # their endpoint in the scope; without this they were counted as "unmatched".
        endpoint, router = scope.get("endpoint"), scope.get("router")
        if endpoint is None or router is None:
            return "unmatched"
        found = self._endpoint_paths.get(endpoint)
        if found is None:
            found = next(
                (str(r.path) for r in router.routes if getattr(r, "endpoint", None) is endpoint), "unmatched"
            )
            self._endpoint_paths[endpoint] = found
        return found


class RefuseNulInUrl:
    """A NUL character (%00) in the path or the query would reach a query as text PostgreSQL
    refuses, a 500 deep in a repository; it is refused here, before routing, as a 422."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            where = (
                "path"
                if "\x00" in scope.get("path", "")
                else "query"
                if b"%00" in scope.get("query_string", b"")
                else None
            )
            if where is not None:
                message = f"a NUL character (%00) is not allowed in the {where}"
                body = error_body("invalid", message, [{"field": where, "message": message}])
                await JSONResponse(body, status_code=422)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413, by its Content-Length or as it
    streams in, so no route holds more than that in memory (uvicorn sets no limit at all)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the body is larger than the limit of {self.limit} bytes"
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            body = error_body("payload_too_large", message)
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.limit:
                    # An HTTPException: FastAPI turns any other error raised while it reads a
                    # body into a 400 "There was an error parsing the body".
                    raise StarletteHTTPException(413, message)
            return event

        await self.app(scope, limited, send)


class _Object(dict[str, Any]):
    """A JSON object as parsed, with the keys it was given more than once."""

    repeated: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    found = _Object(pairs)
    if len(found) < len(pairs):
        seen: set[str] = set()
        repeated: list[str] = []
        for key, _ in pairs:
            if key in seen:
                repeated.append(key)
            seen.add(key)
        found.repeated = tuple(repeated)
    return found


def repeated_keys(body: bytes) -> list[tuple[str, str]]:
    """(JSON path, key) of each key given twice in one object of ``body``; none for a body
    that is not JSON (the route's own parsing says what is wrong with it)."""
    try:
        value = json.loads(body, object_pairs_hook=_object)
    except (ValueError, RecursionError):
        return []
    found: list[tuple[str, str]] = []
    stack: list[tuple[Any, str]] = [(value, "$")]
    while stack:  # a loop: the JSON may be nested as deep as the parser allowed
        item, path = stack.pop()
        if isinstance(item, _Object):
            found += [(path, key) for key in item.repeated]
            stack += [(child, f"{path}.{key}") for key, child in reversed(item.items())]
        elif isinstance(item, list):
            stack += [(child, f"{path}[{i}]") for i, child in reversed(list(enumerate(item)))]
    return found


async def unique_json_keys(request: Request) -> None:
    """Refuse (422, each at its JSON path) a JSON body with a key given twice in one object:
    parsed, the last one wins and the first is dropped without a word (a segment's two ``all``
    lists, a leaf's two ``value``s), so what is stored is not what was written. For the APIs
    people write JSON for by hand: rules, journeys, caps, templates."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        return  # as FastAPI reads JSON: application/json and application/*+json
    found = repeated_keys(await request.body())
    if found:
        raise InvalidInputError(
            "a key is given twice in one JSON object: only the last would be kept; give each key once",
            details=[{"path": path, "message": f"{key!r} is given more than once"} for path, key in found],
        )


# A parameter of the endpoints taking JSON written by hand, after their key's: an unknown key
# is a 401 before its body is judged.
UniqueKeys = Annotated[None, Depends(unique_json_keys)]


def if_match_etag(value: str | None) -> str | None:
    """The ETag an If-Match header names (a weak W/ prefix and the quotes stripped); None
    without the header. ``*`` comes back as ``*``: what it matches is the endpoint's call."""
    return None if value is None else value.strip().removeprefix("W/").strip('"')


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


def query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameters an operation takes, its dependencies' included, by their names in
    the URL (aliases)."""
    names = {f.alias for f in dependant.query_params}
    for sub in dependant.dependencies:
        names |= query_names(sub)
    return frozenset(names)


def scope_requirements(dependant: Dependant) -> list[ScopeRequirement]:
    """The API-key checks of an operation, its dependencies' included."""
    found = [d.call for d in dependant.dependencies if isinstance(d.call, ScopeRequirement)]
    for sub in dependant.dependencies:
        found += scope_requirements(sub)
    return found


def query_error(request: Request, known: frozenset[str]) -> InvalidInputError | None:
    """The 422 of a request whose query string has parameters the operation does not take, or
    takes once and was given more often (``query_problems``); None when it has none."""
    if not request.scope.get("query_string"):
        return None
    problems = query_problems(request.query_params.multi_items(), known)
    return InvalidInputError("the request is not valid", details=problems) if problems else None


def query_problems(pairs: Sequence[tuple[str, str]], known: frozenset[str]) -> list[dict[str, str]]:
    """Each query parameter the operation does not take, and each given more than once (none
    of ours is a list): a misspelt ``form=`` or an ``offset=`` for paging was ignored, a 200 with
    the default answer (the last 30 days; the first page for ever), and of ``from`` given twice
    the last won."""
    counts: dict[str, int] = {}
    for name, _ in pairs:
        counts[name] = counts.get(name, 0) + 1
    takes = f"this operation takes {', '.join(sorted(known))}" if known else "this operation takes none"
    problems: list[dict[str, str]] = []
    for name, n in counts.items():
        if name not in known:
            problems.append({"field": f"query.{name}", "message": f"unknown parameter; {takes}"})
        elif n > 1:
            problems.append({"field": f"query.{name}", "message": f"given {n} times; give it once"})
    return problems


class ApiRoute(APIRoute):
    """A route of the JSON API (``/v1/…``), which refuses, 422 naming them, query parameters it
    does not take or takes once but was given more often (``query_problems``). Pages and
    webhooks (``/u/…``, ``/s/…``, ``/webhooks/…``) take what link trackers and providers add."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not self.path.startswith("/v1/"):
            return handler
        known = query_names(self.dependant)
        requirements = scope_requirements(self.dependant)

        async def strict(request: Request) -> Response:
            if (error := query_error(request, known)) is not None:
                # A caller without a key, or without the scope, is told that first (401, 403),
                # not what the operation takes.
                for requirement in requirements:
                    await requirement(request)
                raise error
            return await handler(request)

        return strict


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One API route as the app serves it (an included router's prefix and dependencies applied)."""

    path: str
    methods: frozenset[str]
    dependant: Dependant
    include_in_schema: bool


def endpoints(routes: Sequence[BaseRoute]) -> Iterator[Endpoint]:
    """Every API route of ``routes``, those of included routers too (``app.routes`` lists an
    included router as one entry)."""
    for context in iter_route_contexts(routes):
        if isinstance(context.original_route, APIRoute):
            yield Endpoint(
                path=str(context.path_format),
                methods=frozenset(context.methods or ()),
                dependant=context.dependant,
                include_in_schema=bool(context.include_in_schema),
            )


def _error(description: str) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


# An operation that needs an API key, as the OpenAPI says it: either scheme of document_errors.
KEY_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]


def document_errors(schema: dict[str, Any], routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """Declare in the OpenAPI the errors every operation can answer, in the one shape the error
    handlers give them: 400 (a body that is not JSON), 401/403 (key missing or without the
    scope), 404 (an id in the path that names nothing) and 422 (FastAPI documents its own
    ``{"detail": …}`` shape, which this API never sends)."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    # How a key is sent (shared.auth): the Authorize button of /docs, and what clients generate.
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    generic = "The request is not valid; details name each problem."
    for route in endpoints(routes):
        if not route.include_in_schema:
            continue
        for method in route.methods:
            operation = schema["paths"].get(route.path, {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            # Every /v1 operation refuses query parameters it does not take (ApiRoute).
            if "422" in responses or route.path.startswith("/v1/"):
                # An operation's own words on its 422 stay (FastAPI's default says nothing).
                said = responses.get("422", {}).get("description")
                responses["422"] = _error(generic if said in (None, "Validation Error") else said)
            if "requestBody" in operation:
                responses.setdefault("400", _error("The body is not JSON."))
                responses.setdefault("413", _error("The body is over the size limit."))
            if any(p.get("in") == "path" for p in operation.get("parameters", [])):
                responses.setdefault("404", _error("Nothing is found under this path."))
            if scope_requirements(route.dependant):
                operation["security"] = KEY_SECURITY
                responses.setdefault("401", _error("No API key, or not a valid one."))
                responses.setdefault("403", _error("The API key lacks the scope of this operation."))
    if "HTTPValidationError" not in str(schema["paths"]):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    return schema


def setup_app(
    app: FastAPI, service: str, ready: ReadinessCheck, *, max_body_bytes: int | None = None
) -> None:
    """Errors, metrics, ops routes and the documented errors; ``max_body_bytes`` bounds every
    request body (None: the app's routes bound their own)."""
    install_error_handlers(app)
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(RefuseNulInUrl)
    app.add_middleware(MetricsMiddleware, service=service)
    app.include_router(ops_router(ready))
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(build_openapi(), app.routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
