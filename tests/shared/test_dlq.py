"""`retain dlq replay` against the real broker: poison in, fix, replay, applied once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared import dlq as dlq_module
from shared.dlq import ReplayTimeoutError, carried_origin, replay
from shared.kafka.producer import OutboundRecord, Producer
from tests.support.infra import KafkaHandle
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration


async def test_replay_puts_dead_letters_back_on_their_topic(kafka: KafkaHandle, topic_prefix: str) -> None:
    topic = topic_prefix + "purchases"
    now = datetime.now(UTC)
    old = (now - timedelta(days=2)).isoformat().encode()
    recent = now.isoformat().encode()

    def letter(value: bytes, seen: bytes, reason: bytes) -> OutboundRecord:
        headers = (
            ("x-retain-error", reason),
            ("x-retain-topic", topic.encode()),
            ("x-retain-first-seen", seen),
        )
        return OutboundRecord(topic + ".dlq", b"c1", value, headers)

    producer = Producer(kafka.bootstrap, client_id="dlq-test")
    await producer.send_all([
        letter(b'{"a": 1}', old, b"undecodable"),
        letter(b'{"b": 2}', recent, b"undecodable"),
        letter(b'{"c": 3}', recent, b"PermanentError"),
    ])  # fmt: skip
    await producer.stop()

    dry = await replay(kafka.bootstrap, topic, now - timedelta(hours=1), dry_run=True)
    assert (dry.scanned, dry.replayed, dry.skipped_before_since) == (3, 0, 1)
    assert await read_all(kafka.bootstrap, [topic]) == []

    report = await replay(kafka.bootstrap, topic, now - timedelta(hours=1), reason="undecodable")
    assert report.replayed == 1
    assert report.by_reason == {"undecodable": 1}
    back = await read_all(kafka.bootstrap, [topic])
    assert [(r.key, r.value) for r in back] == [(b"c1", b'{"b": 2}')]
    assert dict(back[0].headers)["x-retain-replayed-from"].startswith((topic + ".dlq:").encode())


async def test_a_record_dead_lettered_by_every_group_goes_back_once(
    kafka: KafkaHandle, topic_prefix: str
) -> None:
    """The segmenter and the kpi both read retain.purchases: a poison record there gets two
    letters, and a replay that sent both would put it back twice."""
    topic = topic_prefix + "purchases"
    seen = datetime.now(UTC).isoformat().encode()

    def letter(value: bytes, offset: int, group: bytes) -> OutboundRecord:
        headers = (
            ("x-retain-error", b"undecodable"),
            ("x-retain-topic", topic.encode()),
            ("x-retain-partition", b"2"),
            ("x-retain-offset", str(offset).encode()),
            ("x-retain-first-seen", seen),
            ("x-retain-group", group),
        )
        return OutboundRecord(topic + ".dlq", b"c1", value, headers)

    producer = Producer(kafka.bootstrap, client_id="dlq-test")
    await producer.send_all([
        letter(b'{"a": 1}', 7, b"retain-segmenter"),
        letter(b'{"a": 1}', 7, b"retain-kpi"),
        letter(b'{"b": 2}', 8, b"retain-kpi"),
    ])  # fmt: skip
    await producer.stop()

    report = await replay(kafka.bootstrap, topic)
    assert (report.scanned, report.replayed, report.same_record) == (3, 2, 1)
    back = await read_all(kafka.bootstrap, [topic])
    assert sorted(r.value for r in back) == [b'{"a": 1}', b'{"b": 2}']

    with pytest.raises(ValueError, match="dead-letter topic"):
        await replay(kafka.bootstrap, topic + ".dlq")


async def test_a_large_dlq_is_sent_in_chunks_and_a_scan_out_of_time_says_so(
    kafka: KafkaHandle, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = topic_prefix + "purchases"
    seen = datetime.now(UTC).isoformat().encode()
    letters = [
        OutboundRecord(
            topic + ".dlq",
            b"c1",
            f'{{"n": {i}}}'.encode(),
            (("x-retain-error", b"undecodable"), ("x-retain-first-seen", seen)),
        )
        for i in range(5)
    ]
    producer = Producer(kafka.bootstrap, client_id="dlq-test")
    await producer.send_all(letters)
    await producer.stop()

    with pytest.raises(ReplayTimeoutError, match="longer --timeout-s"):
        await replay(kafka.bootstrap, topic, timeout_s=0)
    sent: list[int] = []
    real_send_all = Producer.send_all

    async def counting(self: Producer, records: list[OutboundRecord]) -> None:
        sent.append(len(records))
        await real_send_all(self, records)

    monkeypatch.setattr(Producer, "send_all", counting)
    monkeypatch.setattr(dlq_module, "SEND_CHUNK", 2)
    report = await replay(kafka.bootstrap, topic)
    assert report.replayed == 5
    assert sum(sent) == 5
    assert max(sent) < 5  # sent as it was read, not all at the end
    back = await read_all(kafka.bootstrap, [topic])
    assert sorted(r.value for r in back) == sorted(r.value for r in letters)


def test_only_an_origin_a_replay_could_have_written_is_carried() -> None:
    topic = "retain.purchases"
    good = [
        ("x-retain-topic", topic.encode()),
        ("x-retain-partition", b"2"),
        ("x-retain-offset", b"41"),
        ("x-retain-first-seen", b"2026-11-25T10:00:00+00:00"),
        ("x-retain-replayed-from", b"retain.purchases.dlq:2:5"),
    ]
    assert carried_origin(good, topic) == tuple(good[:4])

    def without(name: str) -> list[tuple[str, bytes | None]]:
        return [(k, v) for k, v in good if k != name]

    def with_(name: str, value: bytes | None) -> list[tuple[str, bytes | None]]:
        return [(k, value if k == name else v) for k, v in good]

    for bad in (
        without("x-retain-replayed-from"),  # not put back by a replay: a producer's own
        with_("x-retain-topic", b"retain.segments"),  # another topic's letter
        with_("x-retain-partition", b"two"),
        with_("x-retain-offset", None),
        with_("x-retain-first-seen", b"2026-11-25T10:00:00"),  # no zone
        with_("x-retain-first-seen", b"yesterday"),
    ):
        assert carried_origin(bad, topic) is None, bad


async def test_a_letter_with_headers_of_its_own_does_not_stop_a_replay(
    kafka: KafkaHandle, topic_prefix: str
) -> None:
    """Written by hand or by another tool: a time without a zone, or none at all, is not a
    reason to stop replaying the topic's other letters; such a letter counts as recent."""
    topic = topic_prefix + "purchases"
    letter = topic + ".dlq"
    producer = Producer(kafka.bootstrap, client_id="dlq-test")
    await producer.send_all([
        OutboundRecord(letter, b"c1", b'{"a": 1}', (("x-retain-first-seen", b"yesterday"),)),
        OutboundRecord(letter, b"c1", b'{"b": 2}', (("x-retain-first-seen", b"2026-11-25T10:00:00"),)),
        OutboundRecord(letter, b"c1", b'{"c": 3}', (("x-retain-error", b"undecodable"),)),
    ])  # fmt: skip
    await producer.stop()
    report = await replay(kafka.bootstrap, topic, datetime.now(UTC) - timedelta(hours=1))
    assert (report.scanned, report.replayed, report.skipped_before_since) == (3, 3, 0)
    assert report.by_reason == {"unknown": 2, "undecodable": 1}
