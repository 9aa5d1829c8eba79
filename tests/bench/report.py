"""Rows, sections and their markdown: measurement | events/s | ratio vs baseline | target | met?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    measurement: str
    events_per_s: float
    ratio: float | None = None  # events_per_s / the baseline's events/s
    baseline: str = ""  # what the ratio is against
    target: float | None = None  # the ratio the issue asks for, if any
    stretch: float | None = None  # the ratio the issue hopes for, beyond the target
    # A rate the issue asks for outright (e.g. "≥ 20k customers/s"): it depends on the machine,
    # so it is shown beside a same-run ratio, never instead of one.
    absolute_target: float | None = None

    @property
    def met(self) -> bool | None:
        if self.ratio is not None and self.target is not None:
            return self.ratio >= self.target
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


def _events(value: float) -> str:
    return f"{value:,.0f}"


def _ratio(row: Row) -> str:
    if row.ratio is None:
        return "baseline"
    return f"{row.ratio:.2f}× {row.baseline}".rstrip()


def _target(row: Row) -> str:
    if row.target:
        text = f"≥ {row.target:g}×"
        return text + (f" (stretch {row.stretch:g}×)" if row.stretch else "")
    if row.absolute_target:
        return f"≥ {row.absolute_target:,.0f}/s (absolute)"
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
        ["measurement", "events/s", "ratio vs baseline", "target", "met?"],
        [
            [
                r.measurement,
                _events(r.events_per_s),
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


def render(command: str, machine: Sequence[tuple[str, str]], sections: Sequence[Section]) -> str:
    lines = [
        "# Retain benchmarks",
        "",
        "Ratios against baselines measured in the same run on the same machine; absolute numbers",
        "are for context only and are not compared with anything.",
        "",
        f"Command: `{command}`",
        "",
        *[f"- {k}: {v}" for k, v in machine],
        "",
    ]
    for section in sections:
        lines += [*render_section(section), ""]
    return "\n".join(lines)
