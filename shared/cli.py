"""`retain`: the command line of the project (run, demo, keys, topics)."""

from __future__ import annotations

import argparse
import asyncio
import sys

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

    args = parser.parse_args(argv)
    if args.command == "keys":
        return _keys(args)
    if args.command == "topics":
        return _topics(args)
    if args.command == "demo":
        from shared.demo.sender import main as demo_main  # noqa: PLC0415

        return demo_main(args.rest)
    from shared.runner import run as run_all  # noqa: PLC0415

    return run_all(with_demo=not args.no_demo)


if __name__ == "__main__":
    sys.exit(main())
