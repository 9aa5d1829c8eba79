"""`retain`: the command line of the project (run, demo, keys, topics)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime

from shared.auth import SCOPES, create_key
from shared.config import CommonSettings


def _keys(args: argparse.Namespace) -> int:
    settings = CommonSettings()
    scopes = [s for part in args.scopes for s in part.split(",") if s]
    try:
        key, plain = create_key(settings.keys_path, scopes, args.name)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(
        f"key id {key.id} with scopes {', '.join(sorted(key.scopes))} stored (hashed) in"
        f" {settings.keys_path}\n{plain}\n(shown once: it is not stored anywhere in plain text)\n"
    )
    return 0


def _topics(_args: argparse.Namespace) -> int:
    from shared.topics import all_topic_names, ensure_topics  # noqa: PLC0415 - needs a broker

    settings = CommonSettings()
    created = asyncio.run(
        ensure_topics(settings.kafka_bootstrap, all_topic_names(settings.topic_prefix), settings.partitions)
    )
    sys.stdout.write(f"created: {', '.join(created) or 'none (all exist)'}\n")
    return 0


def _aware(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2026-11-25T00:00:00Z")
    return parsed


def _dlq(args: argparse.Namespace) -> int:
    from shared.dlq import ReplayTimeoutError, replay  # noqa: PLC0415 - needs a broker

    settings = CommonSettings()
    try:
        report = asyncio.run(
            replay(
                settings.kafka_bootstrap,
                args.topic,
                args.since,
                dry_run=args.dry_run,
                reason=args.reason,
                timeout_s=args.timeout_s,
            )
        )
    except (ValueError, ReplayTimeoutError) as exc:
        sys.stderr.write(f"retain dlq replay: {exc}\n")
        return 2
    verb = "would replay" if args.dry_run else "replayed"
    sys.stdout.write(
        f"{report.topic}.dlq: scanned {report.scanned}, {verb} "
        f"{report.replayed if not args.dry_run else sum(report.by_reason.values())}"
        f" (by reason: {report.by_reason or '-'}), older than --since: {report.skipped_before_since}, "
        f"letters of a record already taken (one per consumer group): {report.same_record}, "
        f"records too large to keep whole, not replayed (their letters hold the start and where "
        f"each record is on its topic): {report.truncated}, "
        f"records under an event_id applied for another event, not replayed (their producer sends "
        f"them again under ids of their own): {report.reused}\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="broker, topics, every service and the demo, under one supervisor")
    run.add_argument("--no-demo", action="store_true", help="start the pipeline without the demo stream")

    demo = sub.add_parser("demo", help="send the seeded demo stream to ingest", add_help=False)
    demo.add_argument("rest", nargs=argparse.REMAINDER)

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--scopes", nargs="+", required=True, help=f"any of {', '.join(sorted(SCOPES))}")
    create.add_argument("--name", default="", help="who or what the key is for")

    sub.add_parser("topics", help="create the topics and their DLQ twins if missing")

    dlq_parser = sub.add_parser("dlq", help="dead-letter topics")
    dlq_sub = dlq_parser.add_subparsers(dest="dlq_command", required=True)
    replay = dlq_sub.add_parser("replay", help="put dead letters back on their topic after a fix")
    replay.add_argument("--topic", required=True, help="the original topic, e.g. retain.purchases")
    replay.add_argument(
        "--since", type=_aware, help="only letters refused at or after (their x-retain-refused-at; RFC 3339)"
    )
    replay.add_argument("--reason", help="only letters refused for this reason, e.g. undecodable")
    replay.add_argument("--dry-run", action="store_true", help="count, do not send")
    replay.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="longest time to read the dead-letter topic to its end (default 60; a large one needs more)",
    )

    args = parser.parse_args(argv)
    if args.command == "keys":
        return _keys(args)
    if args.command == "topics":
        return _topics(args)
    if args.command == "dlq":
        return _dlq(args)
    if args.command == "demo":
        from shared.demo.sender import main as demo_main  # noqa: PLC0415

        return demo_main(args.rest)
    from shared.runner import run as run_all  # noqa: PLC0415

    return run_all(with_demo=not args.no_demo)


if __name__ == "__main__":
    sys.exit(main())
