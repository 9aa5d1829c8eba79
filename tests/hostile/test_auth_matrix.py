"""Every route of every service behind its scope: no key → 401, a key with any other scope → 403,
a key with the route's scope (or admin) → neither.

The expected scope of each route is written down here, not derived from the code: a route added
without an entry fails ``test_every_route_has_an_entry``. Provider webhooks (signatures,
test_webhooks.py), the links in messages (signed tokens) and the operations endpoints have their
own rules and are skipped by path.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.auth import SCOPES, KeyStore, create_key
from shared.http import endpoints
from tests.hostile.apps import SERVICES, build, dispose, prepare

SKIPPED = re.compile(r"^/(healthz|readyz|metrics|docs|redoc|openapi\.json)$|^/webhooks/|^/u/|^/s/")

SCOPE_OF: dict[str, dict[tuple[str, str], str]] = {
    "ingest": {("POST", "/v1/events"): "events:write"},
    "segmenter": {
        ("GET", "/v1/rules/draft"): "rules:read",
        ("PUT", "/v1/rules/draft"): "rules:write",
        ("POST", "/v1/rules/validate"): "rules:read",
        ("POST", "/v1/rules/preview"): "rules:read",
        ("POST", "/v1/rules/publish"): "rules:write",
        ("GET", "/v1/rules/versions"): "rules:read",
        ("GET", "/v1/rules/versions/{n}"): "rules:read",
        ("POST", "/v1/rules/rollback/{n}"): "rules:write",
        ("GET", "/v1/rules/jobs/{job_id}"): "rules:read",
        ("GET", "/v1/rules/audit"): "rules:read",
        ("GET", "/v1/customers/{customer_id}"): "rules:read",
        ("GET", "/v1/segments/{name}/customers"): "rules:read",
        ("GET", "/v1/segments"): "rules:read",
        ("GET", "/v1/tiers"): "rules:read",
    },
    "messenger": {
        ("GET", "/v1/messages"): "messages:read",
        ("GET", "/v1/waits"): "messages:read",
        ("GET", "/v1/surveys"): "messages:read",
        ("GET", "/v1/replies"): "messages:read",
        ("PUT", "/v1/surveys/{message_id}/follow-up"): "surveys:write",
        ("DELETE", "/v1/surveys/{message_id}/follow-up"): "surveys:write",
        ("PUT", "/v1/replies/{reply_id}/follow-up"): "surveys:write",
        ("DELETE", "/v1/replies/{reply_id}/follow-up"): "surveys:write",
        ("GET", "/v1/caps"): "messages:read",
        ("PUT", "/v1/caps"): "messages:write",
        ("GET", "/v1/journeys"): "messages:read",
        ("POST", "/v1/journeys"): "messages:write",
        ("GET", "/v1/journeys/{name}"): "messages:read",
        ("PUT", "/v1/journeys/{name}"): "messages:write",
        ("DELETE", "/v1/journeys/{name}"): "messages:write",
        ("POST", "/v1/journeys/{name}/pause"): "messages:write",
        ("POST", "/v1/journeys/{name}/resume"): "messages:write",
        ("GET", "/v1/journeys/{name}/stats"): "messages:read",
        ("GET", "/v1/templates"): "messages:read",
        ("POST", "/v1/templates/preview"): "messages:read",
        ("GET", "/v1/templates/{journey}/{channel}/{locale}"): "messages:read",
        ("PUT", "/v1/templates/{journey}/{channel}/{locale}"): "messages:write",
        ("DELETE", "/v1/templates/{journey}/{channel}/{locale}"): "messages:write",
    },
    "kpi": {
        ("GET", "/v1/kpis/response-time"): "kpi:read",
        ("GET", "/v1/kpis/churn"): "kpi:read",
        ("GET", "/v1/kpis/cohorts"): "kpi:read",
        ("GET", "/v1/kpis/conversion"): "kpi:read",
        ("GET", "/v1/kpis/csat"): "kpi:read",
        ("GET", "/v1/kpis/clv/summary"): "kpi:read",
        ("GET", "/v1/clv/model"): "kpi:read",
        ("GET", "/v1/customers/{customer_id}/clv"): "kpi:read",
    },
}
# Values that pass each path parameter's own validation, so a refusal can only come from auth.
PATH_VALUES = {
    "n": "1",
    "job_id": "job-1",
    "customer_id": "c1",
    "name": "win_back",
    "journey": "thank_you",
    "channel": "sms",
    "locale": "he",
    "message_id": "m1",
    "reply_id": "SM1",
}
CASES = [(service, method, path) for service, routes in SCOPE_OF.items() for method, path in routes]


def _case_id(case: tuple[str, str, str]) -> str:
    return " ".join(case)


class Stack:
    def __init__(self, clients: dict[str, httpx.AsyncClient], keys: dict[str, str]) -> None:
        self.clients = clients
        self.keys = keys  # scope (or "admin") → a key with that scope only

    async def call(self, service: str, method: str, path: str, key: str | None) -> httpx.Response:
        url = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body: dict[str, Any] | None = {} if method in ("POST", "PUT") else None
        return await self.clients[service].request(method, url, json=body, headers=headers)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp_path = tmp_path_factory.mktemp("auth-matrix")
    path = tmp_path / "keys.json"
    # Every key exists before the first request: a store re-reads its file at most once a second.
    keys = {scope: create_key(path, [scope], scope)[1] for scope in sorted(SCOPES)}
    apps = {service: build(service, tmp_path, keys=path) for service in SERVICES}
    for service, app in apps.items():
        await prepare(service, app)
    clients = {
        service: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{service}")
        for service, app in apps.items()
    }
    yield Stack(clients, keys)
    for service, app in apps.items():
        await clients[service].aclose()
        await dispose(service, app)


@pytest.mark.parametrize("service", SERVICES)
def test_every_route_has_an_entry(service: str, tmp_path: Path) -> None:
    app = build(service, tmp_path, keys=tmp_path / "keys.json")
    served = {
        (method, route.path)
        for route in endpoints(app.routes)
        for method in route.methods
        if not SKIPPED.search(route.path)
    }
    assert served == set(SCOPE_OF[service]), "a route without an expected scope, or a stale entry"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
async def test_no_key_is_401(stack: Stack, case: tuple[str, str, str]) -> None:
    response = await stack.call(*case, key=None)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    forged = await stack.call(*case, key=stack.keys[SCOPE_OF[case[0]][case[1:]]][:-2] + "xx")
    assert forged.status_code == 401, forged.text


@pytest.mark.parametrize("case", CASES, ids=_case_id)
async def test_every_other_scope_is_403(stack: Stack, case: tuple[str, str, str]) -> None:
    scope = SCOPE_OF[case[0]][case[1:]]
    for other in sorted(SCOPES - {scope, "admin"}):
        response = await stack.call(*case, key=stack.keys[other])
        assert response.status_code == 403, (other, response.text)
        assert scope in response.json()["error"]["message"]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
async def test_the_scope_or_admin_passes(stack: Stack, case: tuple[str, str, str]) -> None:
    scope = SCOPE_OF[case[0]][case[1:]]
    for key in (stack.keys[scope], stack.keys["admin"]):
        response = await stack.call(*case, key=key)
        assert response.status_code not in (401, 403), response.text
        assert response.status_code < 500, response.text


def test_keys_are_compared_in_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every presented key, known id or not, goes through hmac.compare_digest (not ==)."""
    path = tmp_path / "keys.json"
    _, plain = create_key(path, ["kpi:read"])
    compared: list[tuple[Any, Any]] = []
    real: Callable[[Any, Any], bool] = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    store = KeyStore(path)
    presented = [plain, plain[:-1] + ("A" if plain[-1] != "A" else "B"), "rk_unknown_secret", "garbage"]
    found = [store.authenticate(p) for p in presented]
    assert [k is not None for k in found] == [True, False, False, False]
    assert len(compared) == len(presented)
