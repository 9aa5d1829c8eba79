"""Poison records and a dead letter to replay, for the chaos run.

Mid-stream, three poison records go straight onto backend topics (past ingest, which would
refuse them): bytes that are not JSON, valid JSON of an unknown ``type``, and an event with
``schema_version`` 2. Each consumer group reading the topic must send each to ``<topic>.dlq``
with its reason and go on with the partition.

The replay needs a record that is valid after "a fix". No fault in the pipeline can be switched
off on cue, so the run plays the consumer's part: a valid purchase (of a customer whose profile
is the stream's first event) is written to ``<prefix>purchases.dlq`` with the headers
``ConsumerLoop._dead_letter`` writes for a handler failure that is not transient (reason
``IntegrityError``; its origin partition and offset are 0 and 0, since the record was never on
the topic), and never sent through ingest. ``retain dlq replay`` puts it back, twice. The
oracle holds it, so a replay that never applied it shows as "lost" (absent from the topics), as
"missing" in the kpi purchases and as "different" in the customer's profile; ``applied_in``
says where the run found it. (Applied twice it would change nothing visible: orders are keyed
by order id; the ledgers drop the second copy.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer

from shared.codec import encode_event, encode_key
from shared.config import REPO_ROOT
from shared.dlq import REFUSED_AT
from shared.events import EVENT_ADAPTER
from shared.topics import CANCELLATIONS, PURCHASES, SUPPORT, dlq
from tests.support.kafka import read_all

CUSTOMER = "c-dlq-000001"
REASON = "undecodable"  # what ConsumerLoop writes for all three
# What ConsumerLoop writes for a record its handler refused with a non-transient error (the
# exception's class name; ``shared.kafka.consumer.is_transient`` is False for it): the dead
# letter the run replays. An OperationalError would never be dead-lettered: it is retried.
REPLAY_REASON = "IntegrityError"
PURCHASE_ID = "chaos-dlq-purchase"  # the dead-lettered purchase's event id


@dataclass(frozen=True)
class Poison:
    name: str
    topic: str  # without the prefix
    value: bytes


def poisons(now: datetime) -> list[Poison]:
    future = {
        "event_id": "chaos-poison-future",
        "type": "cancellation",
        "customer_id": CUSTOMER,
        "occurred_at": now.isoformat(),
        "schema_version": 2,
        "reason": "price",
    }
    unknown = {
        "event_id": "chaos-poison-unknown",
        "type": "refund",
        "customer_id": CUSTOMER,
        "occurred_at": now.isoformat(),
        "schema_version": 1,
    }
    return [
        Poison("undecodable bytes", PURCHASES, b"\xff\xfe not json \x00"),
        Poison("unknown type", SUPPORT, json.dumps(unknown).encode()),
        Poison("schema_version 2", CANCELLATIONS, json.dumps(future).encode()),
    ]


def customer_events(now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dead-lettered customer's profile (sent through ingest first) and the purchase that
    goes to the DLQ; no consent, so no message depends on when the purchase is replayed."""
    profile = {
        "event_id": "chaos-dlq-profile",
        "type": "profile",
        "customer_id": CUSTOMER,
        "occurred_at": (now - timedelta(days=40)).isoformat(),
        "schema_version": 1,
        "name": "Dana Dlq",
        "email": "dana.dlq@mail.example.com",
        "locale": "en-IL",
        "timezone": "Asia/Jerusalem",
        "preferred_channel": "email",
        "consents": {"email": False, "sms": False, "whatsapp": False},
    }
    purchase = {
        "event_id": PURCHASE_ID,
        "type": "purchase",
        "customer_id": CUSTOMER,
        "occurred_at": (now - timedelta(days=35)).isoformat(),
        "schema_version": 1,
        "order_id": "ord-dlq-001",
        "amount": "123.40",
        "currency": "ILS",
        "items": [{"sku": "GRO-1012", "category": "grocery", "quantity": 2, "unit_price": "61.70"}],
    }
    return profile, purchase


@dataclass
class Placed:
    name: str
    topic: str  # with the prefix
    partition: int
    offset: int
    value: bytes


@dataclass
class DlqFigures:
    poisons: list[Placed] = field(default_factory=list)
    letters: dict[str, dict[str, int]] = field(default_factory=dict)  # poison → group → letters
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # poison → reason → letters
    bad_letters: list[str] = field(default_factory=list)  # wrong reason, detail, or origin
    # Records behind each poison on its partition (applied: ledgers). Only the total must be
    # above 0: a sparse topic (cancellations) may have nothing behind its poison in a short run.
    behind: dict[str, int] = field(default_factory=dict)
    replays: list[str] = field(default_factory=list)  # what `retain dlq replay` printed
    replay_failures: list[str] = field(default_factory=list)
    # Where the run found the replayed purchase applied (``APPLIED_IN``), set after the run.
    applied_in: list[str] = field(default_factory=list)

    @property
    def after_poison(self) -> int:
        return sum(self.behind.values())

    def problems(self) -> list[str]:
        out = list(self.bad_letters) + self.replay_failures
        if len(self.poisons) != 3:
            out.append(f"poisons placed: {len(self.poisons)} of 3")
        for p in self.poisons:
            missing = [g for g, n in self.letters.get(p.name, {}).items() if not n]
            if not self.letters.get(p.name):
                missing.append("every group (none reads the topic?)")
            if missing:
                out.append(f"{p.name}: no dead letter from {', '.join(missing)}")
        if len(self.replays) != 2:
            out.append(f"dlq replays: {len(self.replays)} of 2")
        if self.poisons and not self.after_poison:
            out.append("no record behind the poisons: the partitions' flow was not tested")
        if self.replays:
            absent = [w for w in APPLIED_IN if w not in self.applied_in]
            if absent:
                out.append(f"the replayed purchase is not applied in: {', '.join(absent)}")
        return out


# Where a replayed purchase shows once applied: the customer's profile equal to the oracle's,
# a kpi purchases row of its event, and each consumer's applied-event ledger.
APPLIED_IN = ("profile", "kpi purchases", "segmenter ledger", "kpi ledger")


def letter_headers(origin_topic: str, now: datetime) -> list[tuple[str, bytes]]:
    """The headers ``ConsumerLoop._dead_letter`` writes for a record first refused ``now`` by a
    non-transient handler error, in its order. The origin's partition and offset are 0: the
    record was never on the topic."""
    at = now.isoformat().encode()
    return [
        ("x-retain-error", REPLAY_REASON.encode()),
        ("x-retain-error-detail", b"chaos: a dead letter written by the run, as the consumer would"),
        ("x-retain-topic", origin_topic.encode()),
        ("x-retain-partition", b"0"),
        ("x-retain-offset", b"0"),
        ("x-retain-first-seen", at),
        (REFUSED_AT, at),
        ("x-retain-group", b"chaos-run"),
    ]


async def place(bootstrap: str, prefix: str, now: datetime, purchase: dict[str, Any]) -> list[Placed]:
    """The poisons onto their topics and the purchase onto ``purchases.dlq``, as a consumer
    that refused it would have written it."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        placed = []
        key = encode_key(CUSTOMER)
        for p in poisons(now):
            meta = await producer.send_and_wait(prefix + p.topic, p.value, key=key)
            placed.append(Placed(p.name, meta.topic, meta.partition, meta.offset, p.value))
        event = EVENT_ADAPTER.validate_python(purchase)
        origin = prefix + PURCHASES
        headers = letter_headers(origin, datetime.now(UTC))
        await producer.send_and_wait(dlq(origin), encode_event(event), key=key, headers=headers)
        return placed
    finally:
        await producer.stop()


def replay_cli(bootstrap: str, prefix: str, since: datetime) -> tuple[int, str]:
    """``retain dlq replay --topic <prefix>purchases --since …`` as an operator runs it."""
    env = {**os.environ, "RETAIN_KAFKA_BOOTSTRAP": bootstrap, "RETAIN_TOPIC_PREFIX": prefix}
    argv = [sys.executable, "-m", "shared.cli", "dlq", "replay", "--topic", prefix + PURCHASES]
    argv += ["--since", since.isoformat(), "--reason", REPLAY_REASON]
    done = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return done.returncode, (done.stdout + done.stderr).strip()


async def check(bootstrap: str, placed: list[Placed], groups: dict[str, list[str]]) -> DlqFigures:
    """The dead letters of each poison: one or more per group that reads its topic (a group
    SIGKILLed between the letter and its commit writes it again), each with its reason."""
    figures = DlqFigures(poisons=placed)
    topics = sorted({p.topic for p in placed})
    records = await read_all(bootstrap, [dlq(t) for t in topics] + topics, timeout_s=120)
    for p in placed:
        counts: dict[str, int] = {}
        reasons: dict[str, int] = {}
        figures.behind[p.name] = 0
        for r in records:
            if r.topic == p.topic and r.partition == p.partition and r.offset > p.offset:
                figures.behind[p.name] += 1
            if r.topic != dlq(p.topic):
                continue
            h = {k: v.decode("utf-8", "replace") for k, v in r.headers}
            if (h.get("x-retain-topic"), h.get("x-retain-offset")) != (p.topic, str(p.offset)):
                continue
            if h.get("x-retain-partition") != str(p.partition):
                continue
            group = h.get("x-retain-group", "?")
            counts[group] = counts.get(group, 0) + 1
            reason = h.get("x-retain-error", "(none)")
            reasons[reason] = reasons.get(reason, 0) + 1
            if h.get("x-retain-error") != REASON or not h.get("x-retain-error-detail"):
                figures.bad_letters.append(f"{p.name} from {group}: reason {h.get('x-retain-error')!r}")
            if (r.value or b"") != p.value:
                figures.bad_letters.append(f"{p.name} from {group}: the letter's value is not the poison")
        expected = groups.get(p.topic, [])
        figures.letters[p.name] = {g: counts.get(g, 0) for g in expected}
        figures.reasons[p.name] = reasons
        figures.bad_letters += [f"{p.name}: a letter from {g}" for g in counts if g not in expected]
    return figures
