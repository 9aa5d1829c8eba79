"""The demo's survey respondents against an in-process messenger stand-in (httpx.MockTransport)."""

from __future__ import annotations

from collections import Counter
from typing import Any
from urllib.parse import parse_qs

import httpx

from shared.demo.respondents import ANSWER_SHARE, Respondents, answer_of, survey_link

MESSENGER = "http://messenger.test"
KEY = "demo-key"


def sent(n: int, *, link: bool = True, locale: str = "he-IL") -> dict[str, Any]:
    text = f"Hi, how did we do?\n{MESSENGER}/s/tok{n}\n\nUnsubscribe: {MESSENGER}/u/abc.def"
    if not link:
        text = f"Thank you for your order!\nUnsubscribe: {MESSENGER}/u/abc.def"
    return {"id": f"m{n}", "locale": locale, "content": {"subject": "s", "text": text, "to": "x@example.com"}}


class Messenger:
    """Serves two pages of 'sent' and one of 'delivered'; records the survey answers posted."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages
        self.answers: list[tuple[str, dict[str, list[str]]]] = []
        self.listed: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/v1/messages":
            assert request.headers["Authorization"] == f"Bearer {KEY}"
            params = dict(request.url.params)
            self.listed.append(params)
            if params["status"] == "delivered":
                return httpx.Response(200, json={"messages": self.messages[-1:], "next_cursor": None})
            half = len(self.messages[:-1]) // 2
            if "cursor" not in params:
                return httpx.Response(200, json={"messages": self.messages[:half], "next_cursor": "next"})
            return httpx.Response(200, json={"messages": self.messages[half:-1], "next_cursor": None})
        if request.method == "POST" and request.url.path.startswith("/s/"):
            self.answers.append((request.url.path, parse_qs(request.content.decode())))
            return httpx.Response(200, text="thanks")
        return httpx.Response(404)


def test_the_survey_link_is_found_in_the_text_and_nowhere_else() -> None:
    assert survey_link(sent(1)["content"]) == f"{MESSENGER}/s/tok1"
    assert survey_link(sent(2, link=False)["content"]) is None
    assert survey_link(None) is None
    assert survey_link({"text": None}) is None


def test_answers_are_the_same_for_a_seed_and_mostly_pleased() -> None:
    messages = [sent(n) for n in range(2000)]
    first = [answer_of(7, m) for m in messages]
    assert first == [answer_of(7, m) for m in messages]
    assert first != [answer_of(8, m) for m in messages]
    answered = [a for a in first if a is not None]
    assert abs(len(answered) / len(messages) - ANSWER_SHARE) < 0.05
    scores = Counter(int(a["score"]) for a in answered)
    assert set(scores) == {1, 2, 3, 4, 5}
    assert scores[4] + scores[5] > len(answered) / 2


async def test_each_surveyed_message_is_answered_once_through_its_link() -> None:
    messages = [sent(n) for n in range(40)] + [sent(99, link=False)]
    messenger = Messenger(messages)
    async with httpx.AsyncClient(transport=httpx.MockTransport(messenger)) as client:
        respondents = Respondents(client, MESSENGER, KEY, seed=7)
        answered = await respondents.answer_once()
        again = await respondents.answer_once()
    expected = [m for m in messages[:-1] if answer_of(7, m) is not None]
    assert answered == len(expected) == len(messenger.answers)
    assert 0 < answered < 40
    assert again == 0  # every message was looked at in the first pass
    assert [path for path, _ in messenger.answers] == [f"/s/tok{m['id'][1:]}" for m in expected]
    for (_, form), message in zip(messenger.answers, expected, strict=True):
        assert form["score"] == [answer_of(7, message)["score"]]  # type: ignore[index]
    # Both statuses a sent message can have, the first over two pages.
    assert [(p["status"], p.get("cursor")) for p in messenger.listed[:3]] == [
        ("sent", None),
        ("sent", "next"),
        ("delivered", None),
    ]
