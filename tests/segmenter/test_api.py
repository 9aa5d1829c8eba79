"""The segment-rules API and the customers API, on SQLite and on PostgreSQL.

Profiles are seeded through the service's batch handler (what the consumer calls), with the
demo generator's history; the expected tiers and segments come from the pure modules.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from services.segmenter.app import create_app
from services.segmenter.config import SegmenterSettings
from services.segmenter.consumer import MIGRATIONS
from services.segmenter.profile import LifecycleConfig, build, facts
from services.segmenter.repository import Standing
from services.segmenter.rules import Assignment, compile_rules, default_rules
from services.segmenter.service import SegmenterService
from services.segmenter.tables import outbox, publish_jobs
from services.segmenter.updates import update_id
from shared.auth import create_key
from shared.codec import decode_with
from shared.db import migrate
from shared.demo.generator import generate
from shared.events import (
    CUSTOMER_UPDATE_ADAPTER,
    EVENT_ADAPTER,
    ClvPrediction,
    CustomerUpdate,
    Event,
    UpdateCause,
)
from shared.kafka.consumer import Delivered
from tests.segmenter.factories import profile, purchase

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
DAY = timedelta(days=1)
DEMO_DAYS = 400


@cache
def demo_events() -> tuple[Event, ...]:
    raw = generate(seed=13, customers=24, start=NOW - timedelta(days=DEMO_DAYS), days=DEMO_DAYS)
    return tuple(EVENT_ADAPTER.validate_python(e) for e in raw)


def events_by_customer() -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = defaultdict(list)
    for event in demo_events():
        out[event.customer_id].append(event)
    return dict(out)


def expected(rules_json: dict[str, Any], at: datetime = NOW) -> dict[str, Assignment]:
    """What each demo customer should be under ``rules_json`` at ``at``, from the pure modules."""
    rules = compile_rules(rules_json, 0)
    return {
        cid: rules.assign(facts(build(cid, events), at, LifecycleConfig())[0], at)
        for cid, events in events_by_customer().items()
    }


def stricter_rules() -> dict[str, Any]:
    """Bronze needs two orders; loyal needs six orders in the last year."""
    rules = default_rules()
    assert rules["tiers"][3]["name"] == "bronze"
    rules["tiers"][3]["when"] = {"field": "orders_count", "op": "gte", "value": 2}
    loyal = next(s for s in rules["segments"] if s["name"] == "loyal")
    loyal["when"]["all"][1]["value"] = 6
    return rules


@dataclass
class Api:
    http: httpx.AsyncClient
    service: SegmenterService
    writer: str
    writer_id: str
    reader: str
    stranger: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.writer}"}

    async def get(self, url: str, key: str | None = None, **kw: Any) -> httpx.Response:
        return await self.http.get(url, headers=self.auth(key), **kw)

    async def put(self, url: str, body: Any, key: str | None = None, **headers: str) -> httpx.Response:
        return await self.http.put(url, json=body, headers={**self.auth(key), **headers})

    async def post(
        self, url: str, body: Any = None, key: str | None = None, **headers: str
    ) -> httpx.Response:
        return await self.http.post(url, json=body, headers={**self.auth(key), **headers})

    async def draft_etag(self) -> str:
        response = await self.get("/v1/rules/draft")
        assert response.status_code == 200, response.text
        etag: str = response.json()["etag"]
        return etag

    async def run_jobs(self) -> int:
        steps = 0
        while await self.service.run_publish_step() is not None:
            steps += 1
            assert steps < 1000
        return steps

    async def outbox_updates(self) -> list[CustomerUpdate]:
        async with self.service.db.sessions() as session:
            rows = (await session.execute(select(outbox.c.value).order_by(outbox.c.id))).all()
        return [decode_with(CUSTOMER_UPDATE_ADAPTER, r.value) for r in rows]

    async def customer(self, customer_id: str) -> dict[str, Any]:
        response = await self.get(f"/v1/customers/{customer_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


async def seed(service: SegmenterService, events: list[Event], batch: int = 50) -> None:
    delivered: list[Delivered[Event | ClvPrediction]] = [
        Delivered(f"retain.{e.type}", 0, offset, e.customer_id.encode(), e, 0)
        for offset, e in enumerate(events)
    ]
    for start in range(0, len(delivered), batch):
        await service.apply_batch(delivered[start : start + batch])


@pytest.fixture
async def api(database_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    keys = tmp_path / "keys.json"
    writer, writer_plain = create_key(keys, ["rules:read", "rules:write"], "marketing")
    _, reader_plain = create_key(keys, ["rules:read"], "analyst")
    _, stranger_plain = create_key(keys, ["kpi:read"], "kpi")
    settings = SegmenterSettings(
        segmenter_database_url=database_url,
        api_keys_file=keys,
        var_dir=tmp_path,
        segmenter_publish_chunk=5,  # several steps per publish
    )
    app = create_app(settings)
    service: SegmenterService = app.state.service
    service.clock = lambda: NOW
    # httpx's ASGITransport does not run the lifespan: do what it does.
    await migrate(service.db, MIGRATIONS)
    await service.ensure_default_rules()
    await seed(service, list(demo_events()))
    # The events are judged as of each customer's latest one; what time changed since, the
    # sweep announces, as the consumer's tick does after the batches.
    await service.sweep()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://segmenter") as http:
        yield Api(http, service, writer_plain, writer.id, reader_plain, stranger_plain)
    await service.db.dispose()


# --- the draft --------------------------------------------------------------------------------------


async def test_the_draft_carries_its_etag_in_header_and_body(api: Api) -> None:
    response = await api.get("/v1/rules/draft", key=api.reader)
    assert response.status_code == 200
    body = response.json()
    assert response.headers["ETag"] == f'"{body["etag"]}"'
    assert body["rules"] == default_rules()
    assert body["updated_by"] == "system"


async def test_an_invalid_draft_is_refused_with_json_paths_and_changes_nothing(api: Api) -> None:
    before = (await api.get("/v1/rules/draft")).json()
    bad = default_rules()
    bad["tiers"][0]["when"]["all"][1] = {"field": "orders", "op": "gte", "value": 10}
    bad["segments"][0]["when"] = {"field": "first_purchase_at", "op": "within_days", "value": "30"}

    response = await api.put("/v1/rules/draft", bad, **{"If-Match": f'"{before["etag"]}"'})

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert [d["path"] for d in error["details"]] == [
        "$.tiers[0].when.all[1].field",
        "$.segments[0].when.value",
    ]
    assert all(d["message"] for d in error["details"])
    assert (await api.get("/v1/rules/draft")).json() == before
    assert [e["action"] for e in (await api.get("/v1/rules/audit")).json()] == ["publish"]


async def test_replacing_the_draft_needs_the_current_etag(api: Api) -> None:
    etag = await api.draft_etag()
    new = stricter_rules()

    stale = await api.put("/v1/rules/draft", new, **{"If-Match": '"0000"'})
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "precondition_failed"
    assert await api.draft_etag() == etag

    ok = await api.put("/v1/rules/draft", new, **{"If-Match": f'W/"{etag}"'})
    assert ok.status_code == 200, ok.text
    new_etag = ok.json()["etag"]
    assert ok.headers["ETag"] == f'"{new_etag}"'
    assert new_etag != etag
    current = (await api.get("/v1/rules/draft")).json()
    assert (current["rules"], current["etag"], current["updated_by"]) == (new, new_etag, api.writer_id)

    # The old ETag is stale now: a second editor who read before the change cannot overwrite it.
    again = await api.put("/v1/rules/draft", default_rules(), **{"If-Match": f'"{etag}"'})
    assert again.status_code == 412
    assert (await api.get("/v1/rules/draft")).json()["rules"] == new
    # "*" matches whatever draft there is (RFC 9110): the editor says they mean to overwrite it.
    star = await api.put("/v1/rules/draft", default_rules(), **{"If-Match": "*"})
    assert star.status_code == 200, star.text
    assert (await api.get("/v1/rules/draft")).json()["rules"] == default_rules()


async def test_validate_reports_problems_without_storing_anything(api: Api) -> None:
    ok = await api.post("/v1/rules/validate", default_rules(), key=api.reader)
    assert ok.status_code == 200
    assert ok.json() == {"valid": True, "errors": []}
    deep: dict[str, Any] = {"field": "orders_count", "op": "gte", "value": 1}
    for _ in range(20):
        deep = {"not": deep}
    bad = {
        "tiers": [{"name": "none", "when": {"field": "total_value", "op": "gte", "value": "big"}}],
        "segments": [{"name": "deep", "when": deep}, {"name": "deep", "when": {"all": []}}],
    }
    response = await api.post("/v1/rules/validate", bad, key=api.reader)
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is False
    assert [e["path"] for e in body["errors"]] == [
        "$.tiers[0].name",
        "$.tiers[0].when.value",
        "$.segments[0].when" + ".not" * 12,
        "$.segments[1].name",
    ]
    structural = await api.post("/v1/rules/validate", {"segments": []}, key=api.reader)
    assert structural.json()["errors"] == [{"path": "$.tiers", "message": "Field required"}]


async def test_a_key_written_twice_is_refused_not_half_read(api: Api) -> None:
    # Parsed, the second "all" replaced the first, and the spend condition was gone unsaid.
    text = (
        '{"tiers": [], "segments": [{"name": "vip", "when": {'
        '"all": [{"field": "total_value", "op": "gte", "value": 5000}], '
        '"all": [{"field": "lifecycle_stage", "op": "eq", "value": "active"}]}}], '
        '"tiers": []}'
    )
    headers = {**api.auth(), "Content-Type": "application/json"}
    before = (await api.get("/v1/rules/draft")).json()["rules"]
    for method, url in (
        ("PUT", "/v1/rules/draft"),
        ("POST", "/v1/rules/validate"),
        ("POST", "/v1/rules/preview"),
    ):
        response = await api.http.request(method, url, content=text, headers=headers)
        assert response.status_code == 422, (url, response.text)
        error = response.json()["error"]
        assert "given twice in one JSON object" in error["message"]
        assert error["details"] == [
            {"path": "$", "message": "'tiers' is given more than once"},
            {"path": "$.segments[0].when", "message": "'all' is given more than once"},
        ]
    assert (await api.get("/v1/rules/draft")).json()["rules"] == before
    # The key first: without one, a 401 whatever the body; a JSON subtype is read as JSON.
    anonymous = await api.http.put(
        "/v1/rules/draft", content=text, headers={"Content-Type": "application/json"}
    )
    assert anonymous.status_code == 401
    merge = {**headers, "Content-Type": "application/merge-patch+json"}
    assert (await api.http.post("/v1/rules/validate", content=text, headers=merge)).status_code == 422


# --- preview and publish ----------------------------------------------------------------------------


async def test_preview_counts_and_diffs_against_the_published_rules(api: Api) -> None:
    now_rules = expected(default_rules())
    then = expected(stricter_rules())
    response = await api.post("/v1/rules/preview?sample=3", stricter_rules(), key=api.reader)
    assert response.status_code == 200, response.text
    p = response.json()

    assert p["customers"] == len(then) == 24
    assert p["published_version"] == 1
    tiers: dict[str, int] = defaultdict(int)
    segments: dict[str, int] = defaultdict(int)
    moves: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    entered: dict[str, int] = defaultdict(int)
    left: dict[str, int] = defaultdict(int)
    changed = set()
    for cid, a in then.items():
        tiers[a.tier] += 1
        for s in a.segments:
            segments[s] += 1
        old = now_rules[cid]
        if a.tier != old.tier:
            moves[old.tier][a.tier] += 1
        for s in set(a.segments) - set(old.segments):
            entered[s] += 1
        for s in set(old.segments) - set(a.segments):
            left[s] += 1
        if a.tier != old.tier or set(a.segments) != set(old.segments):
            changed.add(cid)
    assert p["tiers"] == tiers
    assert p["segments"] == segments
    assert p["tier_moves"] == moves
    assert moves["bronze"]["none"] == 7  # the one-order customers
    assert p["segments_entered"] == entered == {}
    assert p["segments_left"] == left
    assert left["loyal"] > 0
    assert len(p["sample"]) == 3
    for s in p["sample"]:
        cid = s["customer_id"]
        assert cid in changed
        assert s["tier"] == {"from": now_rules[cid].tier, "to": then[cid].tier}

    # Without a body, the draft is previewed: unchanged from the published rules, no one moves.
    same = (await api.post("/v1/rules/preview", key=api.reader)).json()
    assert same["tier_moves"] == {}
    assert same["sample"] == []
    assert same["tiers"] == tier_counts(now_rules)

    invalid = await api.post("/v1/rules/preview", {"tiers": "x", "segments": []}, key=api.reader)
    assert invalid.status_code == 422
    assert invalid.json()["error"]["details"][0]["path"] == "$.tiers"


def tier_counts(assignments: dict[str, Assignment]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for a in assignments.values():
        out[a.tier] += 1
    return dict(out)


async def put_draft(api: Api, rules: dict[str, Any]) -> str:
    response = await api.put("/v1/rules/draft", rules, **{"If-Match": f'"{await api.draft_etag()}"'})
    assert response.status_code == 200, response.text
    etag: str = response.json()["etag"]
    return etag


async def test_publish_needs_a_fresh_etag_then_reevaluates_everyone(api: Api) -> None:
    etag = await put_draft(api, stricter_rules())

    missing = await api.post("/v1/rules/publish")
    assert missing.status_code == 428
    assert "If-Match" in missing.json()["error"]["message"]
    star = await api.post("/v1/rules/publish", **{"If-Match": "*"})  # not "the draft changed": 428
    assert star.status_code == 428
    assert "If-Match: * does not say which draft you read" in star.json()["error"]["message"]
    stale = await api.post("/v1/rules/publish", **{"If-Match": '"not-it"'})
    assert stale.status_code == 412
    assert (await api.get("/v1/rules/versions")).json()[0]["version"] == 1

    published = await api.post("/v1/rules/publish?note=stricter", **{"If-Match": f'"{etag}"'})
    assert published.status_code == 202, published.text
    body = published.json()
    assert body["version"] == 2
    assert body["job"].endswith(f"/v1/rules/jobs/{body['job_id']}")

    pending = (await api.get(f"/v1/rules/jobs/{body['job_id']}", key=api.reader)).json()
    assert (pending["status"], pending["done"], pending["total"], pending["version"]) == ("pending", 0, 24, 2)
    assert pending["eta_s"] is None

    steps = await api.run_jobs()
    assert steps == 5  # 24 customers in chunks of 5

    job = (await api.get(f"/v1/rules/jobs/{body['job_id']}")).json()
    before, after = expected(default_rules()), expected(stricter_rules())
    moved = {
        cid
        for cid in after
        if after[cid].tier != before[cid].tier or after[cid].segments != before[cid].segments
    }
    assert (job["status"], job["done"], job["total"], job["eta_s"]) == ("done", 24, 24, 0)
    assert job["changed"] == len(moved)
    assert job["finished_at"] is not None

    for cid, a in after.items():
        customer = await api.customer(cid)
        assert (customer["tier"], customer["segments"]) == (a.tier, list(a.segments)), cid

    rule_updates = [u for u in await api.outbox_updates() if u.cause == UpdateCause.RULES]
    assert {u.customer_id for u in rule_updates} == moved
    assert len(rule_updates) == len(moved)
    for u in rule_updates:
        assert u.rule_version == 2
        assert u.event_id == update_id(u.customer_id, UpdateCause.RULES, "2")
        assert (u.tier_old, u.tier_new) == (before[u.customer_id].tier, after[u.customer_id].tier)

    # A job that has finished is not run again.
    assert await api.service.run_publish_step() is None


async def test_versions_are_immutable_and_listed(api: Api) -> None:
    etag = await put_draft(api, stricter_rules())
    assert (await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})).status_code == 202
    listed = (await api.get("/v1/rules/versions", key=api.reader)).json()
    assert [(v["version"], v["created_by"]) for v in listed] == [(2, api.writer_id), (1, "system")]
    one = (await api.get("/v1/rules/versions/1")).json()
    two = (await api.get("/v1/rules/versions/2")).json()
    assert one["rules"] == default_rules()
    assert two["rules"] == stricter_rules()
    await put_draft(api, default_rules())  # editing the draft leaves versions alone
    assert (await api.get("/v1/rules/versions/2")).json()["rules"] == stricter_rules()
    assert (await api.get("/v1/rules/versions/99")).status_code == 404
    assert (await api.get("/v1/rules/versions/0")).status_code == 422
    assert (await api.get("/v1/rules/versions/abc")).status_code == 422
    # Past the 32-bit column: PostgreSQL refused it as a query argument (a 500), now a 422.
    assert (await api.get(f"/v1/rules/versions/{2**31}")).status_code == 422
    assert (await api.post(f"/v1/rules/rollback/{2**31}")).status_code == 422


async def test_publishing_the_published_rules_again_is_refused_as_nothing_to_publish(api: Api) -> None:
    """The draft as published (a second click, a publish without edits): a new version would
    re-evaluate every customer, superseding a publish still running, to change nothing."""
    etag = await put_draft(api, stricter_rules())
    assert (await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})).status_code == 202
    draft = await api.get("/v1/rules/draft")
    again = await api.post("/v1/rules/publish", **{"If-Match": draft.headers["ETag"]})
    assert again.status_code == 409, again.text
    error = again.json()["error"]
    assert error["code"] == "unchanged"
    assert error["message"].startswith("nothing to publish: the draft is version 2's rules, published")
    assert [v["version"] for v in (await api.get("/v1/rules/versions")).json()] == [2, 1]
    # An edit publishes as before.
    edited = await put_draft(api, default_rules())
    assert (await api.post("/v1/rules/publish", **{"If-Match": f'"{edited}"'})).status_code == 202


async def test_paging_by_a_parameter_the_members_list_does_not_take_is_refused(api: Api) -> None:
    """offset= (or page=) was ignored: the first page, for ever, to a client paging that way."""
    response = await api.get("/v1/segments/loyal/customers?offset=100&limit=5")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [
        {"field": "query.offset", "message": "unknown parameter; this operation takes cursor, limit"}
    ]
    assert (await api.get("/v1/segments/loyal/customers?limit=5&limit=2")).status_code == 422
    assert (await api.post("/v1/rules/rollback/1?note=why")).status_code == 422


async def test_rollback_publishes_an_old_version_again(api: Api) -> None:
    etag = await put_draft(api, stricter_rules())
    assert (await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})).status_code == 202
    await api.run_jobs()

    response = await api.post("/v1/rules/rollback/1")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["version"] == 3
    assert (await api.get("/v1/rules/versions/3")).json()["rules"] == default_rules()
    draft = (await api.get("/v1/rules/draft")).json()
    assert draft["rules"] == default_rules()

    await api.run_jobs()
    job = (await api.get(f"/v1/rules/jobs/{body['job_id']}")).json()
    assert (job["status"], job["version"], job["done"]) == ("done", 3, 24)
    for cid, a in expected(default_rules()).items():
        customer = await api.customer(cid)
        assert (customer["tier"], customer["segments"]) == (a.tier, list(a.segments)), cid

    assert (await api.post("/v1/rules/rollback/99")).status_code == 404
    assert (await api.post("/v1/rules/rollback/0")).status_code == 422
    assert (await api.get("/v1/rules/jobs/no-such-job")).status_code == 404


async def test_a_rollback_to_a_version_that_is_not_valid_now_is_refused(api: Api) -> None:
    """A version published before a release whose validation refuses what it holds (here a
    tier on a fact no longer in the catalogue): rolled back to, it would not compile in the
    consumers. 422 naming where, and nothing published, queued or changed."""
    broken = default_rules()
    broken["tiers"][0]["when"] = {"field": "favourite_colour", "op": "eq", "value": "red"}
    async with api.service.db.transaction() as session:
        assert await api.service.repo.add_version(session, 2, broken, "old release", "publish", NOW)
    draft_before = await api.get("/v1/rules/draft")

    response = await api.post("/v1/rules/rollback/2")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"] == "rule version 2 is not valid now; publish a corrected draft instead"
    assert [d["path"] for d in error["details"]] == ["$.tiers[0].when.field"]
    assert "favourite_colour" in error["details"][0]["message"]
    assert [v["version"] for v in (await api.get("/v1/rules/versions")).json()] == [2, 1]
    assert [e["action"] for e in (await api.get("/v1/rules/audit")).json()] == ["publish"]
    draft = await api.get("/v1/rules/draft")
    assert (draft.json(), draft.headers["ETag"]) == (draft_before.json(), draft_before.headers["ETag"])
    assert (await api.post("/v1/rules/rollback/1")).status_code == 202  # a valid one still goes


async def test_a_rollback_keeps_a_draft_with_unpublished_edits(api: Api) -> None:
    """A marketer is editing when someone rolls back: their draft is theirs, not replaced, and
    its ETag still publishes it (on top of the rollback)."""
    etag = await put_draft(api, stricter_rules())
    assert (await api.post("/v1/rules/rollback/1")).status_code == 202
    draft = await api.get("/v1/rules/draft")
    assert draft.json()["rules"] == stricter_rules()
    assert draft.headers["ETag"] == f'"{etag}"'
    published = await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})
    assert published.status_code == 202, published.text
    assert published.json()["version"] == 3  # 1 the defaults, 2 the rollback to them, 3 the edit


# PostgreSQL only: SQLite's transaction holds its write lock from the start, so no edit commits
# while a rollback runs there.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_rollback_keeps_an_edit_saved_while_it_ran(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rollback reads the draft (the live rules: it would follow the rollback); a marketer's
    edit commits just then, answered 200 with its ETag. The rollback overwrote it; now the
    edit is kept, and its ETag still publishes it."""
    etag = await api.draft_etag()
    service = api.service
    real_draft = service.repo.draft
    saved: list[str] = []

    async def draft_then_an_edit_commits(session: Any) -> Any:
        found = await real_draft(session)
        if not saved:
            saved.append("")  # once: the edit's own transaction reads the draft too
            saved[0] = await service.put_draft(stricter_rules(), "marketing", etag)
        return found

    monkeypatch.setattr(service.repo, "draft", draft_then_an_edit_commits)
    assert (await api.post("/v1/rules/rollback/1")).status_code == 202
    monkeypatch.undo()
    draft = await api.get("/v1/rules/draft")
    assert draft.json()["rules"] == stricter_rules()
    assert draft.headers["ETag"] == f'"{saved[0]}"'


async def test_every_change_is_audited_with_who_and_a_json_patch(api: Api) -> None:
    etag = await put_draft(api, stricter_rules())
    assert (await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})).status_code == 202
    assert (await api.post("/v1/rules/rollback/1")).status_code == 202

    entries = (await api.get("/v1/rules/audit", key=api.reader)).json()
    assert [(e["action"], e["actor"], e["version"]) for e in entries] == [
        ("rollback", api.writer_id, 3),
        ("publish", api.writer_id, 2),
        ("draft", api.writer_id, None),
        ("publish", "system", 1),
    ]
    change = {
        ("replace", "/tiers/3/when/value", 2),
        ("replace", "/segments/1/when/all/1/value", 6),
    }
    assert {(op["op"], op["path"], op["value"]) for op in entries[2]["diff"]} == change  # the draft edit
    assert {(op["op"], op["path"], op["value"]) for op in entries[1]["diff"]} == change  # from version 1
    assert {(op["op"], op["path"], op["value"]) for op in entries[0]["diff"]} == {  # back again
        ("replace", "/tiers/3/when/value", 1),
        ("replace", "/segments/1/when/all/1/value", 4),
    }
    assert all(e["at"] for e in entries)
    limited = await api.get("/v1/rules/audit?limit=1")
    assert len(limited.json()) == 1
    assert (await api.get("/v1/rules/audit?limit=0")).status_code == 422


async def test_concurrent_publishes_of_one_etag_do_not_interleave(api: Api) -> None:
    etag = await put_draft(api, stricter_rules())

    first, second = await asyncio.gather(
        api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'}),
        api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'}),
    )

    statuses = sorted([first.status_code, second.status_code])
    assert statuses[0] == 202, (first.text, second.text)
    assert statuses[1] in (409, 412), (first.text, second.text)
    versions = [v["version"] for v in (await api.get("/v1/rules/versions")).json()]
    assert versions == [2, 1]
    async with api.service.db.sessions() as session:
        jobs = (await session.execute(select(publish_jobs.c.version, publish_jobs.c.status))).all()
    assert [(j.version, j.status) for j in jobs] == [(2, "pending")]


async def test_one_etag_publishes_once(api: Api) -> None:
    # Publishing answers 202 and leaves the draft as it was; sending the same request again
    # (a double click, a retry after a timeout) must not make a second version.
    etag = await put_draft(api, stricter_rules())
    assert (await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})).status_code == 202
    again = await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})
    assert again.status_code in (409, 412), again.text
    assert [v["version"] for v in (await api.get("/v1/rules/versions")).json()] == [2, 1]
    # The marketer's next edit with the ETag they published: the 412 says a publish may be why
    # (it said only "the draft changed", which nobody had edited) and where the new ETag is.
    edit = await api.put("/v1/rules/draft", stricter_rules(), **{"If-Match": f'"{etag}"'})
    assert edit.status_code == 412, edit.text
    assert "or was published" in edit.json()["error"]["message"]
    assert "GET /v1/rules/draft" in edit.json()["error"]["message"]


async def test_a_publish_that_only_reorders_segments_changes_no_one(api: Api) -> None:
    rules = default_rules()
    rules["segments"].reverse()
    etag = await put_draft(api, rules)
    published = (await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})).json()
    await api.run_jobs()
    job = (await api.get(f"/v1/rules/jobs/{published['job_id']}")).json()
    assert (job["status"], job["done"]) == ("done", 24)
    assert [u for u in await api.outbox_updates() if u.cause == UpdateCause.RULES] == []
    assert job["changed"] == 0


async def test_concurrent_edits_of_one_etag_let_exactly_one_win(api: Api) -> None:
    etag = await api.draft_etag()
    a, b = stricter_rules(), copy.deepcopy(default_rules())
    b["tiers"][0]["when"]["all"][0]["value"] = 20_000
    first, second = await asyncio.gather(
        api.put("/v1/rules/draft", a, **{"If-Match": f'"{etag}"'}),
        api.put("/v1/rules/draft", b, **{"If-Match": f'"{etag}"'}),
    )
    assert sorted([first.status_code, second.status_code]) == [200, 412]
    winner = a if first.status_code == 200 else b
    assert (await api.get("/v1/rules/draft")).json()["rules"] == winner


async def test_the_sweep_keeps_everyone_right_as_time_passes(api: Api) -> None:
    updates_before = len(await api.outbox_updates())
    for days in (1, 10, 31, 45, 61, 100, 181, 250, 400):
        at = NOW + timedelta(days=days)
        api.service.clock = lambda at=at: at  # type: ignore[misc]
        swept = await api.service.sweep(limit=4)
        want = expected(default_rules(), at)
        async with api.service.db.sessions() as session:
            rows = await api.service.repo.customers_after(session, None, 1000)
        assert len(rows) == 24
        for row in rows:
            a = want[row.customer_id]
            assert (row.tier, row.segments) == (a.tier, list(a.segments)), (days, row.customer_id)
            assert row.next_check_at is None or row.next_check_at > at
        assert swept <= 24
    time_updates = (await api.outbox_updates())[updates_before:]
    assert time_updates
    assert {u.cause for u in time_updates} == {UpdateCause.TIME}
    stages = {u.profile.lifecycle_stage for u in time_updates}
    assert {"at_risk", "lapsed"} <= stages
    # Far in the future nothing is due any more that was not already handled.
    assert await api.service.sweep() == 0


async def test_an_order_stamped_ahead_of_the_clock_is_counted_by_the_sweep_at_its_time(api: Api) -> None:
    """A backend clock two seconds fast: the order is stored at once but not yet in the windows;
    the customer's next check is the order's instant, and the sweep then counts it."""
    ahead = NOW + timedelta(seconds=2)
    await seed(api.service, [purchase("ahead-1", ahead, "o-ahead", customer_id="ahead")])
    row = (await stored_rows(api))["ahead"]
    assert row.next_check_at == ahead
    assert (row.facts["orders_count"], row.facts["purchases_30d"]) == (1, 0)

    api.service.clock = lambda: ahead
    assert await api.service.sweep() == 1
    row = (await stored_rows(api))["ahead"]
    counts = (row.facts["orders_count"], row.facts["purchases_30d"], row.facts["purchases_365d"])
    assert counts == (1, 1, 1)
    assert row.next_check_at == ahead + 30 * DAY


async def publish_and_run(api: Api, rules: dict[str, Any]) -> dict[str, Any]:
    etag = await put_draft(api, rules)
    published = await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})
    assert published.status_code == 202, published.text
    await api.run_jobs()
    job: dict[str, Any] = (await api.get(f"/v1/rules/jobs/{published.json()['job_id']}")).json()
    assert job["status"] == "done"
    return job


async def stored_rows(api: Api) -> dict[str, Any]:
    async with api.service.db.sessions() as session:
        return {r.customer_id: r for r in await api.service.repo.customers_after(session, None, 1000)}


async def test_a_publish_long_after_the_last_sweep_derives_out_of_date_facts_again(api: Api) -> None:
    # No sweep for 61 days: some stored facts (lifecycle stages, windows) no longer hold.
    at = NOW + timedelta(days=61)
    api.service.clock = lambda: at
    before = await stored_rows(api)
    assert any(r.next_check_at is not None and r.next_check_at <= at for r in before.values())

    job = await publish_and_run(api, stricter_rules())

    want = expected(stricter_rules(), at)
    after = await stored_rows(api)
    assert {cid: (r.tier, r.segments) for cid, r in after.items()} == {
        cid: (a.tier, list(a.segments)) for cid, a in want.items()
    }
    assert all(r.next_check_at is None or r.next_check_at > at for r in after.values())
    rule_updates = [u for u in await api.outbox_updates() if u.cause == UpdateCause.RULES]
    moved = {
        cid
        for cid, r in after.items()
        if (r.tier, r.segments) != (before[cid].tier, before[cid].segments)
        or r.lifecycle_stage != before[cid].lifecycle_stage
    }
    assert {u.customer_id for u in rule_updates} == moved
    assert job["changed"] == len(moved)
    for u in rule_updates:
        assert (u.tier_new, u.profile.lifecycle_stage) == (
            want[u.customer_id].tier,
            after[u.customer_id].lifecycle_stage,
        )


def with_big_spenders() -> dict[str, Any]:
    """A segment added, the ladder kept: a publish reads only the facts the new rule reads."""
    rules = default_rules()
    rules["segments"].append({"name": "big", "when": {"field": "total_value", "op": "gte", "value": 300}})
    return rules


@pytest.mark.parametrize("rules", [stricter_rules, with_big_spenders], ids=["ladder", "segment"])
async def test_a_customer_rewritten_since_a_publish_step_read_it_is_derived_again(
    api: Api, monkeypatch: pytest.MonkeyPatch, rules: Callable[[], dict[str, Any]]
) -> None:
    # Every page comes back as it was before some other write: the tier read differs from the
    # row's when the step locks it, so each customer is derived again from the locked row.
    read = api.service.repo.standings_after

    async def read_before_a_write(
        session: Any, cursor: str | None, limit: int, fields: Collection[str] | None = None
    ) -> list[Standing]:
        return [
            dataclasses.replace(s, tier="since_rewritten") for s in await read(session, cursor, limit, fields)
        ]

    monkeypatch.setattr(api.service.repo, "standings_after", read_before_a_write)
    before = await stored_rows(api)
    job = await publish_and_run(api, rules())

    want = expected(rules())
    after = await stored_rows(api)
    assert {cid: (r.tier, r.segments) for cid, r in after.items()} == {
        cid: (a.tier, list(a.segments)) for cid, a in want.items()
    }
    moved = {
        cid for cid, r in after.items() if (r.tier, r.segments) != (before[cid].tier, before[cid].segments)
    }
    assert moved
    rule_updates = [u for u in await api.outbox_updates() if u.cause == UpdateCause.RULES]
    assert {u.customer_id for u in rule_updates} == moved
    assert job["changed"] == len(moved)


async def test_publishes_over_versions_with_other_ladders_read_what_each_needs(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # v2 changes the ladder; those it does not move stay assigned by v1. v3 adds a segment to
    # v2: v2's customers are read with the new rule's one fact, v1's (another ladder) whole,
    # and everyone ends where evaluating v3 from scratch puts them.
    await publish_and_run(api, stricter_rules())
    at_v1 = {cid for cid, r in (await stored_rows(api)).items() if r.rule_version == 1}
    assert at_v1
    assert len(at_v1) < 24
    v3 = stricter_rules()
    v3["segments"].append({"name": "big", "when": {"field": "total_value", "op": "gte", "value": 300}})
    read: list[tuple[Collection[str] | None, list[Standing]]] = []
    standings_after = api.service.repo.standings_after

    async def noting(
        session: Any, cursor: str | None, limit: int, fields: Collection[str] | None = None
    ) -> Any:
        page = await standings_after(session, cursor, limit, fields)
        read.append((fields, page))
        return page

    monkeypatch.setattr(api.service.repo, "standings_after", noting)
    before = await stored_rows(api)
    job = await publish_and_run(api, v3)

    assert {frozenset(f) if f is not None else None for f, _ in read} == {frozenset({"total_value"})}
    assert all(set(s.facts) == {"total_value"} for _, page in read for s in page)
    want = expected(v3)
    after = await stored_rows(api)
    assert {cid: (r.tier, r.segments) for cid, r in after.items()} == {
        cid: (a.tier, list(a.segments)) for cid, a in want.items()
    }
    moved = {
        cid for cid, r in after.items() if (r.tier, r.segments) != (before[cid].tier, before[cid].segments)
    }
    assert moved & at_v1
    assert moved - at_v1
    rule_updates = [
        u for u in await api.outbox_updates() if u.cause == UpdateCause.RULES and u.rule_version == 3
    ]
    assert {u.customer_id for u in rule_updates} == moved
    assert job["changed"] == len(moved)
    for u in rule_updates:
        assert "big" in u.segments_entered or "big" in u.segments_left or u.tier_old != u.tier_new
        assert u.profile.email == (await api.customer(u.customer_id))["profile"]["email"]


async def test_a_published_time_condition_is_kept_as_time_passes(api: Api) -> None:
    # The new segment flips for a lapsed customer sooner than anything the old rules or the
    # facts would have looked at them for: the publish must bring their next check forward.
    rules = default_rules()
    rules["segments"].append(
        {"name": "long_gone", "when": {"field": "last_purchase_at", "op": "older_than_days", "value": 200}}
    )
    before = await stored_rows(api)
    await publish_and_run(api, rules)
    after = await stored_rows(api)
    assert any(
        a.next_check_at is not None and (b.next_check_at is None or a.next_check_at < b.next_check_at)
        for a, b in ((after[cid], before[cid]) for cid in after)
    )
    for days in (1, 10, 31, 45, 61, 100, 181, 250, 400):
        at = NOW + timedelta(days=days)
        api.service.clock = lambda at=at: at  # type: ignore[misc]
        await api.service.sweep(limit=4)
        want = expected(rules, at)
        rows = await stored_rows(api)
        for cid, row in rows.items():
            assert (row.tier, row.segments) == (want[cid].tier, list(want[cid].segments)), (days, cid)
            assert row.next_check_at is None or row.next_check_at > at


async def test_a_replayed_history_is_judged_as_of_itself_and_the_sweep_announces_at_risk(api: Api) -> None:
    # Months of history arriving at once (a replay, or a backend catching up): the last
    # purchase was 100 days ago, so time alone has made the customer at_risk since.
    cid = "c-replayed"
    await seed(
        api.service,
        [
            profile("crm-r", NOW - 200 * DAY, customer_id=cid, email="r@example.com"),
            purchase("shop-r1", NOW - 200 * DAY, "r1", customer_id=cid),
            purchase("shop-r2", NOW - 100 * DAY, "r2", customer_id=cid),
        ],
    )
    [replayed] = [u for u in await api.outbox_updates() if u.customer_id == cid]
    assert (replayed.cause, replayed.occurred_at) == (UpdateCause.EVENTS, NOW - 100 * DAY)
    assert replayed.profile.lifecycle_stage == "active"
    assert "at_risk" not in replayed.segments_entered
    row = (await stored_rows(api))[cid]
    assert row.updated_at == NOW - 100 * DAY
    assert row.next_check_at is not None
    assert row.next_check_at <= NOW  # the sweep's index finds them

    noticed = NOW + timedelta(hours=1)  # the sweep comes by later than the batch
    api.service.clock = lambda: noticed
    assert await api.service.sweep() >= 1
    [swept] = [u for u in await api.outbox_updates() if u.customer_id == cid and u.cause == UpdateCause.TIME]
    assert (swept.occurred_at, swept.triggering_events) == (noticed, [])
    assert swept.segments_entered == ["at_risk"]
    assert swept.profile.lifecycle_stage == "at_risk"
    row = (await stored_rows(api))[cid]
    assert (row.lifecycle_stage, row.updated_at) == ("at_risk", noticed)
    assert row.next_check_at is not None
    assert row.next_check_at > noticed
    members = (await api.get("/v1/segments/at_risk/customers", params={"limit": 1000})).json()
    assert cid in [c["customer_id"] for c in members["customers"]]
    assert await api.service.sweep() == 0  # announced once

    # A late event takes the row back to the customer's latest event; the next sweep brings it
    # forward again, and that is a change of its own, under its own id (not dropped downstream).
    await seed(api.service, [profile("crm-late", NOW - 120 * DAY, customer_id=cid, name="Late")])
    late = [u for u in await api.outbox_updates() if u.customer_id == cid][-1]
    assert (late.occurred_at, late.segments_left) == (NOW - 100 * DAY, ["at_risk"])
    again = noticed + timedelta(hours=1)
    api.service.clock = lambda: again
    await api.service.sweep()
    swept_twice = [
        u for u in await api.outbox_updates() if u.customer_id == cid and u.cause == UpdateCause.TIME
    ]
    assert [(u.occurred_at, u.segments_entered) for u in swept_twice] == [
        (noticed, ["at_risk"]),
        (again, ["at_risk"]),
    ]
    assert len({u.event_id for u in swept_twice}) == 2


async def test_a_refund_of_an_order_announces_no_second_purchase(api: Api) -> None:
    """The consumer's handler announces an order's first event only: a refund (or the purchase
    resent under another id) is applied, and its update carries no purchase to thank for."""
    cid = "refunded-1"
    await seed(api.service, [purchase("r-1", NOW - 3 * DAY, "o-r", "120.00", customer_id=cid)])
    await seed(api.service, [purchase("r-1-refund", NOW - DAY, "o-r", "0.00", customer_id=cid)])
    first, refund = [u for u in await api.outbox_updates() if u.customer_id == cid]
    assert [t.event_id for t in first.triggering_events] == ["r-1"]
    assert refund.triggering_events == []
    assert refund.profile.orders_count == 1


async def test_health_readiness_and_docs(api: Api) -> None:
    assert (await api.http.get("/healthz")).json() == {"status": "ok"}
    ready = await api.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["rules"] == {"ok": True, "published_version": 1}
    metrics = (await api.http.get("/metrics")).text
    assert 'retain_segmenter_customers_per_tier{tier="silver"}' in metrics
    spec = (await api.http.get("/openapi.json")).json()
    put = spec["paths"]["/v1/rules/draft"]["put"]
    example = put["requestBody"]["content"]["application/json"]["schema"]["examples"][0]
    assert example == default_rules()
    assert {"/v1/rules/preview", "/v1/rules/publish", "/v1/customers/{customer_id}"} <= set(spec["paths"])


# --- customers ------------------------------------------------------------------------------------


async def test_a_customer_with_tier_segments_and_why(api: Api) -> None:
    want = expected(default_rules())
    cid = next(c for c, a in want.items() if a.tier == "gold" and "high_value" in a.segments)
    body = await api.customer(cid)
    assert (body["tier"], body["segments"], body["rule_version"]) == ("gold", list(want[cid].segments), 1)
    assert body["profile"]["orders_count"] >= 5
    assert body["lifecycle_stage"] == body["profile"]["lifecycle_stage"]
    assert set(body["consents"]) <= {"email", "sms", "whatsapp"}
    why = body["why"]
    assert why["tier"]["assigned"] == "gold"
    gold = next(r for r in why["tier"]["rules"] if r["name"] == "gold")
    assert gold["matched"] is True
    leaves = {c["field"]: c for c in gold["why"]["children"]}
    assert leaves["total_value"]["matched"] is True
    assert leaves["total_value"]["expected"] == 4000
    assert leaves["total_value"]["actual"] == body["profile"]["total_value"]
    platinum = next(r for r in why["tier"]["rules"] if r["name"] == "platinum")
    assert platinum["matched"] is False
    matched_segments = {s["name"] for s in why["segments"] if s["matched"]}
    assert matched_segments == set(want[cid].segments)

    unknown = await api.get("/v1/customers/nobody")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"
    assert (await api.get("/v1/customers/" + "x" * 129)).status_code == 422


async def test_a_customer_id_with_a_slash_is_found(api: Api) -> None:
    """Ids are any non-blank text (acme/42 is a valid id): the route took one segment, so the
    customer, listed in its segments, answered 404 to its own URL, %2F-encoded or not."""
    await seed(api.service, [purchase("slash-1", NOW - DAY, "o-1", customer_id="acme/42")])
    for url in ("/v1/customers/acme%2F42", "/v1/customers/acme/42"):
        response = await api.get(url)
        assert response.status_code == 200, (url, response.text)
        assert response.json()["customer_id"] == "acme/42"
    assert (await api.get("/v1/customers/acme/43")).status_code == 404


async def test_segment_members_page_through_everyone_exactly_once(api: Api) -> None:
    members = sorted(c for c, a in expected(default_rules()).items() if "loyal" in a.segments)
    assert len(members) == 11
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        response = await api.get("/v1/segments/loyal/customers", key=api.reader, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["segment"] == "loyal"
        assert len(page["customers"]) <= 3
        seen += [c["customer_id"] for c in page["customers"]]
        assert all(c["entered_at"] for c in page["customers"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == members
    assert pages == 4

    everyone = (await api.get("/v1/segments/loyal/customers", params={"limit": 1000})).json()
    assert [c["customer_id"] for c in everyone["customers"]] == members
    assert everyone["next_cursor"] is None

    assert (await api.get("/v1/segments/no_such_segment/customers")).status_code == 404
    for bad in (0, -1, 1001, "many"):
        assert (await api.get("/v1/segments/loyal/customers", params={"limit": bad})).status_code == 422


async def test_segments_follow_a_publish(api: Api) -> None:
    etag = await put_draft(api, stricter_rules())
    await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})
    await api.run_jobs()
    loyal = (await api.get("/v1/segments/loyal/customers", params={"limit": 1000})).json()
    want = sorted(c for c, a in expected(stricter_rules()).items() if "loyal" in a.segments)
    assert [c["customer_id"] for c in loyal["customers"]] == want


@pytest.mark.parametrize("publish", [False, True])
async def test_tiers_and_segments_are_listed_with_their_sizes(api: Api, publish: bool) -> None:
    """What a marketer looks at first: which segments there are and how many are in each."""
    rules = default_rules()
    if publish:
        rules = stricter_rules()
        etag = await put_draft(api, rules)
        await api.post("/v1/rules/publish", **{"If-Match": f'"{etag}"'})
        await api.run_jobs()
    want = expected(rules)
    tiers = (await api.get("/v1/tiers", key=api.reader)).json()
    assert tiers["version"] == (2 if publish else 1)
    ladder = [t["name"] for t in rules["tiers"]] + ["none"]
    assert [(t["name"], t["customers"]) for t in tiers["tiers"]] == [
        (name, sum(1 for a in want.values() if a.tier == name)) for name in ladder
    ]
    assert tiers["tiers"][0]["description"] == rules["tiers"][0].get("description", "")
    segments = (await api.get("/v1/segments", key=api.reader)).json()
    assert [(g["name"], g["customers"]) for g in segments["segments"]] == [
        (r["name"], sum(1 for a in want.values() if r["name"] in a.segments)) for r in rules["segments"]
    ]
    assert (await api.get("/v1/segments", key=api.stranger)).status_code == 403


# --- auth and bad input ------------------------------------------------------------------------------


async def test_auth_and_scopes(api: Api) -> None:
    anonymous = await api.http.get("/v1/rules/draft")
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    bad = await api.get("/v1/rules/draft", key="rk_deadbeef_nope")
    assert bad.status_code == 401

    assert (await api.get("/v1/rules/draft", key=api.reader)).status_code == 200
    etag = await api.draft_etag()
    forbidden = await api.put("/v1/rules/draft", default_rules(), key=api.reader, **{"If-Match": f'"{etag}"'})
    assert forbidden.status_code == 403
    assert "rules:write" in forbidden.json()["error"]["message"]
    publish = await api.post("/v1/rules/publish", key=api.reader, **{"If-Match": f'"{etag}"'})
    assert publish.status_code == 403
    assert (await api.post("/v1/rules/rollback/1", key=api.reader)).status_code == 403
    assert (await api.get("/v1/rules/draft", key=api.stranger)).status_code == 403
    assert (await api.get("/v1/customers/c-000001", key=api.stranger)).status_code == 403
    assert [e["action"] for e in (await api.get("/v1/rules/audit")).json()] == ["publish"]


def one_tier(when: Any, name: Any = "t") -> dict[str, Any]:
    return {"tiers": [{"name": name, "when": when}], "segments": []}


def nested(depth: int) -> dict[str, Any]:
    tree: dict[str, Any] = {"field": "orders_count", "op": "gte", "value": 1}
    for _ in range(depth):
        tree = {"not": tree}
    return one_tier(tree)


BAD_BODIES: list[Any] = [
    [],
    "rules",
    {"tiers": None, "segments": None},
    {"tiers": [{"name": 5, "when": []}], "segments": [{}]},
    one_tier({"all": 5}),
    one_tier({"field": "total_value", "op": "between", "value": [5, "x"]}),
    one_tier({"field": "total_value", "op": "between", "value": [9, 1]}),
    one_tier({"field": "total_value", "op": "in", "value": [[1], {"a": 1}]}),
    one_tier({"field": "first_seen_at", "op": "gt", "value": "2026-13-45T99:00:00Z"}),
    one_tier({"field": "first_seen_at", "op": "within_days", "value": 1e300}),
    one_tier({"field": "x" * 10_000, "op": "eq", "value": 1}, name="t" * 100),
    one_tier({"field": "orders_count", "op": "exists", "value": "yes"}),
    one_tier({"any": [], "all": []}),
    one_tier({"field": "orders_count", "op": "eq", "value": True}),
    {"tiers": [{"name": f"t{i}", "when": {"all": []}} for i in range(21)], "segments": []},
    nested(200),
]


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_bad_rules_are_a_4xx_never_a_5xx(api: Api, body: Any) -> None:
    etag = await api.draft_etag()
    for response in (
        await api.put("/v1/rules/draft", body, **{"If-Match": f'"{etag}"'}),
        await api.post("/v1/rules/preview", body),
    ):
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]["message"]
    validated = await api.post("/v1/rules/validate", body)
    assert validated.status_code in (200, 422), validated.text
    if validated.status_code == 200:
        assert validated.json()["valid"] is False
    assert await api.draft_etag() == etag


async def test_numbers_beyond_64_bits_are_stored_or_refused_never_a_5xx(api: Api) -> None:
    # JSON numbers have no size limit and the rules' "number" type sets none either.
    rules = default_rules()
    rules["tiers"][0]["when"]["all"][0]["value"] = 10**30
    response = await api.put("/v1/rules/draft", rules, **{"If-Match": f'"{await api.draft_etag()}"'})
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert (await api.get("/v1/rules/draft")).json()["rules"] == rules
    preview = await api.post("/v1/rules/preview", rules)
    assert preview.status_code in (200, 422), preview.text


async def test_an_event_the_contract_accepts_can_be_stored(api: Api) -> None:
    # A free-form attribute may be any JSON integer: either the contract refuses it or the
    # segmenter stores it; accepting it at ingest and failing in the consumer loses the event.
    try:
        event = profile("crm-big", NOW, customer_id="c-big", attributes={"card": 10**30})
    except ValidationError:
        return
    await seed(api.service, [event])
    body = await api.customer("c-big")
    assert body["tier"] == "none"


async def test_malformed_requests_are_a_4xx(api: Api) -> None:
    auth = api.auth()
    raw = await api.http.put(
        "/v1/rules/draft", content=b'{"tiers": [', headers={**auth, "Content-Type": "application/json"}
    )
    assert raw.status_code in (400, 422)
    deep = b'{"not":' * 5000 + b"{}" + b"}" * 5000
    very_deep = await api.http.post(
        "/v1/rules/validate", content=deep, headers={**auth, "Content-Type": "application/json"}
    )
    assert 400 <= very_deep.status_code < 500
    text = await api.http.put(
        "/v1/rules/draft", content=json.dumps(default_rules()), headers={**auth, "Content-Type": "text/plain"}
    )
    assert 400 <= text.status_code < 500
    assert (await api.post("/v1/rules/rollback/abc")).status_code == 422
    assert (await api.post("/v1/rules/preview?sample=-1", default_rules())).status_code == 422
    assert (await api.post("/v1/rules/publish?note=" + "x" * 501, **{"If-Match": '"x"'})).status_code == 422
    long_job = await api.get("/v1/rules/jobs/" + "j" * 37)
    assert long_job.status_code == 422


async def test_replayed_batches_change_nothing(api: Api) -> None:
    before = await api.outbox_updates()
    snapshot = {cid: await api.customer(cid) for cid in list(events_by_customer())[:5]}
    await seed(api.service, list(demo_events()), batch=37)
    assert await api.outbox_updates() == before
    for cid, body in snapshot.items():
        assert await api.customer(cid) == body
    assert len({u.event_id for u in before}) == len(before)
    assert {u.cause for u in before} == {UpdateCause.EVENTS, UpdateCause.TIME}  # the fixture's sweep
