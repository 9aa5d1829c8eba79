"""The shipped Prometheus config, alert rules and Grafana files, checked without the services:
promtool's own checks and unit tests, and the conventions the live test relies on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from shared.infra.prometheus import LocalPrometheus, render_config
from tests.ops.grafana import (
    ALERTS_DOC,
    PROMETHEUS,
    PROVISIONING,
    alert_rules,
    load_dashboards,
    panel_queries,
    walk_panels,
)
from tests.ops.promql import signals

pytestmark = pytest.mark.integration  # needs Debian's prometheus package (promtool)

SERVICES = {"ingest", "segmenter", "messenger", "kpi"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules() -> None:
    rules = sorted(str(p) for p in (PROMETHEUS / "rules").glob("*.yml"))
    result = promtool("check", "rules", *rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    tests = sorted(str(p) for p in (PROMETHEUS / "tests").glob("*.yml"))
    assert tests
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_panels_counting_events_count_a_series_first_one(tmp_path: Path) -> None:
    """A labelled counter is born at 1 (prometheus_client makes a child at its first inc),
    which increase() alone does not see: the dead-letter panels showed 0 while
    RetainDeadLettersGrowing fired on that very letter. Each panel that counts events with
    increase() is run by promtool on a series born at 1 (at 30 minutes) and must show it."""
    counting = [q for q in panel_queries() if "increase(" in q.text]
    assert len(counting) >= 5
    tests = []
    for q in counting:
        name = re.search(r"increase\((\w+)", q.text)
        by = re.search(r"sum by \(([^)]*)\)", q.text)
        assert name is not None, q.label
        labels = [x.strip() for x in by.group(1).split(",")] if by else []
        window = "1h" if "$__range" in q.text else "1m"
        expr = q.text.replace("$__range", "1h").replace("$__rate_interval", "1m").replace("$service", ".*")
        series = ", ".join(['service="kpi"', *(f'{label}="x"' for label in labels)])
        tests.append(
            {
                "interval": "15s",
                "input_series": [{"series": f"{name.group(1)}{{{series}}}", "values": "_x120 1x400"}],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "50m" if window == "1h" else "30m30s",
                        "exp_samples": [
                            {"labels": "{" + ", ".join(f'{label}="x"' for label in labels) + "}", "value": 1}
                        ],
                    }
                ],
            }
        )
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "15s", "tests": tests}))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _unit_tests() -> dict[str, list[list[Any]]]:
    """Per alert, the exp_alerts lists its unit tests expect."""
    expectations: dict[str, list[list[Any]]] = {}
    for path in (PROMETHEUS / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                expectations.setdefault(check["alertname"], []).append(check.get("exp_alerts") or [])
    return expectations


def _anchors(markdown: str) -> set[str]:
    # GitHub's heading slugs: lower case, punctuation dropped, spaces to dashes.
    return {
        re.sub(r"[^a-z0-9 -]", "", m.group(1).strip().lower()).replace(" ", "-")
        for m in re.finditer(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    }


def test_every_alert_is_documented_and_unit_tested_both_ways() -> None:
    expectations = _unit_tests()
    anchors = _anchors(ALERTS_DOC.read_text(encoding="utf-8"))
    operations = (ALERTS_DOC.parent / "operations.md").read_text(encoding="utf-8")
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "alert names must be unique"
    for rule in rules:
        name = rule["alert"]
        annotations = rule.get("annotations", {})
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        doc, _, anchor = annotations["runbook_url"].partition("#")
        assert doc == "docs/alerts.md", name
        assert anchor in anchors, f"{name}: no section #{anchor} in docs/alerts.md"
        assert f"[{name}](alerts.md#{anchor})" in operations, f"{name}: not in docs/operations.md's table"
        cases = expectations.get(name, [])
        assert any(cases), f"{name}: no unit test where it fires"
        assert any(not c for c in cases), f"{name}: no unit test where it stays quiet"


def test_prometheus_scrapes_every_process_of_every_service() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    assert config["global"]["evaluation_interval"] == "15s"
    assert config["rule_files"] == ["rules/*.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == SERVICES
    ports: list[int] = []
    for name, job in jobs.items():
        processes = set()
        for static in job["static_configs"]:
            assert static["labels"]["service"] == name
            processes.add(static["labels"]["process"])
            ports += [int(t.rsplit(":", 1)[1]) for t in static["targets"]]
        assert "api" in processes, name
    assert len(ports) == len(set(ports))
    assert {8001, 8002, 8003, 8004} <= set(ports)


def test_render_config_moves_ports_and_anchors_rule_files(tmp_path: Path) -> None:
    rendered = render_config(
        PROMETHEUS / "prometheus.yml", ports={8001: 18001, 8104: 18104}, scrape_interval="1s"
    )
    targets = [t for job in rendered["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    assert "127.0.0.1:18001" in targets
    assert "127.0.0.1:18104" in targets
    assert "127.0.0.1:8002" in targets  # not asked to move
    assert rendered["rule_files"] == [str((PROMETHEUS / "rules" / "*.yml").resolve())]
    assert rendered["global"]["scrape_interval"] == rendered["global"]["scrape_timeout"] == "1s"


def test_local_prometheus_loads_every_rule_and_stops(tmp_path: Path) -> None:
    with LocalPrometheus(tmp_path, evaluation_interval="1s") as prometheus:
        loaded = {r["name"] for g in prometheus.rule_groups() for r in g["rules"]}
        assert loaded == {r["alert"] for r in alert_rules()}
        assert prometheus.query("1 + 1")[0]["value"][1] == "2"
        # Prometheus' own parser accepts every alert's signal (the live test wants series).
        for rule in alert_rules():
            for signal in signals(rule["expr"]):
                prometheus.query(signal)  # raises on an invalid one
        process = prometheus._proc
    assert process is not None
    assert process.poll() is not None  # stopped with the block


def _overlaps(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def test_dashboards_are_well_formed() -> None:
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "retain.yml").read_text(encoding="utf-8"))
    sources = {(d["type"], d["uid"]) for d in provisioned["datasources"]}
    boards = load_dashboards()
    assert set(boards) == {"pipeline", "messaging", "retention"}
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for name, board in boards.items():
        assert board["schemaVersion"] >= 36, name
        panels = list(walk_panels(board["panels"]))
        assert len({p["id"] for p in panels}) == len(panels), f"{name}: panel ids repeat"
        placed: list[dict[str, int]] = []
        for panel in panels:
            grid = panel["gridPos"]
            assert 0 <= grid["x"] <= grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']}"
            assert not any(_overlaps(grid, other) for other in placed), f"{name}: {panel['title']} overlaps"
            placed.append(grid)
            if panel["type"] == "row":
                continue
            assert panel.get("description"), f"{name}: {panel['title']} has no description"
            assert panel.get("targets"), f"{name}: {panel['title']} has no query"
            for target in panel["targets"]:
                source = target.get("datasource") or panel["datasource"]
                assert (source["type"], source["uid"]) in sources, f"{name}: {panel['title']}"
    queries = panel_queries()
    assert all(q.text.strip() for q in queries)
    assert {q.kind for q in queries} == {"prometheus", "postgres"}
