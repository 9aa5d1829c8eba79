"""What every service's app gets from shared.http: URL and body guards, and an OpenAPI that
documents the errors the handlers really send."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Body, Depends, FastAPI, Request
from prometheus_client import REGISTRY

from shared.auth import ApiKey, KeyStore, create_key, require_scope
from shared.http import ApiRoute, endpoints, query_problems, repeated_keys, setup_app

LIMIT = 2048


def _store(request: Request) -> KeyStore:
    found: KeyStore = request.app.state.keys
    return found


Reader = Annotated[ApiKey, Depends(require_scope(_store, "kpi:read"))]


def _app(keys: Path) -> FastAPI:
    app = FastAPI()
    app.state.keys = KeyStore(keys)
    router = APIRouter()

    @router.get("/v1/things/{thing_id}")
    async def thing(thing_id: str, _key: Reader) -> dict[str, str]:
        return {"id": thing_id}

    @router.post("/v1/things")
    async def create(body: Annotated[dict[str, Any], Body()], _key: Reader) -> dict[str, int]:
        return {"fields": len(body)}

    @router.get("/v1/broken")
    async def broken() -> dict[str, str]:
        raise RuntimeError("a bug")

    @router.get("/v1/plain", responses={422: {"description": "Its own words: not enough data."}})
    async def plain(_key: Reader) -> dict[str, str]:
        return {}

    @router.post("/hooks/form")
    async def form(request: Request) -> dict[str, int]:
        return {"fields": len(await request.form())}

    async def ready() -> dict[str, Any]:
        return {}

    setup_app(app, "test", ready, max_body_bytes=LIMIT)
    app.include_router(router)
    return app


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, ["kpi:read"])
    transport = httpx.ASGITransport(app=_app(keys))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers={"X-API-Key": key}
    ) as http:
        yield http


async def test_a_nul_in_the_path_or_query_is_a_422_not_a_query(client: httpx.AsyncClient) -> None:
    in_path = await client.get("/v1/things/a%00b")
    in_query = await client.get("/v1/things/a", params={"q": "\x00"})
    assert (in_path.status_code, in_query.status_code) == (422, 422)
    assert in_path.json()["error"]["details"][0]["field"] == "path"
    assert "NUL" in in_query.json()["error"]["message"]
    assert (await client.get("/v1/things/a", params={"q": "%"})).status_code == 200


async def test_bodies_over_the_limit_are_413_declared_or_streamed(client: httpx.AsyncClient) -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield b'{"a": "'
        for _ in range(10):
            yield b"x" * 512
        yield b'"}'

    declared = await client.post("/v1/things", json={"a": "x" * LIMIT})
    streamed = await client.post("/v1/things", content=stream(), headers={"Content-Type": "application/json"})
    form = await client.post("/hooks/form", data={"a": "x" * LIMIT})
    for response in (declared, streamed, form):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
        assert f"limit of {LIMIT} bytes" in response.json()["error"]["message"]
    assert (await client.post("/v1/things", json={"a": "x"})).json() == {"fields": 1}


def test_the_openapi_documents_the_errors_in_their_real_shape(tmp_path: Path) -> None:
    schema = _app(tmp_path / "keys.json").openapi()
    one = schema["paths"]["/v1/things/{thing_id}"]["get"]["responses"]
    create = schema["paths"]["/v1/things"]["post"]["responses"]
    hook = schema["paths"]["/hooks/form"]["post"]["responses"]
    assert set(one) == {"200", "401", "403", "404", "422"}
    assert set(create) == {"200", "400", "401", "403", "413", "422"}
    assert set(hook) == {"200"}  # no key, no declared body: it answers for itself
    ref = one["422"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ErrorResponse"
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    # Without parameters of its own a /v1 operation still refuses unknown ones (422); an
    # operation's own words on its 422 stay.
    plain = schema["paths"]["/v1/plain"]["get"]["responses"]
    assert plain["422"]["description"] == "Its own words: not enough data."
    assert plain["422"]["content"]["application/json"]["schema"]["$ref"] == ref
    assert one["422"]["description"] == "The request is not valid; details name each problem."


def test_the_openapi_says_how_to_send_the_key_where_one_is_needed(tmp_path: Path) -> None:
    """No scheme was declared (bar ingest's, on every route, /healthz too): /docs had no
    Authorize button, and a generated client sent no key and got 401."""
    schema = _app(tmp_path / "keys.json").openapi()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <API key>",
    }
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    keyed: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    assert schema["paths"]["/v1/things/{thing_id}"]["get"]["security"] == keyed
    assert schema["paths"]["/v1/things"]["post"]["security"] == keyed
    for path in ("/healthz", "/metrics", "/hooks/form"):
        assert all("security" not in op for op in schema["paths"][path].values()), path
    assert "security" not in schema


async def test_a_body_that_is_not_json_is_a_400_as_documented(client: httpx.AsyncClient) -> None:
    cut = await client.post("/v1/things", content=b'{"a": ', headers={"Content-Type": "application/json"})
    assert cut.status_code == 400, cut.text
    assert cut.json()["error"]["code"] == "bad_request"
    assert cut.json()["error"]["message"].startswith("the body is not valid JSON: ")
    wrong = await client.post("/v1/things", json=[1, 2])  # JSON, but not the object it takes: 422
    assert wrong.status_code == 422


def test_endpoints_lists_the_routes_of_included_routers(tmp_path: Path) -> None:
    found = {(m, e.path) for e in endpoints(_app(tmp_path / "keys.json").routes) for m in e.methods}
    assert {("GET", "/v1/things/{thing_id}"), ("POST", "/hooks/form"), ("GET", "/healthz")} <= found


async def test_framework_errors_carry_the_same_codes_as_ours(client: httpx.AsyncClient) -> None:
    unknown = await client.get("/v1/nothing-here")
    unparsable = await client.post(
        "/v1/things", content=b'{"a": "\xc3"}', headers={"Content-Type": "application/json"}
    )
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")
    assert (unparsable.status_code, unparsable.json()["error"]["code"]) == (400, "bad_request")


async def test_an_unexpected_error_is_a_500_in_the_errors_shape(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    create_key(keys, ["kpi:read"])
    # As a server answers: the error goes on to it after the answer (the traceback in its log).
    transport = httpx.ASGITransport(app=_app(keys), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/v1/broken")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {"code": "internal", "message": "an unexpected error; it has been logged"}
    }


async def test_requests_are_counted_by_route_template_including_the_framework_pages(
    client: httpx.AsyncClient,
) -> None:
    def count(route: str) -> float:
        labels = {"service": "test", "route": route, "method": "GET", "status": "200"}
        return REGISTRY.get_sample_value("retain_http_requests_total", labels) or 0.0

    before = {r: count(r) for r in ("/openapi.json", "/docs", "/v1/things/{thing_id}", "unmatched")}
    not_found = {"service": "test", "route": "unmatched", "method": "GET", "status": "404"}
    missing_before = REGISTRY.get_sample_value("retain_http_requests_total", not_found) or 0.0
    for path in ("/openapi.json", "/docs", "/v1/things/c-1", "/v1/things/c-2", "/no/such/page"):
        await client.get(path)
    assert count("/openapi.json") - before["/openapi.json"] == 1
    assert count("/docs") - before["/docs"] == 1
    assert count("/v1/things/{thing_id}") - before["/v1/things/{thing_id}"] == 2  # the template, not the ids
    assert count("unmatched") == before["unmatched"]  # no 200 went unlabelled
    assert REGISTRY.get_sample_value("retain_http_requests_total", not_found) == missing_before + 1


def test_repeated_keys_are_found_at_their_paths_however_deep() -> None:
    body = b'{"a": 1, "b": [{"x": 1, "x": 2, "y": {"z": 0, "z": 0}}], "a": 3}'
    assert repeated_keys(body) == [("$", "a"), ("$.b[0]", "x"), ("$.b[0].y", "z")]
    assert repeated_keys(b'{"a": 1, "b": 2}') == []
    assert repeated_keys(b"not json") == []  # the route's own parsing names that
    assert repeated_keys(b"[" * 100_000 + b"]" * 100_000) == []  # too deep to parse: not a crash


def _window(since: str | None = None) -> str | None:
    return since


Since = Annotated[str | None, Depends(_window)]


def _paged(strict: bool) -> FastAPI:
    """An operation with its own query parameters and one from a dependency, under /v1/ and not."""
    app = FastAPI()
    setup_app(app, "test", _ready_ok)
    router = APIRouter(route_class=ApiRoute) if strict else APIRouter()

    @router.get("/v1/items")
    async def items(since: Since, limit: int = 10, cursor: str | None = None) -> dict[str, Any]:
        return {"since": since, "limit": limit, "cursor": cursor}

    @router.get("/u/{token}")
    async def page(token: str) -> dict[str, str]:
        return {"token": token}

    app.include_router(router)
    return app


async def _ready_ok() -> dict[str, Any]:
    return {}


async def test_the_json_api_refuses_query_parameters_it_does_not_take_or_takes_once() -> None:
    transport = httpx.ASGITransport(app=_paged(strict=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        ok = await http.get("/v1/items", params={"since": "2026-01-01", "limit": 5, "cursor": "c9"})
        assert ok.json() == {"since": "2026-01-01", "limit": 5, "cursor": "c9"}
        assert (await http.get("/v1/items")).status_code == 200

        misspelt = await http.get("/v1/items?offset=5&limit=2&limit=3&since=x")
        assert misspelt.status_code == 422
        assert misspelt.json()["error"]["details"] == [
            {
                "field": "query.offset",
                "message": "unknown parameter; this operation takes cursor, limit, since",
            },
            {"field": "query.limit", "message": "given 2 times; give it once"},
        ]
        # A page a customer opens from an email keeps what a link tracker added.
        tracked = await http.get("/u/t1", params={"utm_source": "newsletter"})
        assert tracked.json() == {"token": "t1"}

    # The same operation on a plain route ignored them: the default answer, as if asked for it.
    transport = httpx.ASGITransport(app=_paged(strict=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/v1/items?offset=5")).json() == {"since": None, "limit": 10, "cursor": None}


async def test_a_caller_without_a_key_is_told_so_before_what_the_operation_takes(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    _, reader = create_key(keys, ["kpi:read"], "r")
    _, other = create_key(keys, ["rules:read"], "o")
    app = FastAPI()
    app.state.keys = KeyStore(keys)
    setup_app(app, "test", _ready_ok)
    router = APIRouter(route_class=ApiRoute)

    @router.get("/v1/things")
    async def things(_key: Reader, limit: int = 10) -> dict[str, int]:
        return {"limit": limit}

    app.include_router(router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/v1/things?offset=1")).status_code == 401
        denied = await http.get("/v1/things?offset=1", headers={"Authorization": f"Bearer {other}"})
        assert denied.status_code == 403
        refused = await http.get("/v1/things?offset=1", headers={"Authorization": f"Bearer {reader}"})
        assert refused.status_code == 422
        assert [d["field"] for d in refused.json()["error"]["details"]] == ["query.offset"]


def test_query_problems_name_each_parameter_once() -> None:
    known = frozenset({"from", "to"})
    pairs = [("from", "a"), ("from", "b"), ("from", "c"), ("start", "x"), ("start", "y"), ("to", "z")]
    assert query_problems(pairs, known) == [
        {"field": "query.from", "message": "given 3 times; give it once"},
        {"field": "query.start", "message": "unknown parameter; this operation takes from, to"},
    ]
    assert query_problems([("to", "z")], known) == []
    assert query_problems([("x", "1")], frozenset()) == [
        {"field": "query.x", "message": "unknown parameter; this operation takes none"}
    ]
