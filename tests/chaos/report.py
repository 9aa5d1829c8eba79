"""The figures of a chaos run: printed, and written into docs/reliability.md between markers
(the text around them is written by people and kept)."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path

from shared.config import REPO_ROOT
from tests.chaos.poison import REASON
from tests.chaos.run import KILLED, Figures, Options

DOC = REPO_ROOT / "docs" / "reliability.md"
BEGIN = "<!-- chaos:begin (written by `make chaos`; edit outside these markers) -->"
END = "<!-- chaos:end -->"


def lines(figures: Figures, options: Options, command: str) -> list[str]:
    f, d = figures, figures.delivery
    kills = ", ".join(f"{w} {f.count('kill', w)}" for w in KILLED)
    out = [
        f"Run: `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"result **{'PASS' if f.ok else 'FAIL'}** in {f.total_s:.0f}s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| events replayed through ingest's HTTP API | {f.events} "
        f"({f.customers} customers, seed {options.seed}) |",
        f"| replay time, ingest retries (503 / unreachable) | {f.replay_s:.0f}s, {f.ingest_retries} |",
        f"| SIGKILLs | {f.count('kill')} ({kills}) |",
        f"| broker stopped and restarted | {f.count('broker')} |",
        f"| PostgreSQL `pg_ctl stop -m immediate` + start | {f.count('postgres')} |",
        f"| second consumer joined and left (2 rebalances each) | {f.count('rebalance')} "
        f"({', '.join(x.target for x in f.faults if x.kind == 'rebalance')}) |",
        f"| processes that died unasked | {len(f.crashed)} |",
        f"| settle time after the last fault | {f.settle_s:.0f}s |",
        f"| consumer lag at the end | {sum(f.lag.values())} ({_pairs(f.lag)}) |",
        f"| work left (outboxes, messages due or mid-send) | {sum(f.pending.values())} |",
        f"| events lost (accepted, absent from the topics) | {f.lost} |",
        f"| redelivered records dropped by event id | {f.duplicates_on_topics} (on topics) |",
    ]
    for c in f.comparisons:
        out.append(
            f"| {c.name} | {c.compared} compared: missing {len(c.missing)}, extra {len(c.extra)}, "
            f"different {len(c.different)} |"
        )
    out += [
        f"| messages decided (ledger rows) / sent | {d.messages} / {d.sent} ({_pairs(f.statuses)}) |",
        f"| provider calls (call log) / outbox files | {d.calls} / {d.outbox_files} |",
        f"| messages handed to a provider twice (duplicated) | {len(d.duplicated)} |",
        f"| sent without a ledger 'sent' / 'sent' with no call or file | "
        f"{len(d.unrecorded)} / {len(d.unlogged)} |",
        f"| cap violations | {len(d.cap_violations)} |",
        f"| sent without consent (marketing, {d.consent_checked} checked against the oracle) | "
        f"{len(d.consent_violations)} |",
        f"| marketing sent in quiet hours | {len(d.quiet_violations)} |",
    ]
    if f.dlq is not None:
        q = f.dlq
        for p in q.poisons:
            letters = ", ".join(f"{g} {n}" for g, n in q.letters.get(p.name, {}).items())
            reasons = ", ".join(f"'{r}' {n}" for r, n in q.reasons.get(p.name, {}).items())
            out.append(
                f"| poison: {p.name} on {p.topic.removeprefix('chaos.retain.')} → dead letters "
                f"per group (reasons; required: '{REASON}') | {letters or 'none'} "
                f"({reasons or 'no letter'}) |"
            )
        behind = ", ".join(f"{name} {n}" for name, n in q.behind.items())
        out += [
            f"| records behind the poisons on their partitions (applied: ledgers) | {q.after_poison} "
            f"({behind}) |",
            f"| dead letters with a wrong reason, detail or value | {len(q.bad_letters)} |",
            f"| `retain dlq replay` of a dead-lettered valid purchase (runs that exited 0) | "
            f"{len(q.replays)} of 2; applied in: {', '.join(q.applied_in) or 'nothing'} |",
        ]
    return out


def problems(figures: Figures) -> list[str]:
    f, d = figures, figures.delivery
    out = [f"{c.summary()}: {'; '.join(c.examples(3))}" for c in f.comparisons if not c.ok]
    for name, items in (
        ("duplicated", d.duplicated),
        ("unrecorded", d.unrecorded),
        ("unlogged", d.unlogged),
        ("cap", d.cap_violations),
        ("consent", d.consent_violations),
        ("quiet", d.quiet_violations),
    ):
        if items:
            out.append(f"{name}: {len(items)}: {'; '.join(items[:3])}")
    if f.lost:
        out.append(f"lost: {f.lost}")
    if any(f.lag.values()):
        out.append(f"lag: {_pairs(f.lag)}")
    if any(f.pending.values()):
        out.append(f"pending: {_pairs(f.pending)}")
    if f.crashed:
        out.append(f"crashed: {', '.join(f.crashed)}")
    if f.dlq is not None:
        out += [f"dlq: {p}" for p in f.dlq.problems()]
    return out


def _pairs(values: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())


def write_doc(body: list[str], path: Path = DOC) -> None:
    block = "\n".join([BEGIN, *body, END])
    text = path.read_text("utf-8") if path.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + block + tail, "utf-8")
