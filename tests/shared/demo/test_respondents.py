"""The demo's survey respondents against an in-process messenger stand-in (httpx.MockTransport)."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from services.messenger.links import survey_token
from shared.demo.respondents import ANSWER_SHARE, Respondents, answer_of, survey_link_token

MESSENGER = "http://127.0.0.1:8003"
PUBLIC = "https://tunnel.example"  # what the links name: the messenger's public URL
KEY = "demo-key"


def message_id(n: int) -> str:
    return str(uuid.UUID(int=n))


def sent(n: int, *, link: bool = True, locale: str = "he-IL") -> dict[str, Any]:
    mid = message_id(n)
    text = (
        f"Summer sale: https://shop.example/s/summer-sale\nHow did we do?\n{PUBLIC}/s/{survey_token(mid)}\n\n"
        f"Unsubscribe: {PUBLIC}/u/abc.def"
    )
    if not link:
        text = f"Thank you for your order!\nUnsubscribe: {PUBLIC}/u/abc.def"
    return {"id": mid, "locale": locale, "content": {"subject": "s", "text": text, "to": "x@example.com"}}


class Messenger:
    """Serves two pages of 'sent' and one of 'delivered'; the survey pages, whose form is gone
    once answered (or for the ids in ``answered``); ``down`` makes the next POST fail."""

    def __init__(self, messages: list[dict[str, Any]], answered: set[str] | None = None) -> None:
        self.messages = messages
        self.answered = set(answered or ())
        self.posts: list[tuple[str, dict[str, list[str]]]] = []
        self.listed: list[dict[str, str]] = []
        self.down = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == "127.0.0.1"  # the messenger given, never the links' host
        path = request.url.path
        if request.method == "GET" and path == "/v1/messages":
            assert request.headers["Authorization"] == f"Bearer {KEY}"
            params = dict(request.url.params)
            self.listed.append(params)
            if params["status"] == "delivered":
                return httpx.Response(200, json={"messages": self.messages[-1:], "next_cursor": None})
            half = len(self.messages[:-1]) // 2
            if "cursor" not in params:
                return httpx.Response(200, json={"messages": self.messages[:half], "next_cursor": "next"})
            return httpx.Response(200, json={"messages": self.messages[half:-1], "next_cursor": None})
        if path.startswith("/s/"):
            token = path.removeprefix("/s/")
            if request.method == "GET":
                done = token in self.answered
                return httpx.Response(200, text="already" if done else '<input name="score" value="5">')
            if self.down:
                self.down -= 1
                raise httpx.ConnectError("messenger restarting")
            self.posts.append((token, parse_qs(request.content.decode())))
            self.answered.add(token)
            return httpx.Response(200, text="thanks")
        return httpx.Response(404)


def test_the_survey_token_is_found_in_the_text_and_nowhere_else() -> None:
    assert survey_link_token(sent(1)["content"]) == survey_token(message_id(1))
    old_style = {"text": f"Tell us: {PUBLIC}/s/{message_id(9)} thanks"}
    assert survey_link_token(old_style) == message_id(9)
    assert survey_link_token(sent(2, link=False)["content"]) is None
    assert survey_link_token({"text": f"{PUBLIC}/s/{survey_token(message_id(3))}x"}) is None
    assert survey_link_token(None) is None
    assert survey_link_token({"text": None}) is None


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


async def test_each_surveyed_message_is_answered_once_at_the_messenger_given() -> None:
    messages = [sent(n) for n in range(40)] + [sent(99, link=False)]
    messenger = Messenger(messages)
    async with httpx.AsyncClient(transport=httpx.MockTransport(messenger)) as client:
        respondents = Respondents(client, MESSENGER, KEY, seed=7)
        answered = await respondents.answer_once()
        again = await respondents.answer_once()
    expected = [m for m in messages[:-1] if answer_of(7, m) is not None]
    assert answered == len(expected) == len(messenger.posts)
    assert 0 < answered < 40
    assert again == 0
    assert [token for token, _ in messenger.posts] == [survey_token(m["id"]) for m in expected]
    for (_, form), m in zip(messenger.posts, expected, strict=True):
        assert form["score"] == [answer_of(7, m)["score"]]  # type: ignore[index]
    # Both statuses a sent message can have, the first over two pages.
    assert [(p["status"], p.get("cursor")) for p in messenger.listed[:3]] == [
        ("sent", None),
        ("sent", "next"),
        ("delivered", None),
    ]


async def test_a_survey_answered_before_is_left_alone_and_a_failed_answer_is_tried_again() -> None:
    messages = [sent(n) for n in range(40)] + [sent(99, link=False)]
    answering = [m for m in messages if answer_of(7, m) is not None]
    earlier = survey_token(answering[0]["id"])  # answered by a previous run of the demo
    messenger = Messenger(messages, answered={earlier})
    messenger.down = 1
    async with httpx.AsyncClient(transport=httpx.MockTransport(messenger)) as client:
        respondents = Respondents(client, MESSENGER, KEY, seed=7)
        with pytest.raises(httpx.ConnectError):
            await respondents.answer_once()
        assert await respondents.answer_once() == len(answering) - 1
        assert await respondents.answer_once() == 0
    assert earlier not in [token for token, _ in messenger.posts]
    assert len(messenger.posts) == len(answering) - 1
