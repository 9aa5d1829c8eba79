"""tier_upgrade's perks come from configuration (``RETAIN_MESSENGER_TIER_PERKS``: tier →
locale → perks), with Hebrew, Arabic and English defaults; the preview and the message a
customer gets list the configured perks of the new tier, in the message's language."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.messenger.admin import MessengerAdmin
from services.messenger.config import MessengerSettings
from services.messenger.consumer import MIGRATIONS
from services.messenger.providers.outbox import OutboxProvider
from services.messenger.service import MessengerService
from services.messenger.templates import DEFAULT_PERKS, TIER_NAMES
from shared.db import Database, migrate
from shared.events import Channel, UpdateCause
from tests.messenger.test_journeys import LANGS, mail_of, purchase, treated, update
from tests.messenger.test_service import NOON, Clock, World, delivered, messages

# A shop's own perks: gold has its own list per language; platinum is left out on purpose.
SHOP_PERKS = {
    "gold": {
        "he_il": ["קפה עלינו בכל ביקור", "החזרות חינם"],
        "ar": ["قهوة على حسابنا في كل زيارة", "إرجاع مجاني"],
        "EN": ["Coffee on us at every visit", "Free returns"],
    },
    "silver": {"en": ["Free returns"]},
}
SHOP_GOLD = {
    "he": ["קפה עלינו בכל ביקור", "החזרות חינם"],
    "ar": ["قهوة على حسابنا في كل زيارة", "إرجاع مجاني"],
    "en": ["Coffee on us at every visit", "Free returns"],
}


def test_the_defaults_have_perks_for_every_tier_in_hebrew_arabic_and_english() -> None:
    perks = MessengerSettings().messenger_tier_perks
    assert set(perks) == set(TIER_NAMES)
    for tier, per_locale in perks.items():
        assert set(per_locale) == {"he", "ar", "en"}, tier
        assert all(per_locale[lang] for lang in LANGS), tier
    assert perks == DEFAULT_PERKS
    # The default is a copy: one settings object's edit does not leak into another's.
    perks["gold"]["en"].append("changed")
    assert "changed" not in MessengerSettings().messenger_tier_perks["gold"]["en"]


def test_perks_are_read_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETAIN_MESSENGER_TIER_PERKS", json.dumps(SHOP_PERKS))
    perks = MessengerSettings().messenger_tier_perks
    # Locale keys are BCP 47 tags as the templates look them up (he_il → he-IL, EN → en).
    assert perks["gold"] == {
        "he-IL": SHOP_GOLD["he"],
        "ar": SHOP_GOLD["ar"],
        "en": SHOP_GOLD["en"],
    }
    assert "platinum" not in perks


@pytest.mark.parametrize(
    "bad",
    [
        {"gold": {"en": ["  "]}},
        {"gold": {"not a locale": ["Free returns"]}},
        {" ": {"en": ["Free returns"]}},
        {"gold": ["Free returns"]},
    ],
    ids=["empty-perk", "bad-locale", "empty-tier", "no-locales"],
)
def test_bad_perks_are_refused_at_start(bad: object) -> None:
    with pytest.raises(ValidationError):
        MessengerSettings(messenger_tier_perks=bad)


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[World]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'messenger.db'}"
    settings = MessengerSettings(
        messenger_database_url=url,
        messenger_outbox_dir=str(tmp_path / "outbox"),
        var_dir=tmp_path,
        messenger_tier_perks=SHOP_PERKS,
    )
    db = Database(url)
    await migrate(db, MIGRATIONS)
    clock = Clock(NOON)
    outbox = OutboxProvider(tmp_path / "outbox")
    service = MessengerService(db, settings, None, dict.fromkeys(Channel, outbox), clock=clock)
    await service.ensure_defaults()
    yield World(service, clock, tmp_path / "outbox", db)
    await db.dispose()


@pytest.mark.parametrize("lang", LANGS)
async def test_the_preview_lists_the_configured_perks(shop: World, lang: str) -> None:
    preview = await MessengerAdmin(shop.service).preview("tier_upgrade", Channel.EMAIL, lang, None)
    for perk in SHOP_GOLD[lang]:  # the sample customer is gold
        assert perk in preview.rendered.text
    for perk in DEFAULT_PERKS["gold"][lang]:
        assert perk not in preview.rendered.text


async def test_the_preview_for_a_customer_lists_their_tiers_configured_perks(shop: World) -> None:
    customer = treated("perks-preview", "tier_upgrade")
    await shop.service.apply_batch(
        delivered([update(customer, "ar", NOON, tier_old="gold", tier="gold", cause=UpdateCause.RULES)])
    )
    preview = await MessengerAdmin(shop.service).preview("tier_upgrade", Channel.EMAIL, None, customer)
    assert preview.rendered.lang == "ar"
    for perk in SHOP_GOLD["ar"]:
        assert perk in preview.rendered.text


@pytest.mark.parametrize("lang", LANGS)
async def test_the_congratulation_sent_lists_the_configured_perks(shop: World, lang: str) -> None:
    customer = treated(f"perks-{lang}", "tier_upgrade")
    upgrade = update(customer, lang, NOON, tier_old="silver", tier="gold", cause=UpdateCause.RULES)
    await shop.service.apply_batch(delivered([upgrade]))
    [outcome] = await shop.service.send_due()
    assert outcome.status == "sent"
    mail = mail_of(shop, outcome.message_id)
    for perk in SHOP_GOLD[lang]:
        assert perk in mail.text
        assert perk in mail.html
    for perk in DEFAULT_PERKS["gold"][lang]:
        assert perk not in mail.text


async def test_a_purchase_that_moves_up_a_tier_is_congratulated_rather_than_thanked(shop: World) -> None:
    """One marketing message a day: the congratulation (which thanks too) comes before the
    routine thank-you in the default journeys' order, so the upgrade is not the one capped."""
    customer = treated("perks-upgrade-purchase", "tier_upgrade", "thank_you")
    bought = update(customer, "he", NOON, purchase(NOON), tier_old="silver", tier="gold")
    await shop.service.apply_batch(delivered([bought]))
    decided = {r["journey"]: r["status"] for r in await messages(shop, customer)}
    assert decided == {"tier_upgrade": "queued", "thank_you": "capped"}
