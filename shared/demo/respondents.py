"""The demo's customers answering the feedback survey in the messages they got.

Under ``make run`` nobody reads the outbox, so nobody would ever open a survey link, and the
kpi's customer satisfaction (``GET /v1/kpis/csat``) would stay empty. This plays the customers:
it reads the messages the messenger sent (``GET /v1/messages``, as an operator would), finds the
survey link in a message's text, and opens it as the customer would: the form (``GET
/s/{token}``), then the answer (``POST``), a score of 1 to 5 — about seven in ten of them
answer, most of them pleased. It goes to the messenger it was given, whatever host the link
names (the public URL may be a tunnel for the providers' callbacks). Whether and how a
customer answers is drawn from the seed and the message id, so a rerun answers the same way
(and the messenger keeps the first answer anyway).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Mapping
from typing import Any

import httpx

logger = logging.getLogger(__name__)

# A survey link's token: a message id's short form (22 characters, links.survey_token) or the
# id itself (links sent before); not any path under /s/ (a shop's /s/summer-sale).
SURVEY_LINK = re.compile(
    r"https?://\S+?/s/([A-Za-z0-9_-]{22}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    r"(?![A-Za-z0-9_-])"
)
FORM_MARK = 'name="score"'  # the survey page asks (not yet answered, the message exists)
ANSWER_SHARE = 0.7
SCORES = (1, 2, 3, 4, 5)
WEIGHTS = (0.06, 0.08, 0.16, 0.34, 0.36)
# A few answers come with a word; the unhappy ones more often. By the message's language.
COMMENTS = {
    "he": {1: "חיכיתי יותר מדי זמן לתשובה.", 2: "הבעיה נפתרה, אבל לקח זמן.", 5: "שירות מעולה, תודה!"},
    "ar": {1: "انتظرت وقتًا طويلًا جدًا للرد.", 2: "حُلّت المشكلة، لكن استغرق ذلك وقتًا.", 5: "خدمة ممتازة، شكرًا!"},
    "en": {
        1: "I waited far too long for an answer.",
        2: "Solved in the end, but it took a while.",
        5: "Great service, thank you!",
    },
}
SENT_STATUSES = ("sent", "delivered")
PAGE = 500


def survey_link_token(content: Mapping[str, Any] | None) -> str | None:
    """The token of the survey link in a message's text, if it has one."""
    text = (content or {}).get("text")
    found = SURVEY_LINK.search(text) if isinstance(text, str) else None
    return found.group(1) if found else None


def answer_of(seed: int, message: Mapping[str, Any]) -> dict[str, str] | None:
    """The form the message's customer sends, or None if they do not answer."""
    rng = random.Random(f"{seed}:{message['id']}")  # noqa: S311 - demo answers, not secrets
    if rng.random() >= ANSWER_SHARE:
        return None
    score = rng.choices(SCORES, WEIGHTS)[0]
    language = str(message.get("locale") or "en")[:2].lower()
    comment = COMMENTS.get(language, COMMENTS["en"]).get(score) if rng.random() < 0.5 else None
    return {"score": str(score), **({"comment": comment} if comment else {})}


class Respondents:
    """Answers each sent message's survey at most once: ``seen`` are the messages this process
    has dealt with; one answered before (another run) shows no form and is left alone."""

    def __init__(self, client: httpx.AsyncClient, messenger_url: str, api_key: str, seed: int) -> None:
        self.client = client
        self.url = messenger_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.seed = seed
        self.seen: set[str] = set()

    async def _sent(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for status in SENT_STATUSES:
            cursor: str | None = None
            while True:
                params = {"status": status, "limit": str(PAGE), **({"cursor": cursor} if cursor else {})}
                response = await self.client.get(
                    f"{self.url}/v1/messages", params=params, headers=self.headers
                )
                response.raise_for_status()
                page = response.json()
                found += page["messages"]
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        return found

    async def answer_once(self) -> int:
        """One pass over the sent messages not dealt with yet; how many surveys were answered.
        A message is dealt with once its form was read (an error on the way leaves it for the
        next pass); the list is read whole each time, since a message held overnight is sent,
        and listed, after newer ones."""
        answered = 0
        for message in await self._sent():
            if message["id"] in self.seen:
                continue
            token = survey_link_token(message.get("content"))
            form = answer_of(self.seed, message) if token else None
            if token is None or form is None:
                self.seen.add(message["id"])
                continue
            page = await self.client.get(f"{self.url}/s/{token}")
            if page.status_code == 200 and FORM_MARK in page.text:
                response = await self.client.post(f"{self.url}/s/{token}", data=form)
                if response.status_code == 200:
                    answered += 1
                else:
                    logger.warning("survey answer refused: %s %s", response.status_code, response.text[:200])
            self.seen.add(message["id"])
        return answered

    async def run(self, interval_s: float = 15.0) -> None:
        """Answer what was sent since the last pass, every ``interval_s``, until cancelled; a
        messenger that is not answering yet (still starting) is tried again at the next pass."""
        total = 0
        while True:
            try:
                answered = await self.answer_once()
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                # A messenger still starting, or an answer not as expected: the trickle goes on.
                logger.info("surveys not answered this time (%r); retrying", exc)
            else:
                total += answered
                if answered:
                    logger.info("customers answered %d surveys (%d in all)", answered, total)
            await asyncio.sleep(interval_s)
