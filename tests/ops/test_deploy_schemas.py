"""deploy/ against the schemas its consumers publish (tests/ops/schemas.py): the dashboards
against Grafana's generated types, the Compose file against the Compose Specification's JSON
schema, and the paths the Compose file and the Dockerfile name against the repository.

Each check is also shown failing on a copy with one known defect: a check that cannot fail
proves nothing."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml  # type: ignore[import-untyped]

from shared.config import REPO_ROOT
from tests.ops.grafana import load_dashboards, walk_panels
from tests.ops.schemas import COMPOSE_SCHEMA, SCHEMAS_DIR, dashboard_module, ensure_node_modules, typecheck

pytestmark = pytest.mark.integration  # needs node and deploy/schemas' npm packages

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"


# ------------------------------------------------------------------------------ Grafana


def _first(board: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in walk_panels(board["panels"]) if p["type"] == kind)


def _mutants() -> dict[str, tuple[dict[str, Any], str]]:
    """One defect each, and a word the compiler's complaint must contain."""
    boards = load_dashboards()
    out: dict[str, tuple[dict[str, Any], str]] = {}

    def mutant(name: str, source: str, change: Any, expect: str) -> None:
        board = copy.deepcopy(boards[source])
        change(board)
        out[name] = (board, expect)

    mutant("typo_top_level", "pipeline", lambda b: b.update(refrsh="1m"), "refrsh")
    mutant(
        "typo_panel_key", "messaging", lambda b: _first(b, "timeseries").update(descripton="x"), "descripton"
    )
    mutant(
        "wrong_type_grid", "pipeline", lambda b: _first(b, "stat")["gridPos"].update(h="8"), "not assignable"
    )
    mutant(
        "bad_enum_legend",
        "messaging",
        lambda b: _first(b, "timeseries")["options"]["legend"].update(displayMode="lists"),
        '"lists"',
    )
    mutant(
        "missing_required_option",
        "retention",
        lambda b: _first(b, "histogram")["options"].pop("tooltip"),
        "tooltip",
    )
    mutant(
        "typo_custom_field_config",
        "pipeline",
        lambda b: _first(b, "timeseries")["fieldConfig"]["defaults"]["custom"].update(lineWdth=1),
        "lineWdth",
    )
    mutant(
        "override_of_no_field",
        "messaging",
        lambda b: _first(b, "timeseries")["fieldConfig"]["overrides"].append(
            {
                "matcher": {"id": "byName", "options": "x"},
                "properties": [{"id": "custom.lineWdth", "value": 2}],
            }
        ),
        "never",
    )
    mutant(
        "unknown_panel_type",
        "retention",
        lambda b: _first(b, "stat").update(type="stats"),
        "a panel type with a schema",
    )
    return out


def test_dashboards_match_grafanas_schema(tmp_path: Path) -> None:
    boards = load_dashboards()
    mutants = _mutants()
    modules = {name: dashboard_module(name, board) for name, board in boards.items()}
    modules |= {f"mutant_{name}": dashboard_module(name, board) for name, (board, _) in mutants.items()}
    errors = typecheck(modules, tmp_path)
    assert {name: errors[name] for name in boards} == {name: [] for name in boards}
    for name, (_, expect) in mutants.items():
        found = errors[f"mutant_{name}"]
        assert found, f"{name}: the schema check let it through"
        assert any(expect in line for line in found), (name, found)


def test_every_panel_is_checked_against_its_plugin() -> None:
    """The generated module types options, custom field config and overrides of every panel."""
    for name, board in load_dashboards().items():
        module = dashboard_module(name, board)
        for panel in walk_panels(board["panels"]):
            ref = f"panel_{panel['id']}"
            assert f"export const {ref}: Json<dashboard." in module, (name, ref)
            if panel["type"] != "row":
                assert f"export const {ref}_options: Json<" in module, (name, ref)
                assert f"export const {ref}_custom: " in module, (name, ref)
                overrides = panel.get("fieldConfig", {}).get("overrides", [])
                count = sum(len(o.get("properties", [])) for o in overrides)
                assert module.count(f"export const {ref}_override_") == count, (name, ref)


def test_grafana_schema_is_the_version_compose_runs() -> None:
    package = json.loads((SCHEMAS_DIR / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((SCHEMAS_DIR / "package-lock.json").read_text(encoding="utf-8"))
    pinned = package["dependencies"]["@grafana/schema"]
    assert lock["packages"]["node_modules/@grafana/schema"]["version"] == pinned
    image = _compose()["services"]["grafana"]["image"]
    assert image == f"grafana/grafana:{pinned}", "move @grafana/schema with the Grafana image"


# ------------------------------------------------------------------------------ Compose

_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation, as `docker compose config` does it before validating:
    ``${VAR}``, ``${VAR:-default}``/``${VAR-default}``, ``$VAR``, and ``$$`` for a ``$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group() == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        unset = name not in env or (op is not None and op.startswith(":") and not env[name])
        if op in ("-", ":-"):
            return arg if unset else env[name]
        if op is None:
            return "" if unset else env[name]
        raise AssertionError(f"interpolation {match.group()!r} is not used in this repository")

    return _VARIABLE.sub(one, value)


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")), env={})
    return loaded


def _compose_errors(document: dict[str, Any]) -> list[str]:
    ensure_node_modules()
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema_rs.validator_for(schema)
    return [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert (
        interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET} $SET $$SET", env)
        == "x d  d  x $SET"
    )
    assert interpolate({"a": ["${UNSET:-1}"]}, env) == {"a": ["1"]}


def test_compose_file_matches_the_compose_specification() -> None:
    compose = _compose()
    assert compose["name"] == "retain"
    assert _compose_errors(compose) == []


@pytest.mark.parametrize(
    ("defect", "expect"),
    [
        (lambda c: c["services"]["kafka"].update(restart_policy="always"), "restart_policy"),
        (lambda c: c["services"]["grafana"].update(ports="3000:3000"), "ports"),
        (lambda c: c["services"]["prometheus"]["healthcheck"].update(interval=10), "interval"),
        (lambda c: c.update(service={}), "service"),
    ],
    ids=["unknown_service_key", "ports_not_a_list", "duration_not_a_string", "unknown_top_level_key"],
)
def test_compose_schema_check_catches(defect: Any, expect: str) -> None:
    compose = _compose()
    defect(compose)
    errors = _compose_errors(compose)
    assert errors
    assert any(expect in e for e in errors), errors


def test_compose_and_dockerfile_name_paths_that_exist() -> None:
    compose = _compose()
    build = compose["x-retain"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO_ROOT.resolve()
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {volume}"
    copied = re.findall(r"^COPY\s+(?!--from)(.+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert copied
    for line in copied:
        *sources, _destination = line.split()
        for source in sources:
            assert (context / source).exists(), f"Dockerfile: COPY {source} names nothing"
    # The stages compose and the Dockerfile agree on, and the user it ends as.
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM .* AS builder$", text, re.MULTILINE)
    assert re.search(r"^COPY --from=builder ", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")
