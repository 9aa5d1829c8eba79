"""POST /v1/events through the real broker: what lands, what is refused, what is retried."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from services.ingest.app import create_app
from services.ingest.config import IngestSettings
from shared.auth import create_key
from shared.codec import decode_event
from shared.events import EXAMPLES
from shared.topics import ALL_TOPICS
from tests.support.infra import KafkaHandle
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration

BACKEND_TOPICS = ("profiles", "purchases", "support", "cancellations")


class Client:
    def __init__(
        self, http: httpx.AsyncClient, key: str, prefix: str, bootstrap: str, app: Any = None
    ) -> None:
        self.http = http
        self.app = app
        self.key = key
        self.prefix = prefix
        self.bootstrap = bootstrap

    async def post(self, body: Any, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        headers.update(kw.pop("headers", {}))
        return await self.http.post("/v1/events", json=body, headers=headers, **kw)

    async def landed(self) -> list[Any]:
        return await read_all(self.bootstrap, [self.prefix + t for t in BACKEND_TOPICS])


async def _client(kafka: KafkaHandle, prefix: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[Client]:
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, ["events:write"], "test")
    settings = IngestSettings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=prefix,
        api_keys_file=keys,
        var_dir=tmp_path,
        **overrides,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as http:
        app.state.keys_path = keys
        yield Client(http, key, prefix, kafka.bootstrap, app)
    await app.state.producer.stop()


@pytest.fixture
async def client(kafka: KafkaHandle, topic_prefix: str, tmp_path: Path) -> AsyncIterator[Client]:
    async for c in _client(kafka, topic_prefix, tmp_path):
        yield c


def _event(kind: str, customer: str, n: int, **extra: Any) -> dict[str, Any]:
    return {**EXAMPLES[kind], "event_id": f"{kind}-{customer}-{n}", "customer_id": customer, **extra}


async def test_good_batch_lands_on_the_right_topics_keyed_and_ordered(client: Client) -> None:
    batch = [_event("profile", "c1", 0), _event("purchase", "c1", 1), _event("support", "c2", 2)]
    batch += [_event("purchase", "c1", i, order_id=f"o{i}") for i in range(3, 13)]
    batch += [_event("cancellation", "c2", 13)]
    anonymous = {k: v for k, v in EXAMPLES["purchase"].items() if k != "event_id"}
    batch.append(anonymous)

    response = await client.post(batch)

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] == len(batch)
    assert body["duplicates"] == 0
    assert body["event_ids"][:-1] == [e["event_id"] for e in batch[:-1]]
    assert uuid.UUID(body["event_ids"][-1])  # assigned where absent

    records = await client.landed()
    assert len(records) == len(batch)
    by_id = {decode_event(r.value).event_id: r for r in records}
    assert set(by_id) == set(body["event_ids"])
    for sent in batch[:-1]:
        record = by_id[sent["event_id"]]
        assert (
            record.topic
            == client.prefix
            + {
                "profile": "profiles",
                "purchase": "purchases",
                "support": "support",
                "cancellation": "cancellations",
            }[sent["type"]]
        )
        assert record.key == sent["customer_id"].encode()
    c1_purchases = sorted(
        (r for r in records if r.key == b"c1" and r.topic.endswith("purchases")), key=lambda r: r.offset
    )
    assert [decode_event(r.value).event_id for r in c1_purchases] == [
        e["event_id"] for e in batch[1:2] + batch[3:13]
    ]
    assert len({r.partition for r in c1_purchases}) == 1


async def test_resend_is_answered_without_producing_again(client: Client) -> None:
    batch = [_event("purchase", "c9", i, order_id=f"o{i}") for i in range(5)]
    first = await client.post(batch)
    again = await client.post(batch)
    assert first.status_code == again.status_code == 202
    assert again.json()["duplicates"] == 5
    assert again.json()["event_ids"] == first.json()["event_ids"]
    assert len(await client.landed()) == 5


async def test_same_id_twice_in_one_batch_is_produced_once(client: Client) -> None:
    event = _event("support", "c3", 1)
    response = await client.post([event, event])
    assert response.status_code == 202
    assert response.json()["duplicates"] == 1
    assert len(await client.landed()) == 1


async def test_one_id_on_two_different_events_in_one_batch_is_refused_not_dropped(client: Client) -> None:
    first = _event("purchase", "c3", 1)
    other = {**_event("purchase", "c3", 2, order_id="o-other"), "event_id": first["event_id"]}
    response = await client.post([first, _event("support", "c3", 1), other])
    assert response.status_code == 422, response.text
    [detail] = response.json()["error"]["details"]
    assert (detail["index"], detail["field"]) == (2, "event_id")
    assert "is also that of item 0, a different event" in detail["message"]
    assert await client.landed() == []


async def test_every_problem_of_a_batch_is_in_one_answer_the_id_clashes_too(client: Client) -> None:
    """A clash of ids within the request came only on the next try, after the schema errors
    (and a time error hid it as well): the 422 lists each, by index."""
    first = _event("purchase", "c3", 1)
    clash = {**first, "amount": "2"}
    negative = {**_event("purchase", "c3", 3, order_id="o-3"), "amount": "-1"}
    ahead = _event("support", "c3", 4, occurred_at="2999-01-01T00:00:00Z")
    for batch, expected in (
        ([first, clash, negative], [(1, "event_id"), (2, "amount")]),
        ([first, clash, ahead], [(1, "event_id"), (2, "occurred_at")]),
    ):
        response = await client.post(batch)
        assert response.status_code == 422, response.text
        details = response.json()["error"]["details"]
        assert [(d["index"], d["field"]) for d in details] == expected
    assert await client.landed() == []


async def test_control_and_invisible_characters_are_refused_however_the_json_writes_them(
    client: Client,
) -> None:
    """Escaped (json.dumps: \\u200b, \\u0007) or as UTF-8 (orjson): the look of the body that
    spares the walk of the characters must not spare these."""
    auth = {"Authorization": f"Bearer {client.key}", "Content-Type": "application/json"}
    bad = [_event("profile", "c\u200b1", 1), {**_event("profile", "c2", 2), "name": "Noa\x07"}]
    for body in (json.dumps(bad).encode(), orjson.dumps(bad)):
        response = await client.http.post("/v1/events", content=body, headers=auth)
        assert response.status_code == 422, response.text
        details = [(d["index"], d["field"]) for d in response.json()["error"]["details"]]
        assert details == [(0, "event_id"), (0, "customer_id"), (1, "name")]
    assert await client.landed() == []


async def test_an_id_used_earlier_for_another_event_is_refused_with_409_not_dropped(client: Client) -> None:
    # A backend that names its events by order: the purchase, then the refund of the same order
    # under the same id. Answered 202 as a duplicate, the refund was lost without a word.
    purchase = _event("purchase", "c4", 1, order_id="o-77")
    assert (await client.post(purchase)).status_code == 202
    refund = {**purchase, "amount": "0", "occurred_at": "2026-05-02T09:00:00+03:00"}
    fresh = _event("support", "c4", 2)
    response = await client.post([fresh, refund])
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "conflict"
    assert "nothing was accepted" in error["message"]
    [detail] = error["details"]
    assert (detail["index"], detail["field"]) == (1, "event_id")
    assert "'purchase-c4-1' was accepted in the last 24 hours for a different event" in detail["message"]
    # Refused whole: the support event of the same request did not land either; the purchase
    # resent as it was is still a duplicate.
    again = await client.post([purchase, fresh])
    assert again.status_code == 202, again.text
    assert again.json()["duplicates"] == 1
    landed = sorted(decode_event(r.value).event_id for r in await client.landed())
    assert landed == ["purchase-c4-1", "support-c4-2"]


IN_FIVE_YEARS = (datetime.now(UTC) + timedelta(days=5 * 365)).isoformat()


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (
            [_event("purchase", "c1", 1), {**_event("purchase", "c1", 2), "amount": "-5"}],
            422,
            "greater than or equal",
        ),
        ({**_event("profile", "c1", 1), "timezone": "Mars/Olympus"}, 422, "IANA"),
        ({**_event("support", "c1", 1), "occurred_at": "2026-11-22T10:00:00"}, 422, "timezone"),
        ({**_event("support", "c1", 1), "type": "refund"}, 422, "'type' must be one of"),
        ([], 422, "empty"),
        # A year typed wrong either way: applied, it would be the customer's last purchase for
        # years, or their first.
        (
            [
                _event("purchase", "c1", 1),
                {**_event("purchase", "c1", 2), "occurred_at": IN_FIVE_YEARS},
            ],
            422,
            "is in the future",
        ),
        ({**_event("purchase", "c1", 1), "occurred_at": "1900-01-01T00:00:00Z"}, 422, "not after 1970"),
        ({**_event("support", "c1", 1), "occurred_at": "1970-01-01T00:00:00Z"}, 422, "a zero timestamp"),
        ({**_event("profile", "c1", 1), "attributes": {"tags": ["vip"]}}, 422, "flat values only"),
    ],
)
async def test_invalid_events_reject_the_whole_batch(
    client: Client, body: Any, status: int, fragment: str
) -> None:
    response = await client.post(body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert any(fragment in d["message"] for d in error["details"]), error
    assert await client.landed() == []


async def test_every_problem_is_listed_with_index_and_field(client: Client) -> None:
    body = [
        _event("purchase", "c1", 0),
        {**_event("purchase", "c1", 1), "currency": "shekel", "amount": "x"},
        {**_event("profile", "c2", 2), "phone": "0521234567"},
    ]
    response = await client.post(body)
    assert response.status_code == 422
    details = {(d["index"], d["field"]) for d in response.json()["error"]["details"]}
    assert details == {(1, "currency"), (1, "amount"), (2, "phone")}
    # An attribute's problem is one detail at the attribute's own path.
    response = await client.post(
        {**_event("profile", "c3", 3), "attributes": {"tags": ["vip"], "note": "x" * 501}}
    )
    assert response.status_code == 422
    details = {(d["index"], d["field"]) for d in response.json()["error"]["details"]}
    assert details == {(0, "attributes.tags"), (0, "attributes.note")}
    assert await client.landed() == []


async def test_a_time_problem_is_listed_beside_the_schemas(client: Client) -> None:
    """The times are judged after the schema, but of every event the schema accepted: one
    answer lists both, not the time only on the next try."""
    body = [
        {**_event("purchase", "c1", 0), "occurred_at": IN_FIVE_YEARS},
        {**_event("purchase", "c1", 1), "currency": "shekel"},
        _event("purchase", "c1", 2),
    ]
    response = await client.post(body)
    assert response.status_code == 422
    details = [(d["index"], d["field"]) for d in response.json()["error"]["details"]]
    assert details == [(0, "occurred_at"), (1, "currency")]
    assert await client.landed() == []


async def test_transport_errors(client: Client) -> None:
    auth = {"Authorization": f"Bearer {client.key}"}
    malformed = await client.http.post(
        "/v1/events", content=b'{"type": ', headers={**auth, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    assert "not valid JSON" in malformed.json()["error"]["message"]

    wrong_type = await client.http.post(
        "/v1/events", content=b"a=1", headers={**auth, "Content-Type": "application/x-www-form-urlencoded"}
    )
    assert wrong_type.status_code == 415
    assert "application/json" in wrong_type.json()["error"]["message"]

    # JSON is UTF-8: a Latin-1 body was a 400 about surrogates, as if its text were broken.
    jose = {"type": "profile", "event_id": "profile-c1-1", "customer_id": "c1", "name": "José"}
    jose["occurred_at"] = EXAMPLES["profile"]["occurred_at"]
    latin = json.dumps(jose, ensure_ascii=False).encode("latin-1")
    for charset in ("iso-8859-1", '"UTF-16"'):
        typed = {**auth, "Content-Type": f"application/json; charset={charset}"}
        other = await client.http.post("/v1/events", content=latin, headers=typed)
        assert other.status_code == 415, other.text
        assert "must be UTF-8 JSON" in other.json()["error"]["message"]

    too_big = await client.http.post(
        "/v1/events",
        content=b"[" + b" " * (1024 * 1024) + b"]",
        headers={**auth, "Content-Type": "application/json"},
    )
    assert too_big.status_code == 413
    assert "1048576 bytes" in too_big.json()["error"]["message"]

    too_many = await client.post([_event("support", "c1", i) for i in range(1001)])
    assert too_many.status_code == 413
    assert "at most 1000 events" in too_many.json()["error"]["message"]
    assert await client.landed() == []

    declared = await client.http.post(
        "/v1/events",
        content=json.dumps(jose, ensure_ascii=False).encode(),
        headers={**auth, "Content-Type": "application/json; charset=UTF-8"},
    )
    assert declared.status_code == 202, declared.text
    assert len(await client.landed()) == 1


async def test_the_documented_route_answers_as_the_direct_endpoint(client: Client) -> None:
    """POST /v1/events is served before FastAPI's middleware and routing (app.py); a request
    it hands on (here: one under a root path, as behind a proxy) reaches the FastAPI route,
    which answers alike. A query string is handed on too, and refused: the operation takes no
    query parameter, and one it would ignore is a 422 naming it."""
    transport = httpx.ASGITransport(app=client.app, root_path="/retain")
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest/retain") as proxied:
        routed_client = Client(proxied, client.key, client.prefix, client.bootstrap, client.app)
        direct = await client.post(_event("support", "c5", 1))
        routed = await routed_client.post(_event("support", "c5", 2))
        assert direct.status_code == routed.status_code == 202
        assert direct.json() == {"accepted": 1, "event_ids": ["support-c5-1"], "duplicates": 0}
        assert routed.json() == {"accepted": 1, "event_ids": ["support-c5-2"], "duplicates": 0}
        assert direct.headers["content-type"] == routed.headers["content-type"] == "application/json"

        headers = {"Authorization": f"Bearer {client.key}", "Content-Type": "text/plain"}
        refused = [await c.post("/v1/events", content=b"{}", headers=headers) for c in (client.http, proxied)]
        assert [r.status_code for r in refused] == [415, 415]
        assert refused[0].json() == refused[1].json()
        assert refused[0].json()["error"]["code"] == "unsupported_media_type"

    queried = await client.post(_event("support", "c5", 4), params={"dry_run": "1"})
    assert queried.status_code == 422, queried.text
    assert queried.json()["error"]["details"] == [
        {"field": "query.dry_run", "message": "unknown parameter; this operation takes none"}
    ]
    keyless = await client.http.post("/v1/events", params={"dry_run": "1"}, json=_event("support", "c5", 5))
    assert keyless.status_code == 401  # the key first
    unauthorized = await client.http.post("/v1/events", json=_event("support", "c5", 3))
    assert unauthorized.status_code == 401
    assert unauthorized.headers["WWW-Authenticate"] == "Bearer"

    metrics = (await client.http.get("/metrics")).text
    for status in ("202", "415", "401"):
        labels = f'method="POST",route="/v1/events",service="ingest",status="{status}"'
        assert f"retain_http_requests_total{{{labels}}}" in metrics
    assert len(await client.landed()) == 2


async def test_auth(client: Client, tmp_path: Path) -> None:
    no_key = await client.http.post("/v1/events", json=_event("support", "c1", 1))
    assert no_key.status_code == 401
    bad_key = await client.post(_event("support", "c1", 1), key="rk_deadbeef_nope")
    assert bad_key.status_code == 401
    _, reader = create_key(tmp_path / "keys.json", ["kpi:read"])
    wrong_scope = await client.http.post(
        "/v1/events", json=_event("support", "c1", 1), headers={"X-API-Key": reader}
    )
    # The store re-reads the file at most once a second; the new key may need that long.
    assert wrong_scope.status_code in (401, 403)
    assert await client.landed() == []


async def test_wrong_scope_is_403(kafka: KafkaHandle, topic_prefix: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    _, reader = create_key(keys, ["kpi:read"])
    async for c in _client(kafka, topic_prefix, tmp_path):
        response = await c.http.post(
            "/v1/events", json=_event("support", "c1", 1), headers={"X-API-Key": reader}
        )
        assert response.status_code == 403
        assert "events:write" in response.json()["error"]["message"]


async def test_rate_limit_answers_429_with_retry_after(
    kafka: KafkaHandle, topic_prefix: str, tmp_path: Path
) -> None:
    async for c in _client(
        kafka, topic_prefix, tmp_path, ingest_rate_limit_per_s=0.5, ingest_rate_limit_burst=2
    ):
        statuses = [(await c.post(_event("support", "c1", i))).status_code for i in range(3)]
        assert statuses == [202, 202, 429]
        limited = await c.post(_event("support", "c1", 9))
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1


async def test_health_ready_metrics_and_docs(client: Client, kafka: KafkaHandle, tmp_path: Path) -> None:
    assert (await client.http.get("/healthz")).json() == {"status": "ok"}
    ready = await client.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    await client.post(_event("purchase", "c1", 1))
    metrics = (await client.http.get("/metrics")).text
    assert 'retain_ingest_events_accepted_total{type="purchase"}' in metrics
    assert "retain_ingest_produce_seconds_bucket" in metrics
    assert 'route="/v1/events"' in metrics
    spec = (await client.http.get("/openapi.json")).json()
    examples = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"profile", "purchase", "support", "cancellation", "batch"}
    assert {"ProfileEvent", "PurchaseEvent"} <= set(spec["components"]["schemas"])

    async for unready in _client(kafka, "no-such-topics.", tmp_path):
        response = await unready.http.get("/readyz")
        assert response.status_code == 503
        assert "no-such-topics.purchases" in response.json()["checks"]["topics"]["missing"]
    assert len(ALL_TOPICS) == 7


async def test_broker_down_gives_503_then_the_resend_lands_once(
    kafka: KafkaHandle, topic_prefix: str, tmp_path: Path
) -> None:
    if not kafka.controllable:
        pytest.skip(f"the {kafka.kind} broker cannot be stopped by the tests")
    async for c in _client(kafka, topic_prefix, tmp_path, ingest_ack_timeout_s=3.0):
        first = [_event("purchase", "c7", 0, order_id="o0")]
        assert (await c.post(first)).status_code == 202
        batch = [_event("purchase", "c7", i, order_id=f"o{i}") for i in range(1, 6)]
        kafka.broker.stop()
        try:
            down = await c.post(batch)
            assert down.status_code == 503
            assert down.headers["Retry-After"] == "5"
            assert "resend" in down.json()["error"]["message"]
        finally:
            kafka.broker.start()
        # The caller resends after Retry-After, as told; the restarted broker may need a moment.
        for _ in range(10):
            up = await c.post(batch)
            if up.status_code != 503:
                break
        assert up.status_code == 202, up.text
        again = await c.post(batch)
        assert again.json()["duplicates"] == 5
        landed = await c.landed()
        # A send that timed out may still have reached the log after the restart; then the
        # copies carry the same id and bytes, and the consumers' ledgers apply them once.
        assert {decode_event(r.value).event_id for r in landed} == {e["event_id"] for e in first + batch}
        copies: dict[bytes, set[bytes]] = {}
        for r in landed:
            copies.setdefault(r.value, set()).add(r.key or b"")
        assert len(copies) == len(first + batch)
