"""``make chaos``: ``python -m tests.chaos --events 20000 --rounds 3``; exit 1 when a figure is off."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.chaos.report import DOC, lines, problems, write_doc
from tests.chaos.run import Options, Run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000, help="events to replay (default 20000)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="kills per worker, and turns of the other faults"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the stream and of the fault schedule")
    parser.add_argument("--gap", type=float, nargs=2, default=(2.0, 6.0), metavar=("MIN", "MAX"),
                        help="seconds after each fault, drawn uniformly (default 2 6)")  # fmt: skip
    parser.add_argument("--replay-seconds", type=float, default=None, help="spread the replay over this long")
    parser.add_argument("--keep", action="store_true", help="keep var/chaos/run-*/ (logs, data) afterwards")
    parser.add_argument("--doc", type=Path, default=DOC, help="where to write the figures ('-': nowhere)")
    args = parser.parse_args(argv)
    options = Options(
        events=args.events,
        rounds=args.rounds,
        seed=args.seed,
        gap_s=(args.gap[0], args.gap[1]),
        replay_s=args.replay_seconds,
        keep=args.keep,
    )
    figures = Run(options).execute()
    command = "python -m tests.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    body = lines(figures, options, command.strip())
    sys.stdout.write("\n".join(body) + "\n")
    for problem in problems(figures):
        sys.stdout.write(f"PROBLEM {problem}\n")
    if str(args.doc) != "-":
        write_doc(body, args.doc)
        sys.stderr.write(f"figures written to {args.doc}\n")
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
