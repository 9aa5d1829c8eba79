"""The dependency audit's glue: OSV range semantics, the local OSV endpoint, source choice, exceptions.

Fixture records are written here, modelled on real advisories (PYSEC-2019-217: jinja2 before 2.10.1,
sandbox escape). One test also reads the real snapshot when one is present (see docs/operations.md).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints; types-PyYAML is not a dependency
from packaging.version import Version

from tests.audit import audit, refresh
from tests.audit.audit import AuditError, Exemption, Finding, Source
from tests.audit.osv import Advisories, affects, in_events, serve

JINJA2_2019_217 = """\
id: PYSEC-2019-217
details: In Pallets Jinja before 2.10.1, str.format_map allows a sandbox escape.
affected:
- package:
    name: Jinja2
    ecosystem: PyPI
  ranges:
  - type: GIT
    repo: https://github.com/pallets/jinja
    events:
    - introduced: '0'
    - fixed: a2a6c930bcca591a25d2b316fcfd2d6793897b26
  - type: ECOSYSTEM
    events:
    - introduced: '0'
    - fixed: 2.10.1
  versions:
  - '2.10'
aliases:
- CVE-2019-10906
- GHSA-462w-v97r-4m45
modified: '2021-11-22T04:57:52.862665Z'
published: '2019-04-07T00:29:00Z'
"""

JINJA2_WITHDRAWN = """\
id: PYSEC-0000-1
summary: withdrawn, must not be served
withdrawn: '2024-01-01T00:00:00Z'
affected:
- package: {name: jinja2, ecosystem: PyPI}
  ranges:
  - type: ECOSYSTEM
    events: [{introduced: '0'}]
"""

MULTIPART_LISTED = """\
id: PYSEC-0000-2
summary: only listed versions, no range
affected:
- package: {name: python_multipart, ecosystem: PyPI}
  versions: ['0.0.5', '0.0.6']
"""


def write_snapshot(root: Path, records: dict[str, str], info: dict[str, Any] | None = None) -> Path:
    for relative, text in records.items():
        path = root / "vulns" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "vulns").mkdir(parents=True, exist_ok=True)
    if info is not None:
        (root / "SNAPSHOT.json").write_text(json.dumps(info), encoding="utf-8")
    return root


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    return write_snapshot(
        tmp_path / "advisories",
        {
            "jinja2/PYSEC-2019-217.yaml": JINJA2_2019_217,
            "jinja2/PYSEC-0000-1.yaml": JINJA2_WITHDRAWN,
            "python-multipart/PYSEC-0000-2.yaml": MULTIPART_LISTED,
        },
        {"commit": "0123456789abcdef", "date": "2026-07-23T14:42:31+00:00"},
    )


@pytest.fixture
def osv_url(snapshot: Path) -> Iterator[str]:
    with serve(Advisories(snapshot)) as url:
        yield url


def post(url: str, body: bytes) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, headers=headers)  # noqa: S310 - the local endpoint
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def query(url: str, name: str, version: str, ecosystem: str = "PyPI") -> tuple[int, Any]:
    body = {"package": {"name": name, "ecosystem": ecosystem}, "version": version}
    return post(url, json.dumps(body).encode())


# --- OSV version ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "expected"),
    [("0.1", True), ("2.10", True), ("2.10.1rc1", True), ("2.10.1", False), ("3.1.6", False)],
)
def test_introduced_zero_until_fixed(version: str, expected: bool) -> None:
    assert in_events(Version(version), [{"introduced": "0"}, {"fixed": "2.10.1"}]) is expected


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("0.9", False),
        ("1.0", True),
        ("1.5", True),
        ("2.0", False),
        ("2.5", False),
        ("3.0", True),
        ("4.0", False),
    ],
)
def test_two_ranges_in_one_event_list_in_any_order(version: str, expected: bool) -> None:
    events = [{"fixed": "4.0"}, {"introduced": "3.0"}, {"fixed": "2.0"}, {"introduced": "1.0"}]
    assert in_events(Version(version), events) is expected


@pytest.mark.parametrize(("version", "expected"), [("1.0", True), ("1.4", True), ("1.4.1", False)])
def test_last_affected_is_inclusive(version: str, expected: bool) -> None:
    assert in_events(Version(version), [{"introduced": "1.0"}, {"last_affected": "1.4"}]) is expected


def test_open_range_and_unreadable_bounds_count_as_affected() -> None:
    assert in_events(Version("99"), [{"introduced": "0"}])
    assert in_events(Version("9.9"), [{"introduced": "0"}, {"last_affected": "2.6.0-NA"}])
    assert in_events(Version("0.1"), [{"introduced": "not-a-version"}, {"fixed": "1.0"}])
    assert not in_events(Version("1.0"), [{"introduced": "not-a-version"}, {"fixed": "1.0"}])


def test_affects_matches_names_ranges_and_version_lists() -> None:
    record = yaml.safe_load(JINJA2_2019_217)
    assert affects(record, "jinja2", "2.10")
    assert affects(record, "Jinja2", "2.9.6")  # any spelling of the name
    assert not affects(record, "jinja2", "2.10.1")
    assert not affects(record, "jinja2", "3.1.6")
    assert not affects(record, "markupsafe", "2.10")
    listed = yaml.safe_load(MULTIPART_LISTED)
    assert affects(listed, "python-multipart", "0.0.6")
    assert not affects(listed, "python-multipart", "0.0.7")
    other_ecosystem = {
        "affected": [{"package": {"name": "jinja2", "ecosystem": "npm"}, "versions": ["2.10"]}]
    }
    assert not affects(other_ecosystem, "jinja2", "2.10")


# --- the local OSV endpoint -------------------------------------------------------------------


def test_endpoint_reports_an_old_jinja2_and_not_a_current_one(osv_url: str) -> None:
    status, body = query(osv_url, "jinja2", "2.10")
    assert status == 200
    assert [v["id"] for v in body["vulns"]] == ["PYSEC-2019-217"]  # the withdrawn record is not served
    assert body["vulns"][0]["aliases"] == ["CVE-2019-10906", "GHSA-462w-v97r-4m45"]
    # pip-audit reads fix versions only from an entry named with the canonical name
    assert body["vulns"][0]["affected"][0]["package"]["name"] == "jinja2"
    assert query(osv_url, "jinja2", "3.1.6") == (200, {})
    assert query(osv_url, "Python_Multipart", "0.0.5")[1]["vulns"][0]["id"] == "PYSEC-0000-2"
    assert query(osv_url, "no-such-package", "1.0") == (200, {})
    assert query(osv_url, "jinja2", "2.10", ecosystem="npm") == (200, {})


def test_endpoint_rejects_what_it_does_not_serve(osv_url: str) -> None:
    assert post(osv_url, b"not json")[0] == 400
    assert post(osv_url, b'{"commit": "abc"}')[0] == 400
    assert post(osv_url.replace("/v1/query", "/v1/querybatch"), b"{}")[0] == 404


# --- sources ----------------------------------------------------------------------------------


def test_probe_accepts_only_a_feed_that_knows_the_canary(osv_url: str, tmp_path: Path) -> None:
    assert audit.probe_osv(osv_url) is None
    with serve(Advisories(write_snapshot(tmp_path / "empty", {}))) as empty_url:
        why = audit.probe_osv(empty_url)
    assert why is not None
    assert "no vulnerabilities reported for jinja2 2.10" in why
    assert audit.probe_osv("http://127.0.0.1:9/v1/query") is not None  # nothing listens on port 9
    assert audit.probe_pypi("http://127.0.0.1:9/pypi/{name}/{version}/json") is not None


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "probe_osv", lambda: "unreachable (test)")
    monkeypatch.setattr(audit, "probe_pypi", lambda: "unreachable (test)")


@pytest.mark.usefixtures("offline")
def test_offline_uses_the_snapshot_and_says_which(snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "snapshot_dirs", lambda: [snapshot.parent / "missing", snapshot])
    with ExitStack() as stack:
        source = audit.choose_source(stack, "auto")
        assert source.name == "snapshot"
        assert "commit 0123456789ab of 2026-07-23" in source.description
        url = source.pip_audit_args[source.pip_audit_args.index("--osv-url") + 1]
        assert query(url, "jinja2", "2.10")[1]["vulns"]  # the endpoint is up for the duration


@pytest.mark.usefixtures("offline")
def test_no_source_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = write_snapshot(tmp_path / "empty", {})  # a snapshot that does not know the canary is refused
    monkeypatch.setattr(audit, "snapshot_dirs", lambda: [tmp_path / "missing", empty])
    with ExitStack() as stack, pytest.raises(AuditError, match="nothing was audited"):
        audit.choose_source(stack, "auto")
    with ExitStack() as stack, pytest.raises(AuditError, match="unreachable"):
        audit.choose_source(stack, "osv")  # a forced live source does not fall back
    with ExitStack() as stack, pytest.raises(AuditError, match="expected one of"):
        audit.choose_source(stack, "everything")


def test_main_fails_without_a_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETAIN_AUDIT_SOURCE", "snapshot")
    monkeypatch.setattr(audit, "snapshot_dirs", lambda: [tmp_path / "missing"])
    assert audit.main([]) == 2


def test_lint_skips_loudly_without_a_source_but_not_on_other_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make lint` on a machine with no internet and no snapshot: the code is still linted, and
    the audit says it did not run and why; a broken setting still fails."""
    monkeypatch.setenv("RETAIN_AUDIT_SOURCE", "snapshot")
    monkeypatch.setattr(audit, "snapshot_dirs", lambda: [tmp_path / "missing"])
    assert audit.main(["--skip-unreachable"]) == 0
    assert "SKIPPED, not audited" in capsys.readouterr().err
    monkeypatch.setenv("RETAIN_AUDIT_SOURCE", "everything")
    assert audit.main(["--skip-unreachable"]) == 2


def test_old_snapshot_is_flagged(snapshot: Path) -> None:
    description, warning = audit.describe_snapshot(snapshot, today=dt.date(2026, 8, 1))
    assert "of 2026-07-23 (9 days old)" in description
    assert warning is None
    _, warning = audit.describe_snapshot(snapshot, today=dt.date(2027, 7, 23))
    assert warning is not None
    assert "365 days old" in warning


# --- the lock, exceptions, pip-audit ------------------------------------------------------------


def test_locked_packages_are_the_registry_ones(tmp_path: Path) -> None:
    lock = tmp_path / "uv.lock"
    lock.write_text(
        textwrap.dedent(
            """\
            version = 1
            [[package]]
            name = "jinja2"
            version = "3.1.6"
            source = { registry = "https://pypi.org/simple" }
            [[package]]
            name = "retain"
            version = "0.1.0"
            source = { editable = "." }
            """
        ),
        encoding="utf-8",
    )
    assert audit.locked_packages(lock) == ([("jinja2", "3.1.6")], ["retain"])


def test_the_real_lock_is_read() -> None:
    packages, _ = audit.locked_packages()
    names = {name for name, _ in packages}
    assert {"fastapi", "jinja2", "pip-audit"} <= names


def test_exceptions_need_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "exceptions.toml"
    path.write_text('[[exception]]\nid = "PYSEC-1"\npackage = "pip"\nreason = "not used at run time"\n')
    assert audit.load_exemptions(path) == [Exemption("PYSEC-1", "pip", "not used at run time")]
    path.write_text('[[exception]]\nid = "PYSEC-1"\npackage = "pip"\nreason = " "\n')
    with pytest.raises(AuditError, match="reason"):
        audit.load_exemptions(path)
    path.write_text('[[exception]]\nid = "PYSEC-1"\npackage = "pip"\nreason = "x"\nuntil = "later"\n')
    with pytest.raises(AuditError, match="exactly"):
        audit.load_exemptions(path)
    assert audit.load_exemptions() is not None  # the committed file is valid


def test_judge_matches_ids_and_aliases_per_package() -> None:
    finding = Finding("jinja2", "2.10", "PYSEC-2019-217", ("CVE-2019-10906",), ("2.10.1",), "escape")
    by_alias = Exemption("CVE-2019-10906", "Jinja2", "sandbox unused")
    other_package = Exemption("PYSEC-2019-217", "markupsafe", "wrong package")
    open_, exempted, unused = audit.judge([finding], [by_alias, other_package])
    assert open_ == []
    assert exempted == [(finding, by_alias)]
    assert unused == [other_package]
    assert audit.judge([finding], [])[0] == [finding]


def test_pip_audit_flags_an_old_jinja2_through_the_endpoint(osv_url: str, tmp_path: Path) -> None:
    source = Source("snapshot", "test", ["-s", "osv", "--osv-url", osv_url])
    findings = audit.run_pip_audit([("jinja2", "2.10"), ("markupsafe", "3.0.3")], source, tmp_path)
    assert [(f.package, f.version, f.id, f.fix_versions) for f in findings] == [
        ("jinja2", "2.10", "PYSEC-2019-217", ("2.10.1",))
    ]
    assert "CVE-2019-10906" in findings[0].ids
    assert audit.run_pip_audit([("jinja2", "3.1.6")], source, tmp_path) == []


def test_the_real_snapshot_knows_old_jinja2_and_not_the_locked_one() -> None:
    root = next((d for d in audit.snapshot_dirs() if (d / "vulns").is_dir()), None)
    if root is None:
        pytest.skip("no advisory snapshot on this machine (see docs/operations.md, 'Dependency audit')")
    advisories = Advisories(root)
    assert "PYSEC-2019-217" in {r["id"] for r in advisories.query("jinja2", "2.10")}
    locked = dict(audit.locked_packages()[0])
    assert advisories.query("jinja2", locked["jinja2"]) == []


def test_refresh_copies_a_repository_with_its_commit(tmp_path: Path) -> None:
    upstream = write_snapshot(tmp_path / "upstream", {"jinja2/PYSEC-2019-217.yaml": JINJA2_2019_217})
    write_snapshot(upstream, {"not-locked-at-all/PYSEC-0000-3.yaml": MULTIPART_LISTED})
    (upstream / "LICENSE").write_text("CC-BY-4.0\n")
    git = ["git", "-C", str(upstream), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "advisories"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(upstream), str(bare)], check=True)

    for source, only_locked in ((upstream, False), (bare, True)):
        out = tmp_path / "out"
        info = refresh.refresh(source, out, repository="test/advisories", only_locked=only_locked)
        assert info["commit"] == commit.strip()
        assert json.loads((out / "SNAPSHOT.json").read_text())["commit"] == commit.strip()
        assert (out / "LICENSE").is_file()
        packages = sorted(p.name for p in (out / "vulns").iterdir())
        assert packages == (["jinja2"] if only_locked else ["jinja2", "not-locked-at-all"])
        assert Advisories(out).query("jinja2", "2.10")
