"""``python -m tests.bench [--seconds S] [--concurrency N] [--only SECTION] [--scale F] [--profile]``

Prints a markdown report (stdout), writes it to ``var/bench/report.md`` and each section to
``var/bench/<section>.md``. Progress goes to stderr. The exit status says whether the bench
ran, never whether a target was met.

A section is a function ``(BenchContext) -> Section``; add new ones to ``SECTIONS``.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Callable

from shared.config import REPO_ROOT
from shared.logs import configure_logging
from tests.bench import e2e, ingest, kpi, messenger, segmenter
from tests.bench.context import BenchContext, Options
from tests.bench.infra import BENCH_VAR, machine_info, say
from tests.bench.report import Section, render

DOCS = REPO_ROOT / "docs" / "benchmarks.md"
PREFACE = """# Benchmarks

Written by `make bench` (`python -m tests.bench`) from its last full run; rerun it to reproduce
on your machine. Targets are ratios against a baseline measured in the same run on the same
machine, because absolute numbers say more about the machine than about Retain, with two
exceptions: the segmenter's rule publishes are judged against the issue's absolute rate
(customers/s; a same-run ratio is shown beside it), and the CLV fit against the constant 2 s.
The machine of this run is listed below; a busy machine (other processes on the cores) shows as
a wide range between rounds in the sections' details. Sections:
`--only ingest|segmenter|messenger|kpi|e2e`; sizes: `--scale`; repeats: `--rounds`; where the
time goes: `--profile`.
"""

SECTIONS: dict[str, Callable[[BenchContext], Section]] = {
    "ingest": ingest.run,
    "segmenter": segmenter.run,
    "messenger": messenger.run,
    "kpi": kpi.run,
    "e2e": e2e.run,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Throughput as ratios against baselines measured in the same run.",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="timed window per measurement (5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up before each window (2)")
    parser.add_argument("--concurrency", type=int, default=64, help="HTTP connections of the load (64)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="repeat each measurement, interleaved; report medians (5)"
    )
    parser.add_argument("--partitions", type=int, default=6, help="partitions of every topic (6)")
    parser.add_argument(
        "--only", action="append", choices=sorted(SECTIONS), help="run only this section (repeatable)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile the service under load (cProfile) and show where"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="data size of the segmenter and messenger sections; 1 = the issues' sizes (1)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or min(args.concurrency, args.rounds, args.partitions) < 1:
        _parser().error("--seconds, --concurrency, --rounds, --partitions must be positive")
    if not 0 < args.scale <= 10:
        _parser().error("--scale must be within (0, 10]")
    options = Options(
        seconds=args.seconds,
        warmup=args.warmup,
        concurrency=args.concurrency,
        rounds=args.rounds,
        partitions=args.partitions,
        profile=args.profile,
        scale=args.scale,
    )
    names = args.only or list(SECTIONS)
    # structlog prints to stdout unless configured; stdout is for the report alone.
    configure_logging("WARNING")
    command = shlex.join(["python", "-m", "tests.bench", *(sys.argv[1:] if argv is None else argv)])
    BENCH_VAR.mkdir(parents=True, exist_ok=True)
    done: list[Section] = []
    with contextlib.ExitStack() as stack:
        ctx = BenchContext(options, stack)
        for name in names:
            say(f"section {name}")
            done.append(SECTIONS[name](ctx))
        kafka_version, postgres_version = ctx.kafka_version, ctx.postgres_version
    machine = machine_info(kafka_version, postgres_version)
    for section in done:
        (BENCH_VAR / f"{section.name}.md").write_text(render(command, machine, [section]), "utf-8")
    report = render(command, machine, done)
    (BENCH_VAR / "report.md").write_text(report, "utf-8")
    if not args.only:
        # The whole system's table is kept with the code, with the machine it ran on.
        DOCS.write_text(PREFACE + report.split("\n", 1)[1] + "\n", "utf-8")
        sys.stdout.write(f"\n(docs/benchmarks.md updated: {DOCS})\n")
    sys.stdout.write(report + "\n")
    written = ", ".join(["var/bench/report.md", *(f"var/bench/{s.name}.md" for s in done)])
    sys.stdout.write(f"\n(written to {written})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
