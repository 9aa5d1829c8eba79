"""Reading the provisioned dashboards and alert rules as the tests need them: every query of
every panel, with Grafana's variables and macros expanded the way Grafana would."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml  # type: ignore[import-untyped]

from shared.config import REPO_ROOT

DASHBOARDS = REPO_ROOT / "deploy" / "grafana" / "dashboards"
PROVISIONING = REPO_ROOT / "deploy" / "grafana" / "provisioning"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"
ALERTS_DOC = REPO_ROOT / "docs" / "alerts.md"

# What Grafana substitutes for its built-ins. The rate window spans the whole live test (its
# traffic comes in two waves within ~2 minutes): with a one-minute window a slow machine ran
# the queries after the last increase, and a ratio of two zero rates is NaN, not data.
BUILTINS = {"__rate_interval": "10m", "__interval": "15s", "__range": "1h"}

METRIC_NAME = re.compile(r"\b(retain_[a-z0-9_]+|up)\b")
# Series of one family: histograms expose _bucket/_sum/_count, and prometheus_client names a
# counter's family without the _total its samples carry (and adds _created series).
FAMILY_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


@dataclass(frozen=True, slots=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    kind: str  # "prometheus" or "postgres"
    text: str  # as written in the JSON

    @property
    def label(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(DASHBOARDS.glob("*.json"))}


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))  # collapsed rows keep theirs inside


def panel_queries() -> list[PanelQuery]:
    found: list[PanelQuery] = []
    for name, board in load_dashboards().items():
        for panel in walk_panels(board["panels"]):
            for target in panel.get("targets", []):
                kind = (target.get("datasource") or panel.get("datasource") or {}).get("type", "")
                text = target.get("expr") if kind == "prometheus" else target.get("rawSql")
                found.append(PanelQuery(name, panel["title"], target["refId"], kind, text or ""))
    return found


def variables(board: Mapping[str, Any]) -> dict[str, str]:
    """The dashboard's template variables at their default value ("All" as its allValue)."""
    values: dict[str, str] = {}
    for var in board.get("templating", {}).get("list", []):
        current = var.get("current", {}).get("value")
        if isinstance(current, list):
            current = current[0] if len(current) == 1 else "|".join(current)
        if current in (None, "$__all"):
            current = var.get("allValue") or ".*"
        values[var["name"]] = str(current)
    return values


def expand(text: str, values: Mapping[str, str], start: datetime, end: datetime) -> str:
    """Grafana's interpolation: $__timeFilter(col), then ${var} and $var (longest name first)."""
    text = re.sub(
        r"\$__timeFilter\(([^)]*(?:\([^)]*\)[^)]*)*)\)",
        lambda m: f"{m.group(1)} BETWEEN '{start.isoformat()}' AND '{end.isoformat()}'",
        text,
    )
    everything = {**BUILTINS, **values}
    for name in sorted(everything, key=len, reverse=True):
        text = text.replace("${" + name + "}", everything[name]).replace("$" + name, everything[name])
    return text


def expanded(query: PanelQuery, start: datetime, end: datetime) -> str:
    return expand(query.text, variables(load_dashboards()[query.dashboard]), start, end)


def alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for path in sorted((PROMETHEUS / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            rules += [r for r in group["rules"] if "alert" in r]
    return rules


def metric_names(promql: str) -> set[str]:
    return set(METRIC_NAME.findall(promql))


def family(name: str) -> str:
    """The metric family a series name belongs to, as /api/v1/metadata names it."""
    for suffix in FAMILY_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
