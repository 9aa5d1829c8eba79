"""The marketers' API on a real database (SQLite and PostgreSQL): journeys round trip, are
validated with JSON paths, pause and resume take effect on the next batch, stats count the
ledger; template overrides are validated in the sandbox, previewed, sent by a separate sender
process, and reset to the default."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.messenger.admin import MessengerAdmin
from services.messenger.app import create_app
from services.messenger.decision import in_holdout
from services.messenger.service import MessengerService
from services.messenger.templates import TemplateKey
from shared.auth import create_key
from shared.events import (
    Channel,
    ConsentState,
    CustomerUpdate,
    EventType,
    SupportAction,
    TriggeringEvent,
    UpdateCause,
)
from tests.messenger.test_service import (
    NOON,
    World,
    customer_not_in_holdout,
    delivered,
    messages,
    profile,
    purchase_update,
    world,  # noqa: F401 - the fixture, shared with the service's tests
)

pytestmark = pytest.mark.integration

OVERRIDE_HE = (
    "תודה {{ first_name or '' }} על הזמנה {{ last_order.id }}! מבצע אביב. להסרה: {{ unsubscribe_url }}"
)


@dataclass
class Clients:
    writer: httpx.AsyncClient
    reader: httpx.AsyncClient
    anonymous: httpx.AsyncClient


@pytest.fixture
async def api(world: World, tmp_path: Path) -> AsyncIterator[Clients]:  # noqa: F811
    app = create_app(world.service.settings)
    app.state.service = world.service
    keys = tmp_path / "api_keys.json"
    _, writer = create_key(keys, ["messages:read", "messages:write"])
    _, reader = create_key(keys, ["messages:read"])
    transport = httpx.ASGITransport(app=app)
    base = "https://retain.example"
    async with (
        httpx.AsyncClient(transport=transport, base_url=base, headers={"X-API-Key": writer}) as w,
        httpx.AsyncClient(transport=transport, base_url=base, headers={"X-API-Key": reader}) as r,
        httpx.AsyncClient(transport=transport, base_url=base) as a,
    ):
        yield Clients(w, r, a)


# PostgreSQL only: SQLite's transaction holds its write lock from the start, so the two saves
# take turns there.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_first_two_template_overrides_saved_at_once_are_both_kept(
    world: World,  # noqa: F811 - the fixture
    api: Clients,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before any override there is no row to lock: two saves at once each read none and kept
    only its own; both answered 200. The row is made first, so the second save waits for it."""
    repo = world.service.repo
    real_setting = repo.setting

    async def slow_read(session: Any, name: str, **kw: Any) -> Any:
        found = await real_setting(session, name, **kw)
        await asyncio.sleep(0.2)  # the other save reads meanwhile
        return found

    monkeypatch.setattr(repo, "setting", slow_read)
    he = {"text": "תודה על הזמנה {{ last_order.id }}! {{ opt_out }}"}
    en = {"text": "Thanks for order {{ last_order.id }}! {{ opt_out }}"}
    first, second = await asyncio.gather(
        api.writer.put("/v1/templates/thank_you/sms/he", json=he),
        api.writer.put("/v1/templates/thank_you/sms/en", json=en),
    )
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    monkeypatch.undo()
    for url, body in (("/v1/templates/thank_you/sms/he", he), ("/v1/templates/thank_you/sms/en", en)):
        stored = (await api.reader.get(url)).json()
        assert (stored["overridden"], stored["text"]) == (True, body["text"])


def paths(response: httpx.Response) -> set[str]:
    assert response.status_code == 422, response.text
    return {d["path"] for d in response.json()["error"]["details"]}


VIP = {
    "name": "vip_thanks",
    "description": "Thank platinum customers.",
    "trigger": {"event": "purchase"},
    "entry": {"field": "tier", "op": "eq", "value": "platinum"},
    "template": "thank_you",
    "reentry": "once_per_days",
    "reentry_days": 7,
}


# --- journeys ----------------------------------------------------------------------------------


async def test_journeys_round_trip(api: Clients) -> None:
    listed = (await api.reader.get("/v1/journeys")).json()
    defaults = {j["name"]: j["enabled"] for j in listed["journeys"]}
    assert set(defaults) == {
        "welcome", "thank_you", "complaint_ack", "feedback_survey", "tier_upgrade", "at_risk", "win_back",
    }  # fmt: skip
    assert all(defaults.values())

    created = await api.writer.post("/v1/journeys", json=VIP)
    assert created.status_code == 201, created.text
    assert created.json()["holdout_percent"] == 0
    assert (await api.writer.post("/v1/journeys", json=VIP)).status_code == 409
    assert (await api.reader.get("/v1/journeys/vip_thanks")).json()["entry"] == VIP["entry"]

    replaced = await api.writer.put("/v1/journeys/vip_thanks", json={**VIP, "holdout_percent": 20})
    assert replaced.status_code == 200, replaced.text
    after = (await api.reader.get("/v1/journeys")).json()
    assert next(j for j in after["journeys"] if j["name"] == "vip_thanks")["holdout_percent"] == 20
    assert after["updated_by"] != "system"

    assert (await api.writer.delete("/v1/journeys/vip_thanks")).status_code == 204
    assert (await api.reader.get("/v1/journeys/vip_thanks")).status_code == 404
    assert (await api.writer.delete("/v1/journeys/vip_thanks")).status_code == 404
    assert (await api.writer.put("/v1/journeys/vip_thanks", json=VIP)).status_code == 404
    assert (await api.reader.get("/v1/journeys/Not-A-Name")).status_code == 422


async def test_invalid_journeys_are_422_naming_the_json_path(api: Clients) -> None:
    bad_condition = await api.writer.post(
        "/v1/journeys", json={**VIP, "entry": {"field": "nope", "op": "eq", "value": 1}}
    )
    assert paths(bad_condition) == {"$.entry.field"}
    assert "unknown field 'nope'" in bad_condition.text

    unknown_template = await api.writer.post("/v1/journeys", json={**VIP, "template": "no_such"})
    assert paths(unknown_template) == {"$.template"}

    # A key written twice: the last would be kept and the first dropped without a word.
    twice = json.dumps(VIP)[:-1] + ', "holdout_percent": 0, "holdout_percent": 50}'
    repeated = await api.writer.post(
        "/v1/journeys", content=twice, headers={"Content-Type": "application/json"}
    )
    assert repeated.status_code == 422
    assert repeated.json()["error"]["details"] == [
        {"path": "$", "message": "'holdout_percent' is given more than once"}
    ]

    bad_reentry = await api.writer.put(
        "/v1/journeys/thank_you", json={**VIP, "name": "thank_you", "reentry": "sometimes"}
    )
    assert paths(bad_reentry) == {"$.reentry"}

    renamed = await api.writer.put("/v1/journeys/thank_you", json=VIP)
    assert paths(renamed) == {"$.name"}

    nested = await api.writer.post(
        "/v1/journeys",
        json={**VIP, "wait": {"hours": 1, "unless": {"field": "tier", "op": "gt", "value": "x"}}},
    )
    assert paths(nested) == {"$.wait.unless.op"}

    # A trigger that can never fire would be an enabled journey that silently sends nothing.
    never = await api.writer.post("/v1/journeys", json={**VIP, "trigger": {}})
    assert paths(never) == {"$.trigger"}
    assert "a trigger needs one of event" in never.text
    complaint_purchase = await api.writer.post(
        "/v1/journeys", json={**VIP, "trigger": {"event": "purchase", "complaint": True}}
    )
    assert paths(complaint_purchase) == {"$.trigger"}
    assert "only with event 'support'" in complaint_purchase.text
    # A value no customer's snapshot can have: a journey that would never (or always) enter.
    typo = {"all": [{"field": "lifecycle_stage", "op": "eq", "value": "lapsd"}]}
    stage = await api.writer.post("/v1/journeys", json={**VIP, "entry": typo})
    assert paths(stage) == {"$.entry.all[0].value"}
    assert "did you mean 'lapsed'?" in stage.text
    always = {"field": "p_alive", "op": "lte", "value": 2}
    unless = await api.writer.post("/v1/journeys", json={**VIP, "wait": {"hours": 1, "unless": always}})
    assert paths(unless) == {"$.wait.unless.value"}
    # A cool-off keyed by a reason no cancellation carries would silently never apply.
    cool_off = {"hours": 720, "by_churn_reason_days": {"prise": 14, "service": -3, "both": 30, "price?": 1}}
    reasons = await api.writer.post("/v1/journeys", json={**VIP, "wait": cool_off})
    assert paths(reasons) == {
        "$.wait.by_churn_reason_days.prise",
        "$.wait.by_churn_reason_days.service",
        "$.wait.by_churn_reason_days['price?']",
    }
    assert "unknown churn reason 'prise'; did you mean 'price'?" in reasons.text
    assert "-3 days: a cool-off is 0 to 365 days" in reasons.text
    # A duration past any use (a unit slip), or infinite as a JSON reader takes 1e400: its
    # times would overflow, and every update the journey matched would fail instead of sending.
    huge = {**VIP, "ttl_hours": 1e12, "reentry_days": 3651, "attempt_spacing_days": "@"}
    body = json.dumps(huge).replace('"@"', "1e400")
    durations = await api.writer.post(
        "/v1/journeys", content=body, headers={"Content-Type": "application/json"}
    )
    assert paths(durations) == {"$.ttl_hours", "$.reentry_days", "$.attempt_spacing_days"}
    assert "1000000000000 hours: at most 8760 hours" in durations.text
    assert "inf days: at most 365 days" in durations.text
    # Nothing of it was stored.
    names = {j["name"] for j in (await api.reader.get("/v1/journeys")).json()["journeys"]}
    assert "vip_thanks" not in names


async def test_two_editors_of_one_journey_do_not_overwrite_each_other_when_they_send_the_etag(
    api: Clients,
) -> None:
    """A raised the holdout to 20 while B, who read the journey before, set its re-entry: B's
    PUT overwrote A's edit (no ETag to send). With If-Match, B gets a 412 and reads again."""
    read = await api.reader.get("/v1/journeys/thank_you")
    etag = read.headers["ETag"]
    journey = read.json()
    a = await api.writer.put(
        "/v1/journeys/thank_you", json={**journey, "holdout_percent": 20}, headers={"If-Match": etag}
    )
    assert a.status_code == 200, a.text
    assert a.headers["ETag"] not in ("", etag)
    b = await api.writer.put(
        "/v1/journeys/thank_you", json={**journey, "reentry_days": 14}, headers={"If-Match": etag}
    )
    assert b.status_code == 412, b.text
    assert "changed since you read it" in b.json()["error"]["message"]
    assert (await api.reader.get("/v1/journeys/thank_you")).json()["holdout_percent"] == 20
    for stale in (
        api.writer.post("/v1/journeys/thank_you/pause", headers={"If-Match": etag}),
        api.writer.delete("/v1/journeys/thank_you", headers={"If-Match": etag}),
    ):
        assert (await stale).status_code == 412
    # Read again, B's edit goes; without the header an edit goes as before (last one wins).
    again = await api.reader.get("/v1/journeys/thank_you")
    b2 = await api.writer.put(
        "/v1/journeys/thank_you",
        json={**again.json(), "reentry_days": 14},
        headers={"If-Match": again.headers["ETag"]},
    )
    assert b2.status_code == 200, b2.text
    assert (b2.json()["holdout_percent"], b2.json()["reentry_days"]) == (20, 14)
    paused = await api.writer.post("/v1/journeys/thank_you/pause", headers={"If-Match": b2.headers["ETag"]})
    assert paused.status_code == 200, paused.text
    assert (await api.writer.post("/v1/journeys/thank_you/resume")).status_code == 200


async def test_a_journey_saved_while_its_only_template_is_reset_is_refused_not_left_on_none(
    api: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Marketer A creates a journey on spring_sale while B resets spring_sale's only template:
    each read the other's setting outside its own lock, both succeeded, and every message of
    the journey failed. The reset here lands between A's checks and A's write."""
    url = "/v1/templates/spring_sale/email/en"
    body = {
        "subject": "Spring",
        "html": '<a href="{{ unsubscribe_url }}">x</a>',
        "text": "{{ unsubscribe_url }}",
    }
    assert (await api.writer.put(url, json=body)).status_code == 200
    validated = MessengerAdmin._validated

    async def reset_meanwhile(self: MessengerAdmin, raw: Any) -> Any:
        journey = await validated(self, raw)  # the template is there when A's journey is checked
        await self.reset_template(TemplateKey(journey="spring_sale", channel=Channel.EMAIL, locale="en"), "b")
        return journey

    monkeypatch.setattr(MessengerAdmin, "_validated", reset_meanwhile)
    journey = {**VIP, "name": "spring", "template": "spring_sale", "entry": None}
    response = await api.writer.post("/v1/journeys", json=journey)
    assert response.status_code == 422, response.text
    assert paths(response) == {"$.template"}
    assert "deleted meanwhile" in response.text
    assert (await api.reader.get("/v1/journeys/spring")).status_code == 404
    assert (await api.reader.get(url)).status_code == 404


async def test_a_template_edit_with_a_stale_etag_is_a_412_and_changes_nothing(api: Clients) -> None:
    url = "/v1/templates/thank_you/sms/en"
    read = await api.reader.get(url)
    etag = read.headers["ETag"]
    text = "Thanks for order {{ last_order.id }}! Opt out: {{ unsubscribe_url }}"
    first = await api.writer.put(url, json={"text": text}, headers={"If-Match": etag})
    assert first.status_code == 200, first.text
    assert (await api.reader.get(url)).headers["ETag"] == first.headers["ETag"] != etag
    late = await api.writer.put(url, json={"text": text + " :)"}, headers={"If-Match": etag})
    assert late.status_code == 412, late.text
    assert (await api.writer.delete(url, headers={"If-Match": etag})).status_code == 412
    assert (await api.reader.get(url)).json()["text"] == text
    assert (await api.writer.delete(url, headers={"If-Match": first.headers["ETag"]})).status_code == 204


async def test_a_paused_journey_sends_nothing_until_resumed(world: World, api: Clients) -> None:  # noqa: F811
    customer = customer_not_in_holdout("thank_you")
    paused = await api.writer.post("/v1/journeys/thank_you/pause")
    assert paused.status_code == 200
    assert paused.json()["enabled"] is False
    assert (await api.reader.get("/v1/journeys/thank_you")).json()["enabled"] is False

    await world.service.apply_batch(delivered([purchase_update(customer, 1, NOON)]))
    assert await messages(world, customer) == []

    assert (await api.writer.post("/v1/journeys/thank_you/resume")).json()["enabled"] is True
    await world.service.apply_batch(delivered([purchase_update(customer, 2, NOON + timedelta(minutes=1))]))
    assert [(r["journey"], r["status"]) for r in await messages(world, customer)] == [("thank_you", "queued")]


def resolved_update(customer: str, at: Any) -> CustomerUpdate:
    return CustomerUpdate(
        event_id=f"u-{customer}-resolved",
        customer_id=customer,
        occurred_at=at,
        cause=UpdateCause.EVENTS,
        triggering_events=[
            TriggeringEvent(
                event_id=f"r-{customer}",
                type=EventType.SUPPORT,
                occurred_at=at,
                ticket_id="T-9",
                action=SupportAction.RESOLVED,
                category="delivery",
            )
        ],
        tier_old="silver",
        tier_new="silver",
        rule_version=1,
        profile=profile(),
    )


async def test_stats_count_the_ledger(world: World, api: Clients) -> None:  # noqa: F811
    customers = [f"st{i}" for i in range(30)]
    held_out = {c for c in customers if in_holdout(c, "thank_you", 10)}
    updates = [purchase_update(c, 1, NOON) for c in customers]
    updates.append(purchase_update("no-consent", 1, NOON, consents={}))
    updates.append(resolved_update("waits", NOON))  # feedback_survey: a day later
    await world.service.apply_batch(delivered(updates))
    outcomes = await world.service.send_due()

    stats = (await api.reader.get("/v1/journeys/thank_you/stats")).json()
    assert stats["entered"] == 31
    assert stats["decided"] == 31
    assert stats["holdout"] == len(held_out)
    assert stats["sent"] == len(outcomes) == 30 - len(held_out)
    assert stats["not_sent"] == {"no_consent": 1}
    assert stats["pending"] == 0
    assert stats["waiting"] == 0
    assert stats["converted"] is None
    assert sum(stats["by_status"].values()) == stats["decided"]

    survey = (await api.reader.get("/v1/journeys/feedback_survey/stats")).json()
    assert (survey["entered"], survey["waiting"], survey["decided"]) == (1, 1, 0)
    assert (await api.reader.get("/v1/journeys/nope/stats")).status_code == 404


# --- templates ---------------------------------------------------------------------------------


async def test_templates_list_and_get(api: Clients) -> None:
    listed = (await api.reader.get("/v1/templates")).json()["templates"]
    keys = {(t["journey"], t["channel"], t["locale"]) for t in listed}
    assert {("win_back", c, loc) for c in ("email", "sms") for loc in ("he", "ar", "en")} <= keys
    assert not any(t["overridden"] for t in listed)
    one = (await api.reader.get("/v1/templates/thank_you/sms/he")).json()
    assert one["has_default"] is True
    assert "{{ last_order.id }}" in one["text"]
    assert (await api.reader.get("/v1/templates/thank_you/sms/fr")).status_code == 404
    assert (await api.reader.get("/v1/templates/thank_you/pigeon/he")).status_code == 422
    assert (await api.reader.get("/v1/templates/thank_you/sms/xx-!!")).status_code == 422


async def test_template_injection_and_bad_templates_are_refused(api: Clients) -> None:
    url = "/v1/templates/thank_you/sms/en"
    injection = await api.writer.put(url, json={"text": "{{ ''.__class__ }} {{ unsubscribe_url }}"})
    assert paths(injection) == {"$.text"}
    assert "internal attribute '__class__'" in injection.text
    mro = await api.writer.put(url, json={"text": "{{ unsubscribe_url.__class__.__mro__ }}"})
    assert paths(mro) == {"$.text"}
    assert "internal attribute" in mro.text
    unknown = await api.writer.put(url, json={"text": "{{ password }} {{ unsubscribe_url }}"})
    assert "password" in unknown.text
    assert paths(unknown) == {"$.text"}
    long_sms = await api.writer.put(url, json={"text": "x" * 400 + " {{ unsubscribe_url }}"})
    assert "segments" in long_sms.text
    assert paths(long_sms) == {"$.text"}
    no_unsubscribe = await api.writer.put(url, json={"text": "Thanks for {{ last_order.id }}"})
    assert paths(no_unsubscribe) == {"$.text"}
    html_in_sms = await api.writer.put(url, json={"text": "hi {{ unsubscribe_url }}", "html": "<p>x</p>"})
    assert paths(html_in_sms) == {"$.html"}
    huge = await api.writer.put(url, json={"text": "a" * 30_000})
    assert paths(huge) == {"$.text"}
    other_key = await api.writer.put(
        url, json={"key": {"journey": "welcome", "channel": "sms", "locale": "en"}, "text": "x"}
    )
    assert paths(other_key) == {"$.key"}
    assert (await api.reader.get(url)).json()["overridden"] is False


async def test_override_is_previewed_sent_by_the_sender_and_reset(world: World, api: Clients) -> None:  # noqa: F811
    # The sender is its own process: it loaded the templates before the marketer's change.
    sender = MessengerService(
        world.db, world.service.settings, None, world.service.providers, clock=world.clock
    )
    await sender.ensure_defaults()
    assert await sender.send_due() == []

    url = "/v1/templates/thank_you/sms/he"
    put = await api.writer.put(url, json={"text": OVERRIDE_HE})
    assert put.status_code == 200, put.text
    assert (put.json()["overridden"], put.json()["kind"]) == (True, "marketing")
    assert (await api.reader.get(url)).json()["text"] == OVERRIDE_HE

    preview = await api.reader.post(
        "/v1/templates/preview", json={"journey": "thank_you", "channel": "sms", "locale": "he"}
    )
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert body["overridden"] is True
    assert "מבצע אביב" in body["text"]
    assert (body["sms_encoding"], body["template"]) == ("UCS-2", "thank_you/sms/he")
    assert body["sms_segments"] in (1, 2)

    customer = customer_not_in_holdout("thank_you")
    await world.service.apply_batch(delivered([purchase_update(customer, 1, NOON)]))
    [outcome] = await sender.send_due()
    assert outcome.status == "sent"
    [file] = list(world.outbox.iterdir())
    sent = json.loads(file.read_text(encoding="utf-8"))["body"]
    assert "מבצע אביב" in sent
    assert "תודה נועה על הזמנה o1!" in sent

    assert (await api.writer.delete(url)).status_code == 204
    back = (await api.reader.get(url)).json()
    assert back["overridden"] is False
    assert "מבצע אביב" not in back["text"]
    again = await api.reader.post(
        "/v1/templates/preview", json={"journey": "thank_you", "channel": "sms", "locale": "he"}
    )
    assert "מבצע אביב" not in again.json()["text"]
    # As this deployment's SMS go (the sandbox writes as a number would): the keyword to reply.
    assert again.json()["text"].endswith("להסרה אפשר להשיב הסר")
    assert (await api.writer.delete(url)).status_code == 404

    world.clock.now = NOON + timedelta(days=8)
    await world.service.apply_batch(delivered([purchase_update(customer, 2, world.clock.now)]))
    [outcome] = await sender.send_due()
    assert outcome.status == "sent"
    _, newest = sorted(world.outbox.iterdir())  # named by created_at: oldest first
    assert "תודה על הזמנה מס' o2 ב-Retain!" in json.loads(newest.read_text(encoding="utf-8"))["body"]


async def test_a_template_for_a_new_journey_and_its_last_override(api: Clients) -> None:
    url = "/v1/templates/spring_sale/sms/en"
    assert (await api.writer.post("/v1/journeys", json={**VIP, "template": "spring_sale"})).status_code == 422
    put = await api.writer.put(
        url, json={"text": "Spring sale, {{ first_name or 'friend' }}! {{ unsubscribe_url }}"}
    )
    assert put.status_code == 200, put.text
    assert put.json()["has_default"] is False
    created = await api.writer.post("/v1/journeys", json={**VIP, "template": "spring_sale"})
    assert created.status_code == 201, created.text
    in_use = await api.writer.delete(url)
    assert in_use.status_code == 409
    assert "vip_thanks" in in_use.text
    assert (await api.writer.delete("/v1/journeys/vip_thanks")).status_code == 204
    assert (await api.writer.delete(url)).status_code == 204
    assert (await api.reader.get(url)).status_code == 404


@pytest.mark.parametrize(
    ("locale", "name", "first", "direction", "encoding"),
    [
        ("he-IL", "נועה לוי", "נועה", "rtl", "UCS-2"),
        ("ar", "د. عبد الله حداد", "عبد الله", "rtl", "UCS-2"),
        ("en-US", "Sarah Miller", "Sarah", "ltr", "GSM-7"),
    ],
)
async def test_preview_for_a_real_customer(
    world: World,  # noqa: F811
    api: Clients,
    locale: str,
    name: str,
    first: str,
    direction: str,
    encoding: str,
) -> None:
    update = purchase_update("p1", 1, NOON, name=name, locale=locale, tier="gold")
    await world.service.apply_batch(delivered([update]))

    email = await api.reader.post(
        "/v1/templates/preview", json={"journey": "thank_you", "channel": "email", "customer_id": "p1"}
    )
    assert email.status_code == 200, email.text
    body = email.json()
    assert body["lang"] == locale.partition("-")[0]
    assert body["direction"] == direction
    assert first in body["text"]
    assert f'dir="{direction}"' in body["html"]
    assert body["subject"]
    assert "last_order" in body["sample_data"]
    assert "first_name" not in body["sample_data"]

    sms = await api.reader.post(
        "/v1/templates/preview", json={"journey": "thank_you", "channel": "sms", "customer_id": "p1"}
    )
    assert (sms.json()["sms_encoding"], sms.json()["sms_segments"] in (1, 2)) == (encoding, True)
    assert first in sms.json()["text"]

    tier = await api.reader.post(
        "/v1/templates/preview", json={"journey": "tier_upgrade", "channel": "email", "customer_id": "p1"}
    )
    assert tier.status_code == 200, tier.text


async def test_a_draft_is_previewed_as_it_would_be_saved_and_nothing_is_stored(api: Clients) -> None:
    url = "/v1/templates/thank_you/sms/he"
    before = (await api.reader.get(url)).json()
    draft = {"text": OVERRIDE_HE}
    request = {"journey": "thank_you", "channel": "sms", "locale": "he", "draft": draft}
    # Running a template in the sandbox is what saving one needs: a read-only key may not.
    refused = await api.reader.post("/v1/templates/preview", json=request)
    assert refused.status_code == 403
    assert "messages:write" in refused.text
    preview = await api.writer.post("/v1/templates/preview", json=request)
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert (body["draft"], body["overridden"], body["template"]) == (True, False, "thank_you/sms/he")
    assert "מבצע אביב" in body["text"]
    assert body["sms_encoding"] == "UCS-2"
    assert (await api.reader.get(url)).json() == before  # nothing stored

    # What a save would refuse, the preview refuses, naming each problem.
    broken = await api.writer.post(
        "/v1/templates/preview", json={**request, "draft": {"text": "Hi {{ first_name "}}
    )
    assert broken.status_code == 422, broken.text
    assert paths(broken) == {"$.text"}
    no_link = await api.writer.post("/v1/templates/preview", json={**request, "draft": {"text": "Hi!"}})
    assert no_link.status_code == 422
    assert "unsubscribe_url" in no_link.text
    disguised = await api.writer.post(
        "/v1/templates/preview", json={**request, "draft": {"text": "Hi!", "kind": "transactional"}}
    )
    assert paths(disguised) == {"$.kind"}
    # A draft is for exactly its key: there is no fallback to render instead of it.
    regional = await api.writer.post(
        "/v1/templates/preview", json={**request, "locale": "he-IL", "draft": draft}
    )
    assert regional.json()["template"] == "thank_you/sms/he-IL"


async def test_preview_with_sample_data_and_unknowns(api: Clients) -> None:
    sample = await api.reader.post(
        "/v1/templates/preview", json={"journey": "win_back", "channel": "sms", "locale": "ar"}
    )
    assert sample.status_code == 200, sample.text
    assert sample.json()["direction"] == "rtl"
    assert "first_name" in sample.json()["sample_data"]
    fallback = await api.reader.post(
        "/v1/templates/preview", json={"journey": "welcome", "channel": "email", "locale": "he-IL"}
    )
    assert fallback.json()["template"] == "welcome/email/he"
    unknown = await api.reader.post(
        "/v1/templates/preview", json={"journey": "welcome", "channel": "sms", "customer_id": "nobody"}
    )
    assert unknown.status_code == 404
    assert (
        await api.reader.post("/v1/templates/preview", json={"journey": "nope", "channel": "sms"})
    ).status_code == 404


# --- auth ----------------------------------------------------------------------------------------


async def test_reads_need_messages_read_and_writes_messages_write(api: Clients) -> None:
    for method, url, payload in [
        ("GET", "/v1/journeys", None),
        ("GET", "/v1/journeys/thank_you/stats", None),
        ("GET", "/v1/templates", None),
        ("POST", "/v1/templates/preview", {"journey": "welcome", "channel": "sms"}),
    ]:
        assert (await api.anonymous.request(method, url, json=payload)).status_code == 401
        assert (await api.reader.request(method, url, json=payload)).status_code == 200
    writes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/v1/journeys", VIP),
        ("PUT", "/v1/journeys/thank_you", {**VIP, "name": "thank_you"}),
        ("DELETE", "/v1/journeys/thank_you", None),
        ("POST", "/v1/journeys/thank_you/pause", None),
        ("POST", "/v1/journeys/thank_you/resume", None),
        ("PUT", "/v1/templates/welcome/sms/en", {"text": "Hi {{ unsubscribe_url }}"}),
        ("DELETE", "/v1/templates/welcome/sms/en", None),
    ]
    for method, url, payload in writes:
        assert (await api.anonymous.request(method, url, json=payload)).status_code == 401
        assert (await api.reader.request(method, url, json=payload)).status_code == 403
    bad_key = {"X-API-Key": "rk_x_y"}
    assert (await api.anonymous.get("/v1/journeys", headers=bad_key)).status_code == 401
    # The reader's attempts changed nothing.
    assert (await api.reader.get("/v1/journeys/thank_you")).json()["enabled"] is True


async def test_a_campaign_written_for_email_only_goes_by_email_to_one_who_prefers_sms(
    world: World,  # noqa: F811
    api: Clients,
) -> None:
    """Its SMS failed to render ("no sms template for 'spring_sale'") though the customer can
    be reached by email: a channel the message has no template on is passed over."""
    put = await api.writer.put(
        "/v1/templates/spring_sale/email/en",
        json={
            "subject": "Spring is here",
            "html": '<p>New teas. <a href="{{ unsubscribe_url }}">Unsubscribe</a></p>',
            "text": "New teas. Unsubscribe: {{ unsubscribe_url }}",
        },
    )
    assert put.status_code == 200, put.text
    journey = {**VIP, "name": "spring", "template": "spring_sale", "entry": None}
    assert (await api.writer.post("/v1/journeys", json=journey)).status_code == 201, journey
    # thank_you answers the same purchase and would take the day's marketing cap first.
    thanks = (await api.reader.get("/v1/journeys/thank_you")).json()
    off = await api.writer.put("/v1/journeys/thank_you", json={**thanks, "enabled": False})
    assert off.status_code == 200, off.text
    customer = customer_not_in_holdout("spring")
    granted = ConsentState(granted=True, at=NOON - timedelta(days=3))
    update = purchase_update(
        customer,
        1,
        NOON,
        locale="en",
        preferred_channel=Channel.SMS,
        whatsapp=None,
        consents={Channel.EMAIL: granted, Channel.SMS: granted},
    )
    await world.service.apply_batch(delivered([update]))
    [outcome] = await world.service.send_due()
    assert outcome.status == "sent"
    [row] = await messages(world, customer)
    assert (row["journey"], row["channel"]) == ("spring", "email")
    [file] = list(world.outbox.iterdir())
    assert "New teas" in file.read_text(encoding="utf-8")


async def test_an_email_override_is_what_the_customer_gets(world: World, api: Clients) -> None:  # noqa: F811
    """A customer reachable only by email gets the email override of their language."""
    put = await api.writer.put(
        "/v1/templates/thank_you/email/en",
        json={
            "subject": "Thanks, {{ first_name or 'friend' }}",
            "html": "<p>Order {{ last_order.id }}: spring edition</p>",
            "text": "Order {{ last_order.id }}: spring edition",
        },
    )
    assert put.status_code == 200, put.text
    customer = customer_not_in_holdout("thank_you")
    update = purchase_update(
        customer,
        1,
        NOON,
        name="Sarah Miller",
        locale="en",
        preferred_channel=Channel.EMAIL,
        phone=None,
        whatsapp=None,
        consents={Channel.EMAIL: ConsentState(granted=True, at=NOON - timedelta(days=3))},
    )
    await world.service.apply_batch(delivered([update]))
    [outcome] = await world.service.send_due()
    assert outcome.status == "sent"
    [file] = list(world.outbox.iterdir())
    assert "spring edition" in file.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        # thank_you names the order; a segment's entry has none: every message failed.
        ({"trigger": {"segment_entered": "high_value"}}, "needs last_order"),
        ({"trigger": {"event": "purchase", "tier_upgrade": True}}, "needs last_order"),
        ({"template": "complaint_ack", "kind": "transactional"}, "needs ticket_id"),
    ],
)
async def test_a_journey_whose_template_needs_what_its_trigger_never_gives_is_refused(
    api: Clients, changes: dict[str, Any], fragment: str
) -> None:
    response = await api.writer.post("/v1/journeys", json={**VIP, **changes})
    assert response.status_code == 422, response.text
    assert paths(response) == {"$.template"}
    assert fragment in response.text
    assert (await api.reader.get("/v1/journeys/vip_thanks")).status_code == 404


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"trigger": {"segment_entered": "lapsed"}, "template": "win_back"}, "use kind 'marketing'"),
        (
            {"trigger": {"event": "cancellation"}, "template": "win_back", "wait": {"hours": 24 * 30}},
            "use kind 'marketing'",
        ),
        # A CRM's profile sync is no action of the customer's.
        ({"trigger": {"event": "profile"}, "template": "win_back"}, "use kind 'marketing'"),
        # The customer's purchase, but a marketing text with its opt-out link, sent past opt-outs.
        ({"trigger": {"event": "purchase"}, "template": "thank_you"}, "needs transactional templates"),
    ],
)
async def test_a_campaign_cannot_be_called_transactional_to_pass_the_opt_outs(
    api: Clients, changes: dict[str, Any], fragment: str
) -> None:
    """Transactional messages go past caps, quiet hours and marketing opt-outs: only an answer
    to the customer's own action, within a day, in a transactional text, may be one."""
    journey = {**VIP, "name": "promo", "kind": "transactional", **changes}
    response = await api.writer.post("/v1/journeys", json=journey)
    assert response.status_code == 422, response.text
    assert "$.kind" in paths(response)
    assert fragment in response.text
    assert (await api.reader.get("/v1/journeys/promo")).status_code == 404


async def test_a_template_a_marketing_journey_sends_cannot_skip_the_opt_out(api: Clients) -> None:
    """Calling a promotion 'transactional' would drop the opt-out link the law asks of it."""
    url = "/v1/templates/thank_you/sms/en"  # thank_you is a marketing journey
    put = await api.writer.put(url, json={"text": "20% off with CODE20", "kind": "transactional"})
    assert put.status_code == 422, put.text
    assert paths(put) == {"$.kind"}
    assert "thank_you" in put.text
    assert (await api.reader.get(url)).json()["overridden"] is False


async def test_a_marketing_message_without_the_opt_out_is_not_sent(world: World, api: Clients) -> None:  # noqa: F811
    """A marketing journey whose template is transactional (the journey API refuses to make one;
    one may be stored from before): the sender checks the rendered text too, and fails the
    message rather than send it without the link."""
    url = "/v1/templates/notice/sms/he"
    put = await api.writer.put(url, json={"text": "ההזמנה שלך בדרך.", "kind": "transactional"})
    assert put.status_code == 200, put.text
    journey = {**VIP, "name": "notice", "template": "notice", "kind": "transactional"}
    assert (await api.writer.post("/v1/journeys", json=journey)).status_code == 201
    # The journey API refuses to make it marketing with that template...
    refused = await api.writer.put("/v1/journeys/notice", json={**journey, "kind": "marketing"})
    assert paths(refused) == {"$.kind"}
    assert "notice/sms/he" in refused.text
    # ...but one stored before that check (written here directly) is still guarded at send time.
    async with world.db.transaction() as session:
        stored = [j.model_dump(mode="json") for j in await world.service.journeys(session)]
        stored = [{**j, "kind": "marketing"} if j["name"] == "notice" else j for j in stored]
        # A later version than the API's (the service reloads journeys on a new updated_at).
        await world.service.repo.put_setting(session, "journeys", stored, "before", NOON + timedelta(hours=1))

    # thank_you answers the same purchase and would take the day's marketing cap first.
    thanks = (await api.reader.get("/v1/journeys/thank_you")).json()
    off = await api.writer.put("/v1/journeys/thank_you", json={**thanks, "enabled": False})
    assert off.status_code == 200, off.text
    customer = customer_not_in_holdout("notice")
    update = purchase_update(customer, 1, NOON, tier="platinum")
    await world.service.apply_batch(delivered([update]))
    [outcome] = await world.service.send_due()
    assert outcome.status == "failed"
    [row] = await messages(world, customer)
    assert (row["journey"], row["status"]) == ("notice", "failed")
    assert "opt out" in row["reason"]
    assert not list(world.outbox.glob("*"))  # nothing reached the provider


async def test_a_journey_stored_before_the_trigger_check_still_loads(world: World, api: Clients) -> None:  # noqa: F811
    """The never-firing trigger is refused when a journey is written; one already stored (from
    before that check) must not make every read of the journeys fail: it can be listed and
    deleted, and the others keep deciding."""
    async with world.db.sessions() as session:
        stored = [j.model_dump(mode="json") for j in await world.service.journeys(session)]
    stored.append({**VIP, "name": "never", "trigger": {}})
    async with world.db.transaction() as session:
        await world.service.repo.put_setting(session, "journeys", stored, "before", NOON + timedelta(hours=1))
    listed = await api.reader.get("/v1/journeys")
    assert listed.status_code == 200, listed.text
    assert "never" in {j["name"] for j in listed.json()["journeys"]}
    customer = customer_not_in_holdout("thank_you")
    await world.service.apply_batch(delivered([purchase_update(customer, 1, NOON)]))
    assert [m["journey"] for m in await messages(world, customer)] == ["thank_you"]
    assert (await api.writer.delete("/v1/journeys/never")).status_code == 204


async def test_the_preview_shows_the_approved_whatsapp_template_a_message_would_go_with(
    world: World,  # noqa: F811
    api: Clients,
) -> None:
    """Most business-initiated WhatsApp goes as the approved template, not the free text: the
    preview says which one (or that there is none) and its variables as filled."""
    request = {"journey": "thank_you", "channel": "whatsapp", "locale": "he"}
    none = (await api.reader.post("/v1/templates/preview", json=request)).json()
    assert none["content_sid"] is None  # nothing configured: such a message goes on another channel
    assert set(none["content_variables"]) == {"1", "2"}
    sid = "HX" + "ab" * 16
    world.service.settings = world.service.settings.model_copy(
        update={"messenger_whatsapp_content_sids": {"thank_you.he": sid}}
    )
    configured = (await api.reader.post("/v1/templates/preview", json=request)).json()
    assert configured["content_sid"] == sid
    assert configured["content_variables"] == none["content_variables"]
    sms = (await api.reader.post("/v1/templates/preview", json={**request, "channel": "sms"})).json()
    assert (sms["content_sid"], sms["content_variables"]) == (None, {})
