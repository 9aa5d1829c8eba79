"""What marketers change through the API: journeys (create, replace, pause, delete, stats) and
template overrides (put, reset, preview).

Both live in ``messenger_settings`` — "journeys" as a list of ``Journey`` and "templates" as
a list of ``Template.to_json()`` — and every process reloads them when the row's updated_at
changes: the consumer on its next batch, the sender on its next pass. So every write here
moves updated_at forward, even when the clock has not (a frozen test clock, two edits in
one microsecond), or a process would keep its stale copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from services.messenger.config import MessengerSettings
from services.messenger.journeys import Journey, default_journeys, validate_journey
from services.messenger.service import MessengerService
from services.messenger.templates import (
    DEFAULT_LOCALE,
    OPTIONAL_VARIABLES,
    Rendered,
    Template,
    TemplateError,
    TemplateInvalidError,
    TemplateKey,
    TemplateNotFoundError,
    TemplateStore,
    build_variables,
    format_day,
    formatting_locale,
    in_language,
    journey_defaults,
    render,
    sample_variables,
    sms_variants,
    validate_template,
)
from shared.codec import content_etag
from shared.errors import InvalidInputError, NotFoundError, PreconditionFailedError, RetainError
from shared.events import Channel, MessageKind, ProfileSnapshot

JOURNEYS = "journeys"
TEMPLATES = "templates"
MAX_OVERRIDES = 500  # the setting is one JSON row, read by every process on every change

# Handed to a provider (what a customer may have seen).
SENT = ("sent", "delivered", "undelivered")
# Decided not to send, each status its own reason.
NOT_SENT = ("capped", "no_consent", "suppressed", "no_address", "expired", "cancelled", "failed")
# Decided to send, not sent yet.
PENDING = ("queued", "sending", "held_quiet_hours")

# What a message takes from its trigger rather than from the profile: a preview for a real
# customer has no trigger, so these come from the sample data (and the preview says so).
TRIGGER_VARIABLES = OPTIONAL_VARIABLES - {"first_name", "name"}


class JourneyNotFoundError(NotFoundError):
    code = "journey_not_found"


class JourneyExistsError(RetainError):
    status_code = 409
    code = "journey_exists"


class JourneyInvalidError(InvalidInputError):
    """A journey did not validate; details name each problem's JSON path (HTTP 422)."""

    code = "invalid_journey"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        shown = "; ".join(f"{e['path']}: {e['message']}" for e in errors[:5])
        super().__init__(f"invalid journey: {shown}", details=errors)


class TemplateInUseError(RetainError):
    status_code = 409
    code = "template_in_use"


class CustomerNotFoundError(NotFoundError):
    code = "customer_not_found"


@dataclass(frozen=True, slots=True)
class Journeys:
    journeys: list[Journey]
    updated_at: datetime | None
    updated_by: str | None


@dataclass(frozen=True, slots=True)
class JourneyStats:
    journey: str
    enabled: bool
    entered: int
    waiting: int
    decided: int
    sent: int
    pending: int
    holdout: int
    not_sent: dict[str, int]
    by_status: dict[str, int]


@dataclass(frozen=True, slots=True)
class TemplateEntry:
    key: TemplateKey
    overridden: bool
    has_default: bool


@dataclass(frozen=True, slots=True)
class Preview:
    rendered: Rendered
    overridden: bool
    customer_id: str | None
    sample_data: list[str]  # the variables filled with sample values, not the customer's
    draft: bool = False  # rendered from an unsaved body, not a stored template


def _version_after(previous: datetime | None, now: datetime) -> datetime:
    if previous is not None and now <= previous:
        return previous + timedelta(microseconds=1)
    return now


class MessengerAdmin:
    def __init__(self, service: MessengerService) -> None:
        self.service = service
        self.db = service.db
        self.repo = service.repo

    # --- journeys --------------------------------------------------------------------------------

    async def journeys(self) -> Journeys:
        async with self.db.sessions() as session:
            row = await self.repo.setting(session, JOURNEYS)
        if row is None:
            return Journeys(default_journeys(), None, None)
        return Journeys([Journey.model_validate(j) for j in row.value], row.updated_at, row.updated_by)

    async def journey(self, name: str) -> Journey:
        for journey in (await self.journeys()).journeys:
            if journey.name == name:
                return journey
        raise JourneyNotFoundError(f"no journey {name!r}")

    async def create_journey(self, raw: Mapping[str, Any], actor: str) -> Journey:
        journey = await self._validated(raw)

        def create(journeys: list[Journey]) -> list[Journey]:
            if any(j.name == journey.name for j in journeys):
                raise JourneyExistsError(f"journey {journey.name!r} exists; PUT it to replace it")
            return [*journeys, journey]

        await self._edit_journeys(create, actor)
        return journey

    async def replace_journey(
        self, name: str, raw: Mapping[str, Any], actor: str, if_match: str | None = None
    ) -> Journey:
        """``if_match``: the ETag of the journey the editor read (``journey_etag``); a 412 when
        it changed since, rather than an edit made meanwhile overwritten. None or ``*``: any."""
        if raw.get("name", name) != name:
            raise JourneyInvalidError(
                [{"path": "$.name", "message": f"must be {name!r}, the journey in the path"}]
            )
        journey = await self._validated({**raw, "name": name})
        await self._edit_journeys(
            lambda js: [journey if j.name == name else j for j in _unchanged(js, name, if_match)], actor
        )
        return journey

    async def delete_journey(self, name: str, actor: str, if_match: str | None = None) -> None:
        """Its waiting messages are cancelled when they come due (fire_waits)."""
        await self._edit_journeys(
            lambda js: [j for j in _unchanged(js, name, if_match) if j.name != name], actor
        )

    async def set_enabled(self, name: str, enabled: bool, actor: str, if_match: str | None = None) -> Journey:
        """Paused: no new entries, and its waiting messages are cancelled when they come due."""
        changed: list[Journey] = []

        def toggle(journeys: list[Journey]) -> list[Journey]:
            out = [
                j.model_copy(update={"enabled": enabled}) if j.name == name else j
                for j in _unchanged(journeys, name, if_match)
            ]
            changed.extend(j for j in out if j.name == name)
            return out

        await self._edit_journeys(toggle, actor)
        return changed[0]

    async def stats(self, name: str) -> JourneyStats:
        journey = await self.journey(name)
        async with self.db.sessions() as session:
            entered = await self.repo.count_entries(session, name)
            waiting = await self.repo.count_waiting(session, name)
            by_status = await self.repo.count_by(session, name)
        return JourneyStats(
            journey=name,
            enabled=journey.enabled,
            entered=entered,
            waiting=waiting,
            decided=sum(by_status.values()),
            sent=sum(by_status.get(s, 0) for s in SENT),
            pending=sum(by_status.get(s, 0) for s in PENDING),
            holdout=by_status.get("holdout", 0),
            not_sent={s: by_status[s] for s in NOT_SENT if by_status.get(s)},
            by_status=dict(sorted(by_status.items())),
        )

    async def _validated(self, raw: Mapping[str, Any]) -> Journey:
        async with self.db.sessions() as session:
            store = await self.service.load_template_overrides(session)
        errors = validate_journey(dict(raw), templates=store.journeys())
        if errors:
            raise JourneyInvalidError([e.to_dict() for e in errors])
        journey = Journey.model_validate(dict(raw))
        # Its templates are of its kind. A marketing message must show how to opt out: a
        # transactional template need not, and the sender would fail each of them
        # (TemplateRenderError) rather than send it. A transactional one answers the customer's
        # action: a win-back's text sent as transactional went past the opt-outs its link offers.
        named = [k for k in store.keys() if k.journey == journey.template]  # noqa: SIM118 - a list
        other = sorted(str(k) for k in named if (t := store.get(k)) and t.kind is not journey.kind)
        if other:
            message = f"{_KIND_NEEDS[journey.kind]}; {_other_kind(journey.kind).value}: {', '.join(other)}"
            raise JourneyInvalidError([{"path": "$.kind", "message": message}])
        return journey

    async def _edit_journeys(self, change: Callable[[list[Journey]], list[Journey]], actor: str) -> None:
        async with self.db.transaction() as session:
            # The templates' row first, as every template edit takes it: a journey saved on the
            # template a reset removed at the same moment was left on none (each read the other's
            # setting outside its own lock), and every message of it failed.
            templates = await self._locked_templates(session)
            row = await self.repo.setting(session, JOURNEYS, for_update=True)
            current = default_journeys() if row is None else [Journey.model_validate(j) for j in row.value]
            changed = change(current)
            names = TemplateStore(Template.from_json(v) for v in templates.value).journeys()
            gone = [
                {"path": "$.template", "message": f"unknown template {j.template!r} (deleted meanwhile)"}
                for j in changed
                if j not in current and j.template not in names
            ]
            if gone:
                raise JourneyInvalidError(gone)
            value = [j.model_dump(mode="json") for j in changed]
            at = _version_after(row.updated_at if row else None, self.service.clock())
            await self.repo.put_setting(session, JOURNEYS, value, actor, at)

    async def _locked_templates(self, session: Any) -> Any:
        """The templates' setting row, locked for this transaction (made first when there is
        none: no row to lock, and two first saves at once each kept only its own on PostgreSQL).
        Taken before the journeys' row by every edit of either, so they never wait on each
        other the other way round."""
        row = await self.repo.setting(session, TEMPLATES, for_update=True)
        if row is None:
            await self.repo.insert_setting_if_absent(session, TEMPLATES, [], self.service.clock())
            row = await self.repo.setting(session, TEMPLATES, for_update=True)
        return row

    # --- templates -------------------------------------------------------------------------------

    async def store(self) -> TemplateStore:
        async with self.db.sessions() as session:
            return await self.service.load_template_overrides(session)

    async def templates(self) -> list[TemplateEntry]:
        store = await self.store()
        keys = store.keys()  # a sorted list (not a dict view)
        return [TemplateEntry(k, store.is_overridden(k), store.default(k) is not None) for k in keys]

    async def template(self, key: TemplateKey) -> tuple[TemplateEntry, Template]:
        """Exactly this key, no locale fallback."""
        store = await self.store()
        found = store.get(key)
        if found is None:
            raise TemplateNotFoundError(f"no template {key}")
        return TemplateEntry(key, store.is_overridden(key), store.default(key) is not None), found

    async def put_template(
        self, key: TemplateKey, raw: Mapping[str, Any], actor: str, if_match: str | None = None
    ) -> tuple[TemplateEntry, Template]:
        """Validate (sandbox, variables, size, SMS segments) and keep as an override.
        ``if_match``: the ETag of the template the editor read, as for a journey."""
        async with self.db.sessions() as session:
            journeys = await self.service.journeys(session)
        template = await _checked_template(key, raw, journeys, self.service.settings)

        def put(overrides: dict[TemplateKey, Template], _journeys: list[Journey]) -> None:
            self._template_unchanged(overrides, key, if_match)
            if key not in overrides and len(overrides) >= MAX_OVERRIDES:
                raise TemplateInvalidError(
                    [TemplateError("$.key", f"{MAX_OVERRIDES} overrides at most; reset some first")]
                )
            overrides[key] = template

        await self._edit_templates(put, actor)
        return TemplateEntry(
            key, overridden=True, has_default=self.service.templates.default(key) is not None
        ), template

    async def reset_template(self, key: TemplateKey, actor: str, if_match: str | None = None) -> None:
        """Drop the override: the default applies again (404 when there is no override)."""

        def remove(overrides: dict[TemplateKey, Template], journeys: list[Journey]) -> None:
            self._template_unchanged(overrides, key, if_match)
            if overrides.pop(key, None) is None:
                raise TemplateNotFoundError(f"{key} has no override")
            left = TemplateStore(overrides.values())
            users = sorted(j.name for j in journeys if j.template == key.journey)
            if users and key.journey not in left.journeys():
                raise TemplateInUseError(
                    f"{key} is the last template of {key.journey!r}, used by {', '.join(users)}; "
                    "change or delete those journeys first"
                )

        await self._edit_templates(remove, actor)

    def _template_unchanged(
        self, overrides: Mapping[TemplateKey, Template], key: TemplateKey, if_match: str | None
    ) -> None:
        if if_match in (None, "*"):
            return
        current = overrides.get(key) or self.service.templates.default(key)
        if current is None or template_etag(current) != if_match:
            raise PreconditionFailedError(
                f"template {key} changed since you read it (stale ETag): GET it again and redo your edit"
            )

    async def _edit_templates(
        self, change: Callable[[dict[TemplateKey, Template], list[Journey]], None], actor: str
    ) -> None:
        """``change`` gets the overrides and the journeys as they stand under the lock."""
        async with self.db.transaction() as session:
            row = await self._locked_templates(session)
            journeys = await self.service.journeys(session)  # their edits wait on our lock
            overrides = {t.key: t for t in (Template.from_json(v) for v in row.value)}
            change(overrides, journeys)
            value = [overrides[k].to_json() for k in sorted(overrides, key=str)]
            at = _version_after(row.updated_at, self.service.clock())
            await self.repo.put_setting(session, TEMPLATES, value, actor, at)
        await self.store()  # this process renders with it at once; the others on their next read

    async def preview(
        self,
        template_name: str,
        channel: Channel,
        locale: str | None,
        customer_id: str | None,
        draft: Mapping[str, Any] | None = None,
    ) -> Preview:
        """Render as the sender would (absent optional variables empty), for a stored customer's
        profile or for sample data. The trigger's data (order, ticket, offer …) is always a sample.
        ``draft``: an unsaved template body for exactly this key, checked as a save would check it
        and rendered instead of the stored one, so that an edit can be seen before it is saved."""
        async with self.db.sessions() as session:
            store = await self.service.load_template_overrides(session)
            journeys = await self.service.journeys(session)
            customer = await self.repo.lock_customer(session, customer_id) if customer_id else None
        if customer_id and customer is None:
            raise CustomerNotFoundError(f"the messenger has not seen customer {customer_id!r}")
        profile = ProfileSnapshot.model_validate(customer.profile) if customer is not None else None
        locale = locale or (profile.locale if profile else None) or DEFAULT_LOCALE
        if draft is None:
            template = store.resolve(template_name, channel, locale)
        else:
            template = await _checked_template(
                template_key(template_name, channel, locale),
                draft,
                journeys,
                self.service.settings,
            )
        perks = self.service.settings.messenger_tier_perks
        brand = self.service.settings.brand
        sample = self._with_this_shops_offer(
            sample_variables(
                template.key.locale,
                perks_config=perks,
                brand=brand,
                public_url=self.service.settings.messenger_public_url,
                tier_names=self.service.settings.messenger_tier_names,
            ),
            template.key.locale,
        )
        if profile is None:
            variables, from_sample = sample, sorted(sample)
        else:
            own = build_variables(
                profile,
                None,
                locale=formatting_locale(profile.locale, template.key.locale),
                # The sample link: a real one would let any reader of the API unsubscribe them.
                unsubscribe_url=sample["unsubscribe_url"],
                perks_config=perks,
                brand=brand,
                tier_names=self.service.settings.messenger_tier_names,
            )
            trigger = {k: v for k, v in sample.items() if k in TRIGGER_VARIABLES}
            variables, from_sample = {**own, **trigger}, sorted({*trigger, "unsubscribe_url", "opt_out"})
        if channel is Channel.SMS:  # as this deployment's sender sends it: replies taken or not
            way = 0 if self.service.settings.sms_takes_replies else 1
            variables = sms_variants(variables, template.key.locale)[way]
        kind = next((j.kind for j in journeys if j.template == template_name), template.kind)
        sids = self.service.settings.messenger_whatsapp_content_sids
        rendered = await asyncio.to_thread(
            render, template, variables, strict=False, kind=kind, content_sids=sids
        )
        overridden = draft is None and store.is_overridden(template.key)
        return Preview(rendered, overridden, customer_id, from_sample, draft=draft is not None)

    def _with_this_shops_offer(self, sample: dict[str, Any], locale: str) -> dict[str, Any]:
        """The sample's offer as this shop's messages would say it: its configured value and
        validity (from today), or the code alone while none is configured."""
        s = self.service.settings
        out = {k: v for k, v in sample.items() if k not in ("offer_value", "offer_expires")}
        if value := in_language(s.messenger_offer_value, locale):
            out["offer_value"] = value
        if s.messenger_offer_valid_days is not None:
            last = self.service.clock().date() + timedelta(days=s.messenger_offer_valid_days)
            out["offer_expires"] = format_day(last, locale)
        return out


async def _checked_template(
    key: TemplateKey, raw: Mapping[str, Any], journeys: list[Journey], settings: MessengerSettings
) -> Template:
    """``raw`` as the template ``key`` (its kind defaulting to its journey's), with every problem
    a save would refuse: the same checks for a PUT and for the preview of a draft."""
    key_json = key.model_dump(mode="json")
    if "key" in raw and raw["key"] != key_json:
        raise TemplateInvalidError([TemplateError("$.key", f"must be {key_json}, the template in the path")])
    body = {**raw, "key": key_json}
    if "kind" not in body:
        spec = journey_defaults().get(key.journey)
        body["kind"] = (spec.kind if spec else MessageKind.MARKETING).value
    template = Template.from_json(body)
    # The journeys decide what a message is: a template cannot call itself transactional
    # (and so skip the opt-out link) while a marketing journey sends it.
    marketing = sorted(
        j.name for j in journeys if j.template == key.journey and j.kind is MessageKind.MARKETING
    )
    if marketing and template.kind is not MessageKind.MARKETING:
        raise TemplateInvalidError(
            [
                TemplateError(
                    "$.kind",
                    f"{', '.join(marketing)} sends this template as marketing: it must be 'marketing' "
                    "(and show {{ opt_out }} or {{ unsubscribe_url }})",
                )
            ]
        )
    # Rendering the sample data runs user code (bounded to about a second): off the loop.
    errors = await asyncio.to_thread(
        validate_template, template, settings.messenger_public_url, settings.brand
    )
    if errors:
        raise TemplateInvalidError(errors)
    return template


def _known(journeys: list[Journey], name: str) -> list[Journey]:
    if not any(j.name == name for j in journeys):
        raise JourneyNotFoundError(f"no journey {name!r}")
    return journeys


_KIND_NEEDS = {
    MessageKind.MARKETING: "a marketing journey needs marketing templates, which show how to opt out",
    MessageKind.TRANSACTIONAL: "a transactional journey needs transactional templates (written as the "
    "answer to the customer's action)",
}


def _other_kind(kind: MessageKind) -> MessageKind:
    return MessageKind.TRANSACTIONAL if kind is MessageKind.MARKETING else MessageKind.MARKETING


def _unchanged(journeys: list[Journey], name: str, if_match: str | None) -> list[Journey]:
    """``journeys`` if journey ``name`` is there and, given an ETag, still the one read."""
    current = next(j for j in _known(journeys, name) if j.name == name)
    if if_match not in (None, "*") and journey_etag(current) != if_match:
        raise PreconditionFailedError(
            f"journey {name!r} changed since you read it (stale ETag): GET it again and redo your edit"
        )
    return journeys


def journey_etag(journey: Journey) -> str:
    return content_etag(journey.model_dump(mode="json"))


def template_etag(template: Template) -> str:
    return content_etag(template.to_json())


def template_key(journey: str, channel: Channel, locale: str) -> TemplateKey:
    try:
        return TemplateKey(journey=journey, channel=channel, locale=locale)
    except ValidationError as exc:
        raise InvalidInputError(
            "not a template key",
            details=[{"path": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()],
        ) from exc
