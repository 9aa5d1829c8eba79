"""Rows, sections and their markdown: measurement | events/s | ratio vs baseline | target | met?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    measurement: str
    events_per_s: float
    ratio: float | None = None  # against the baseline; the sections give the median of per-round ratios
    baseline: str = ""  # what the ratio is against
    target: float | None = None  # the ratio the issue asks for, if any
    stretch: float | None = None  # the ratio the issue hopes for, beyond the target
    # A rate the issue asks for outright (e.g. "≥ 20k customers/s"): it depends on the machine,
    # so it is shown beside a same-run ratio, never instead of one.
    absolute_target: float | None = None
    unit: str = "events/s"  # of events_per_s, which is then the row's figure (e.g. "ms")
    at_most: bool = False  # the target is a ceiling (latency), not a floor

    @property
    def met(self) -> bool | None:
        if self.ratio is not None and self.target is not None:
            return self.ratio <= self.target if self.at_most else self.ratio >= self.target
        if self.absolute_target is not None:
            return self.events_per_s >= self.absolute_target
        return None

    @property
    def stretch_met(self) -> bool | None:
        if self.ratio is None or self.stretch is None:
            return None
        return self.ratio >= self.stretch


@dataclass
class Section:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # markdown lines shown under the table
    notes: list[str] = field(default_factory=list)
    appendix: list[str] = field(default_factory=list)  # markdown lines after the notes (profiles)


def _figure(row: Row) -> str:
    if row.unit == "events/s":
        return f"{row.events_per_s:,.0f}"
    if row.unit == "ms":
        return f"{row.events_per_s:,.1f} ms"
    if row.unit == "s":
        return f"{row.events_per_s:,.2f} s"
    return f"{row.events_per_s:,.0f} {row.unit}"


def _times(row: Row) -> str:
    """The ratio as ``0.91×``; with as many decimals as its target has, if more than 2, so that
    a miss does not round to the target (0.906 against ≥ 0.909 would show as 0.91×)."""
    assert row.ratio is not None
    decimals = 2
    if row.target:
        text = f"{row.target:g}"
        if "e" not in text:
            decimals = max(decimals, len(text.partition(".")[2]))
    return f"{row.ratio:.{decimals}f}×"


def _ratio(row: Row) -> str:
    if row.ratio is None:
        return "baseline" if "(baseline)" in row.measurement else ""
    return f"{_times(row)} {row.baseline}".rstrip()


def _target(row: Row) -> str:
    if row.target:
        text = f"{'≤' if row.at_most else '≥'} {row.target:g}×"
        return text + (f" (stretch {row.stretch:g}×)" if row.stretch else "")
    if row.absolute_target:
        unit = "/s" if row.unit == "events/s" else f" {row.unit}"
        return f"≥ {row.absolute_target:,.0f}{unit} (absolute)"
    return ""


def _met(row: Row) -> str:
    met = row.met
    if met is None:
        return ""
    text = "yes" if met else "**no**"
    stretch = row.stretch_met
    if stretch is not None:
        text += f" (stretch: {'yes' if stretch else 'no'})"
    return text


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """A markdown table; ``align`` holds one of l/r per column (default left)."""
    marks = [("---:" if a == "r" else "---") for a in align.ljust(len(headers), "l")]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_section(section: Section) -> list[str]:
    lines = [f"## {section.title}", ""]
    lines += table(
        ["measurement", "events/s (or as shown)", "ratio vs baseline", "target", "met?"],
        [
            [
                r.measurement,
                _figure(r),
                _ratio(r),
                _target(r),
                _met(r),
            ]
            for r in section.rows
        ],
        align="lrlll",
    )
    if section.details:
        lines += ["", *section.details]
    if section.notes:
        lines += ["", *[f"- {n}" for n in section.notes]]
    if section.appendix:
        lines += ["", *section.appendix]
    return lines


def _baseline_figure(section: Section, row: Row) -> str:
    for other in section.rows:
        if other is not row and row.baseline and other.measurement.startswith(row.baseline):
            return f"{row.baseline}: {_figure(other)}"
    return row.baseline


def summary(sections: Sequence[Section]) -> list[str]:
    """One table for the whole system: every figure that has a target, with its baseline.

    The figures beside a ratio are medians of the rounds, while the sections compute a ratio
    with a target per round and take its median: figure ÷ baseline need not equal it, and the
    header says which one is shown."""
    rows = [
        [
            section.title.split(":")[0],
            row.measurement,
            _figure(row),
            _baseline_figure(section, row),
            _times(row) if row.ratio is not None else "",
            _target(row),
            _met(row),
        ]
        for section in sections
        for row in section.rows
        if row.target or row.absolute_target
    ]
    if not rows:
        return []
    return [
        "## Summary: every target",
        "",
        *table(
            [
                "section",
                "measurement",
                "figure",
                "same-run baseline",
                "ratio vs baseline (median of the rounds' ratios)",
                "target",
                "met?",
            ],
            rows,
            align="llrlrll",
        ),
        "",
    ]


def render(command: str, machine: Sequence[tuple[str, str]], sections: Sequence[Section]) -> str:
    lines = [
        "# Retain benchmarks",
        "",
        "Ratios against baselines measured in the same run on the same machine, except where a",
        "target is absolute (marked '(absolute)') or a constant (the CLV fit's 2 s, shown as",
        "2 s / fit seconds); other absolute numbers are for context only and are not compared",
        "with anything.",
        "",
        f"Command: `{command}`",
        "",
        *[f"- {k}: {v}" for k, v in machine],
        "",
        *summary(sections),
    ]
    for section in sections:
        lines += [*render_section(section), ""]
    return "\n".join(lines)
