"""Every limit answers with a 4xx that names it, never a 5xx or unbounded memory: body and batch
size and the per-key rate on ingest, string and array lengths, rule-tree depth, template size and
render work, page sizes, and the body size of the other services (provider webhooks included,
before any signature is checked).

No broker: every request here is refused before ingest would produce anything.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.messenger.templates import MAX_LOOP_ITERATIONS, MAX_SOURCE_BYTES
from services.segmenter.rules import default_rules
from shared.conditions import DEFAULT_MAX_DEPTH, DEFAULT_MAX_NODES
from shared.events import EXAMPLES
from tests.hostile.apps import SERVICES, Keys, build, dispose, prepare

MAX_BATCH = 10
MAX_BODY = 65536
BURST = 5
BIG = 2 * 1024 * 1024  # over every service's default body limit (1 MiB)
LEAF = {"field": "orders_count", "op": "gte", "value": 1}


@dataclass
class Stack:
    http: dict[str, httpx.AsyncClient]
    key: str  # admin
    specs: dict[str, dict[str, Any]]

    async def call(self, service: str, method: str, url: str, key: str | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {key or self.key}", **kw.pop("headers", {})}
        return await self.http[service].request(method, url, headers=headers, **kw)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp_path = tmp_path_factory.mktemp("limits")
    keys = Keys(tmp_path / "keys.json")
    admin = keys.make(["admin"])
    overrides: dict[str, dict[str, Any]] = {
        "ingest": {
            "ingest_max_batch": MAX_BATCH,
            "ingest_max_body_bytes": MAX_BODY,
        }
    }
    apps = {s: build(s, tmp_path, keys=keys.path, **overrides.get(s, {})) for s in SERVICES}
    for service, app in apps.items():
        await prepare(service, app)
    clients = {
        s: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{s}")
        for s, app in apps.items()
    }
    yield Stack(clients, admin, {s: app.openapi() for s, app in apps.items()})
    for service, app in apps.items():
        await clients[service].aclose()
        await dispose(service, app)


def event(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(EXAMPLES["profile"]), **changes}


def nested(depth: int) -> dict[str, Any]:
    condition: dict[str, Any] = LEAF
    for _ in range(depth):
        condition = {"not": condition}
    return condition


def rules_with(when: dict[str, Any]) -> dict[str, Any]:
    rules = default_rules()
    rules["tiers"][0]["when"] = when
    return rules


def problems(response: httpx.Response, status: int = 422) -> list[dict[str, Any]]:
    assert response.status_code == status, response.text
    details: list[dict[str, Any]] = response.json()["error"].get("details") or []
    return details


# --- ingest ----------------------------------------------------------------------------------------


async def test_ingest_body_and_batch_size_are_413(stack: Stack) -> None:
    over_body = await stack.call(
        "ingest",
        "POST",
        "/v1/events",
        content=b" " * (MAX_BODY + 1),
        headers={"Content-Type": "application/json"},
    )
    over_batch = await stack.call("ingest", "POST", "/v1/events", json=[event()] * (MAX_BATCH + 1))
    for response, words in ((over_body, f"limit of {MAX_BODY} bytes"), (over_batch, f"at most {MAX_BATCH}")):
        assert response.status_code == 413, response.text
        assert words in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"customer_id": "c" * 129}, "customer_id"),
        ({"name": "n" * 201}, "name"),
        ({"attributes": {"note": "x" * 501}}, "attributes.note"),
        ({"attributes": {f"a{i}": i for i in range(51)}}, "attributes"),
    ],
)
async def test_ingest_string_and_array_lengths_are_422(
    stack: Stack, changes: dict[str, Any], field: str
) -> None:
    details = problems(await stack.call("ingest", "POST", "/v1/events", json=[event(), event(**changes)]))
    # An attribute value is a union: pydantic reports it once per member type it is not.
    assert {(d["index"], tuple(d["field"].split(".")[: field.count(".") + 1])) for d in details} == {
        (1, tuple(field.split(".")))
    }


async def test_ingest_purchase_items_are_bounded(stack: Stack) -> None:
    purchase = copy.deepcopy(EXAMPLES["purchase"])
    purchase["items"] = purchase["items"][:1] * 501
    body = json.dumps(purchase).encode()
    assert len(body) < MAX_BODY  # the array, not the body, is what is refused
    response = await stack.call(
        "ingest", "POST", "/v1/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert [(d["index"], d["field"]) for d in problems(response)] == [(0, "items")]


async def test_ingest_nesting_beyond_the_parser_is_400(stack: Stack) -> None:
    body = b"[" * 4000 + b"]" * 4000
    response = await stack.call(
        "ingest", "POST", "/v1/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "JSON" in response.json()["error"]["message"]


async def test_ingest_rate_limit_is_per_key_and_429(tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys.json")
    first, second = keys.make(["events:write"]), keys.make(["events:write"])
    app = build(
        "ingest", tmp_path, keys=keys.path, ingest_rate_limit_per_s=0.01, ingest_rate_limit_burst=BURST
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as http:

        async def post(key: str) -> httpx.Response:
            return await http.post("/v1/events", json=[], headers={"Authorization": f"Bearer {key}"})

        statuses = [(await post(first)).status_code for _ in range(BURST + 2)]
        refused = await post(first)
        other = await post(second)
    await dispose("ingest", app)

    assert statuses == [422] * BURST + [429, 429]  # the empty batch is refused after the limit
    assert int(refused.headers["Retry-After"]) >= 1
    assert "rate limit of 0.01 requests/s" in refused.json()["error"]["message"]
    assert other.status_code == 422  # another key's bucket is its own


# --- segmenter ----------------------------------------------------------------------------------------


async def test_rule_tree_depth_is_422_with_the_path(stack: Stack) -> None:
    too_deep = rules_with(nested(DEFAULT_MAX_DEPTH))  # the leaf is one level below the last `not`
    put = await stack.call("segmenter", "PUT", "/v1/rules/draft", json=too_deep)
    [problem] = problems(put)
    assert problem["path"] == "$.tiers[0].when" + ".not" * DEFAULT_MAX_DEPTH
    assert f"deeper than {DEFAULT_MAX_DEPTH}" in problem["message"]
    checked = (await stack.call("segmenter", "POST", "/v1/rules/validate", json=too_deep)).json()
    assert checked["valid"] is False
    assert [e["path"] for e in checked["errors"]] == [problem["path"]]
    assert (
        await stack.call(
            "segmenter", "PUT", "/v1/rules/draft", json=rules_with(nested(DEFAULT_MAX_DEPTH - 1))
        )
    ).status_code == 200


async def test_rule_tree_size_and_parser_depth_are_4xx(stack: Stack) -> None:
    wide = rules_with({"any": [LEAF] * DEFAULT_MAX_NODES})
    [problem] = problems(await stack.call("segmenter", "POST", "/v1/rules/preview", json=wide))
    assert problem["path"] == "$.tiers[0].when"
    assert f"at most {DEFAULT_MAX_NODES}" in problem["message"]
    deepest = (
        b'{"tiers": [{"name": "x", "when": ' + b'{"not": ' * 5000 + b"{}" + b"}" * 5002 + b', "segments": []}'
    )
    response = await stack.call(
        "segmenter",
        "POST",
        "/v1/rules/validate",
        content=deepest,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda r: r["tiers"][0].update(name="n" * 65), "$.tiers[0].name"),
        (lambda r: r["tiers"][0].update(description="d" * 501), "$.tiers[0].description"),
        (lambda r: r["tiers"].extend(copy.deepcopy(r["tiers"][-1:]) * 17), "$.tiers"),
        (lambda r: r["segments"].extend(copy.deepcopy(r["segments"][-1:]) * 192), "$.segments"),
    ],
)
async def test_rule_lengths_are_422_with_the_path(stack: Stack, change: Any, path: str) -> None:
    rules = default_rules()
    change(rules)
    details = problems(await stack.call("segmenter", "PUT", "/v1/rules/draft", json=rules))
    assert path in [d["path"] for d in details]


# --- messenger templates and journeys --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("x" * (MAX_SOURCE_BYTES + 1) + " {{ unsubscribe_url }}", f"may have {MAX_SOURCE_BYTES}"),
        (
            "{% for i in range(1000) %}{% for j in range(1000) %}.{% endfor %}{% endfor %}"
            "{{ unsubscribe_url }}",
            f"more than {MAX_LOOP_ITERATIONS} iterations",
        ),
        ("{{ 'x' * 100000000 }}{{ unsubscribe_url }}", "repetition beyond"),
        ("{{ 2 ** 100000 }}{{ unsubscribe_url }}", "too large"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}{{ unsubscribe_url }}", "not allowed"),
    ],
    ids=["size", "loops", "repetition", "power", "recursion"],
)
async def test_huge_or_looping_templates_are_422_and_not_saved(stack: Stack, text: str, words: str) -> None:
    url = "/v1/templates/thank_you/sms/en"
    details = problems(await stack.call("messenger", "PUT", url, json={"text": text}))
    assert [d["path"] for d in details] == ["$.text"]
    assert words in details[0]["message"]
    assert (await stack.call("messenger", "GET", url)).json()["overridden"] is False


async def test_journey_condition_depth_is_422_with_the_path(stack: Stack) -> None:
    journey = {"name": "deep", "trigger": {"event": "purchase"}, "template": "thank_you"}
    details = problems(
        await stack.call("messenger", "POST", "/v1/journeys", json={**journey, "entry": nested(40)})
    )
    assert [d["path"] for d in details] == ["$.entry" + ".not" * DEFAULT_MAX_DEPTH]


@pytest.mark.parametrize(
    ("service", "url", "field"),
    [
        ("segmenter", "/v1/customers/" + "c" * 129, "path.customer_id"),
        ("segmenter", "/v1/rules/publish?note=" + "n" * 501, "query.note"),
        ("messenger", "/v1/messages?customer_id=" + "c" * 129, "query.customer_id"),
        ("messenger", "/v1/waits?customer_id=" + "c" * 129, "query.customer_id"),
        ("messenger", "/v1/surveys?customer_id=" + "c" * 129, "query.customer_id"),
        ("messenger", "/v1/journeys/" + "j" * 65, "path.name"),
        ("kpi", "/v1/customers/" + "c" * 129 + "/clv", "path.customer_id"),
    ],
)
async def test_long_strings_in_urls_are_422(stack: Stack, service: str, url: str, field: str) -> None:
    method = "POST" if "publish" in url else "GET"
    details = problems(await stack.call(service, method, url, headers={"If-Match": '"x"'}))
    assert field in [d["field"] for d in details]


@pytest.mark.parametrize(("inbox", "key"), [("surveys", "message_id"), ("replies", "reply_id")])
async def test_a_follow_up_names_what_is_too_long(stack: Stack, inbox: str, key: str) -> None:
    url = f"/v1/{inbox}/" + "m" * 65 + "/follow-up"
    for method in ("PUT", "DELETE"):
        details = problems(await stack.call("messenger", method, url, json={} if method == "PUT" else None))
        assert f"path.{key}" in [d["field"] for d in details], method
    note = problems(
        await stack.call("messenger", "PUT", f"/v1/{inbox}/m1/follow-up", json={"note": "n" * 2001})
    )
    assert [d["field"] for d in note] == ["body.note"]


async def test_caps_are_bounded(stack: Stack) -> None:
    caps = [{"name": f"c{i}", "scope": "global", "limit": 1, "window": 7} for i in range(101)]
    details = problems(await stack.call("messenger", "PUT", "/v1/caps", json={"caps": caps}))
    assert [d["field"] for d in details] == ["caps"]


# --- pages ---------------------------------------------------------------------------------------------


PAGINATED = {
    ("segmenter", "/v1/rules/audit", "limit"),
    ("segmenter", "/v1/segments/{name}/customers", "limit"),
    ("segmenter", "/v1/rules/preview", "sample"),
    ("messenger", "/v1/messages", "limit"),
    ("messenger", "/v1/waits", "limit"),
    ("messenger", "/v1/surveys", "limit"),
    ("messenger", "/v1/replies", "limit"),
}


def page_parameters(
    specs: dict[str, dict[str, Any]],
) -> dict[tuple[str, str, str], tuple[str, dict[str, Any]]]:
    found = {}
    for service, spec in specs.items():
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "query" and parameter["name"] in ("limit", "sample"):
                        found[(service, path, parameter["name"])] = (method.upper(), parameter["schema"])
    return found


async def test_every_page_size_has_a_maximum_and_past_it_is_422(stack: Stack) -> None:
    found = page_parameters(stack.specs)
    assert set(found) == PAGINATED
    for (service, path, name), (method, schema) in found.items():
        url = path.replace("{name}", "loyal")
        assert "maximum" in schema, (service, path, name)
        for size in (schema["maximum"] + 1, -1, 10**12):
            response = await stack.call(service, method, url, params={name: size})
            assert f"query.{name}" in [d["field"] for d in problems(response)], (service, path, size)
        within = await stack.call(service, method, url, params={name: schema["maximum"]})
        assert within.status_code < 400, within.text


# --- body size everywhere -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "method", "url", "content_type"),
    [
        ("segmenter", "PUT", "/v1/rules/draft", "application/json"),
        ("segmenter", "POST", "/v1/rules/validate", "application/json"),
        ("messenger", "PUT", "/v1/caps", "application/json"),
        ("messenger", "PUT", "/v1/templates/thank_you/sms/en", "application/json"),
        ("messenger", "POST", "/webhooks/sendgrid/events", "application/json"),
        ("messenger", "POST", "/webhooks/twilio/inbound", "application/x-www-form-urlencoded"),
    ],
)
async def test_bodies_over_the_limit_are_413_everywhere(
    stack: Stack, service: str, method: str, url: str, content_type: str
) -> None:
    """Before any key or signature is looked at for the webhooks: the body is read first."""

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: refused as it arrives
        for _ in range(BIG // 65536 + 1):
            yield b"a" * 65536

    for body in (b"a" * BIG, streamed()):
        response = await stack.call(
            service, method, url, content=body, headers={"Content-Type": content_type}
        )
        assert response.status_code == 413, response.text
        assert "limit of 1048576 bytes" in response.json()["error"]["message"]
