"""``python -m tests.audit``: pip-audit on every package pinned in ``uv.lock``, with explained exceptions.

Where the advisories come from (``RETAIN_AUDIT_SOURCE``, default ``auto`` = the first that works):

* ``osv`` — the live OSV API (api.osv.dev), which carries the PyPA advisory database and GitHub's;
* ``pypi`` — PyPI's JSON API (``/pypi/<name>/<version>/json``, its ``vulnerabilities``);
* ``snapshot`` — a dated copy of the PyPA advisory database (the first of ``$RETAIN_AUDIT_ADVISORIES``,
  ``../shared/advisories``, ``var/audit/advisories``, and the committed ``deploy/audit/advisories``
  that exists), served to pip-audit by
  :mod:`tests.audit.osv` on 127.0.0.1 for the few seconds of the audit.

A source counts as working only if it reports a known vulnerability of a canary (jinja2 2.10): a
feed that answers 404 or nothing must not pass the audit. If no source works, the audit fails and
says why — it never passes without auditing. The output names the source, and for the snapshot its
commit and date.

Every finding fails the audit unless ``tests/audit/exceptions.toml`` lists it (advisory id or one of
its aliases, the package, the reason). An exception that matches nothing any more is reported so it
can be removed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from tests.audit.osv import Advisories, serve

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK = REPO_ROOT / "uv.lock"
EXCEPTIONS = Path(__file__).with_name("exceptions.toml")
OSV_URL = "https://api.osv.dev/v1/query"
PYPI_JSON_URL = "https://pypi.org/pypi/{name}/{version}/json"
CANARY = ("jinja2", "2.10")  # CVE-2019-10906 (sandbox escape), fixed in 2.10.1: every source knows it
PROBE_TIMEOUT_S = 4.0
STALE_AFTER_DAYS = 180
SOURCES = ("auto", "osv", "pypi", "snapshot")


class AuditError(Exception):
    """The audit could not run (no source, bad exceptions file, pip-audit failed)."""


class NoSourceError(AuditError):
    """No advisories reachable: nothing could be audited (not: something was found)."""


def say(message: str) -> None:
    sys.stderr.write(f"audit: {message}\n")
    sys.stderr.flush()


# --- the lock ---------------------------------------------------------------------------------


def locked_packages(lock: Path = LOCK) -> tuple[list[tuple[str, str]], list[str]]:
    """``(name, version)`` of every package from a registry in the lock, and the others' names."""
    data = tomllib.loads(lock.read_text(encoding="utf-8"))
    pinned: list[tuple[str, str]] = []
    others: list[str] = []
    for package in data.get("package", []):
        source = package.get("source", {})
        if "registry" in source and "version" in package:
            pinned.append((str(package["name"]), str(package["version"])))
        else:
            others.append(str(package["name"]))
    return sorted(pinned), sorted(others)


# --- exceptions -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Exemption:
    id: str
    package: str
    reason: str

    def covers(self, package: str, ids: set[str]) -> bool:
        return canonicalize_name(package) == canonicalize_name(self.package) and self.id in ids


def load_exemptions(path: Path = EXCEPTIONS) -> list[Exemption]:
    """The ``[[exception]]`` tables of ``path``; each needs a non-empty id, package and reason."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    unknown = set(data) - {"exception"}
    if unknown:
        raise AuditError(f"{path}: unknown keys {sorted(unknown)}; only [[exception]] tables")
    exemptions = []
    for number, entry in enumerate(data.get("exception", []), start=1):
        fields = {key: entry.get(key) for key in ("id", "package", "reason")}
        if set(entry) != set(fields) or not all(isinstance(v, str) and v.strip() for v in fields.values()):
            raise AuditError(f"{path}: exception #{number} needs exactly id, package and reason (non-empty)")
        exemptions.append(Exemption(**{key: str(value).strip() for key, value in fields.items()}))
    return exemptions


# --- sources ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    name: str  # osv | pypi | snapshot
    description: str
    pip_audit_args: list[str]


def _fetch_json(request: urllib.request.Request) -> Any:
    # A proxy set for the outside world must not see (or break) the local endpoint.
    local = urllib.parse.urlsplit(request.full_url).hostname == "127.0.0.1"
    opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if local else []))
    with opener.open(request, timeout=PROBE_TIMEOUT_S) as response:
        return json.loads(response.read())


def probe_osv(url: str = OSV_URL) -> str | None:
    """None if ``url`` answers OSV queries with the canary's vulnerabilities, else why not."""
    name, version = CANARY
    query = json.dumps({"package": {"name": name, "ecosystem": "PyPI"}, "version": version}).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=query, headers=headers)  # noqa: S310 - http(s) only
    try:
        answer = _fetch_json(request)
    except (OSError, ValueError) as error:  # URLError, timeouts and bad JSON included
        return f"{url}: {error}"
    if not isinstance(answer, dict) or not answer.get("vulns"):
        return f"{url}: no vulnerabilities reported for {name} {version} (expected some)"
    return None


def probe_pypi(template: str = PYPI_JSON_URL) -> str | None:
    """None if PyPI's JSON API reports the canary's vulnerabilities, else why not."""
    name, version = CANARY
    url = template.format(name=name, version=version)
    try:
        answer = _fetch_json(urllib.request.Request(url))  # noqa: S310 - http(s) only
    except (OSError, ValueError) as error:
        return f"{url}: {error}"
    if not isinstance(answer, dict) or not answer.get("vulnerabilities"):
        return f"{url}: no vulnerabilities reported for {name} {version} (expected some)"
    return None


# The last resort, kept with the code: the packages of uv.lock from the newest copy of the
# database the team's offline machines could reach. Old (its age is printed with every audit),
# but an audit against it says something, where none said nothing at all.
COMMITTED_SNAPSHOT = REPO_ROOT / "deploy" / "audit" / "advisories"


def snapshot_dirs() -> list[Path]:
    """Where a snapshot may be, in order of preference."""
    explicit = os.environ.get("RETAIN_AUDIT_ADVISORIES", "").strip()
    if explicit:  # asked for: that one or none
        return [Path(explicit)]
    return [
        REPO_ROOT.parent / "shared" / "advisories",
        REPO_ROOT / "var" / "audit" / "advisories",
        COMMITTED_SNAPSHOT,
    ]


def snapshot_info(root: Path) -> dict[str, Any]:
    meta = root / "SNAPSHOT.json"
    info: dict[str, Any] = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
    return info


def describe_snapshot(root: Path, today: dt.date | None = None) -> tuple[str, str | None]:
    """A one-line description of the snapshot, and a warning if it is old or undated."""
    info = snapshot_info(root)
    commit, date = str(info.get("commit") or "unknown"), info.get("date")
    repository = info.get("repository", "pypa/advisory-database")
    description = f"snapshot of {repository} at commit {commit[:12]}"
    if not date:
        return f"{description} (undated), {root}", f"{root}/SNAPSHOT.json gives no date: the age is unknown"
    age = ((today or dt.datetime.now(dt.UTC).date()) - dt.date.fromisoformat(str(date)[:10])).days
    warning = None
    if age > STALE_AFTER_DAYS:
        warning = (
            f"the snapshot is {age} days old: advisories published since {str(date)[:10]} are not "
            "checked; refresh it (python -m tests.audit.refresh, see docs/operations.md)"
        )
    return f"{description} of {str(date)[:10]} ({age} days old), {root}", warning


def open_snapshot(stack: ExitStack) -> tuple[Source | None, str]:
    """Start the local OSV endpoint over the first usable snapshot; or None and why not."""
    reasons = []
    for root in snapshot_dirs():
        if not (root / "vulns").is_dir():
            reasons.append(f"{root}: no snapshot")
            continue
        advisories = Advisories(root)
        if not advisories.query(*CANARY):
            reasons.append(f"{root}: does not report {' '.join(CANARY)}; not a usable snapshot")
            continue
        description, warning = describe_snapshot(root)
        if warning:
            say(f"WARNING: {warning}")
        url = stack.enter_context(serve(advisories))
        return Source("snapshot", description, ["-s", "osv", "--osv-url", url]), ""
    return None, "; ".join(reasons)


def choose_source(stack: ExitStack, wanted: str) -> Source:
    if wanted not in SOURCES:
        raise AuditError(f"RETAIN_AUDIT_SOURCE={wanted!r}: expected one of {', '.join(SOURCES)}")
    failures: list[str] = []
    if wanted in ("auto", "osv"):
        why = probe_osv()
        if why is None:
            return Source("osv", f"live OSV API ({OSV_URL})", ["-s", "osv"])
        failures.append(f"live OSV: {why}")
    if wanted in ("auto", "pypi"):
        why = probe_pypi()
        if why is None:
            return Source("pypi", "live PyPI JSON API (vulnerabilities per release)", ["-s", "pypi"])
        failures.append(f"live PyPI: {why}")
    if wanted in ("auto", "snapshot"):
        source, why = open_snapshot(stack)
        if source is not None:
            for failure in failures:
                say(f"not used: {failure}")
            return source
        failures.append(f"snapshot: {why}")
    raise NoSourceError(
        "no source of advisories could be used, so nothing was audited:\n  "
        + "\n  ".join(failures)
        + "\nWith internet, the live services are used. Without it, put a snapshot of the PyPA advisory "
        "database in ../shared/advisories or var/audit/advisories (python -m tests.audit.refresh; see "
        "docs/operations.md), or point RETAIN_AUDIT_ADVISORIES at one."
    )


# --- pip-audit --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Finding:
    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    fix_versions: tuple[str, ...]
    description: str

    @property
    def ids(self) -> set[str]:
        return {self.id, *self.aliases}

    def line(self) -> str:
        fixed = f"fixed in {', '.join(self.fix_versions)}" if self.fix_versions else "no fixed version"
        aliases = f" ({', '.join(self.aliases)})" if self.aliases else ""
        summary = " ".join(self.description.split())
        summary = summary if len(summary) <= 160 else summary[:157] + "..."
        return f"{self.package} {self.version}: {self.id}{aliases}, {fixed} — {summary}"


def run_pip_audit(packages: Sequence[tuple[str, str]], source: Source, workdir: Path) -> list[Finding]:
    requirements = workdir / "requirements.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in packages), encoding="utf-8")
    report = workdir / "report.json"
    command = [
        sys.executable, "-m", "pip_audit",
        "-r", str(requirements), "--no-deps", "--disable-pip", "--strict",
        "--format", "json", "--output", str(report), "--aliases", "on", "--desc", "on",
        "--progress-spinner", "off", "--timeout", "15", "--cache-dir", str(workdir / "cache"),
        *source.pip_audit_args,
    ]  # fmt: skip
    no_proxy = ",".join(filter(None, ["127.0.0.1", os.environ.get("NO_PROXY"), os.environ.get("no_proxy")]))
    environment = {**os.environ, "NO_PROXY": no_proxy, "no_proxy": no_proxy}  # the local endpoint, direct
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    # pip-audit exits 1 both when it found something and when it failed: the report tells which.
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if result.returncode not in (0, 1) or not isinstance(data, dict):
        raise AuditError(f"pip-audit failed (exit {result.returncode}):\n{result.stderr.strip()}")
    findings = []
    dependencies = data.get("dependencies", [])
    skipped = [f"{d.get('name')}: {d['skip_reason']}" for d in dependencies if d.get("skip_reason")]
    if skipped or len(dependencies) != len(packages):
        audited = f"{len(dependencies)} of {len(packages)}"
        raise AuditError(f"pip-audit did not audit every package ({audited}): {skipped}")
    for dependency in dependencies:
        for vuln in dependency.get("vulns", []):
            findings.append(
                Finding(
                    package=str(dependency["name"]),
                    version=str(dependency["version"]),
                    id=str(vuln["id"]),
                    aliases=tuple(str(a) for a in vuln.get("aliases", [])),
                    fix_versions=tuple(str(v) for v in vuln.get("fix_versions", [])),
                    description=str(vuln.get("description") or ""),
                )
            )
    return findings


def judge(
    findings: Sequence[Finding], exemptions: Sequence[Exemption]
) -> tuple[list[Finding], list[tuple[Finding, Exemption]], list[Exemption]]:
    """Split findings into open ones and exempted ones; also the exemptions that matched nothing."""
    open_: list[Finding] = []
    exempted: list[tuple[Finding, Exemption]] = []
    used: set[Exemption] = set()
    for finding in findings:
        match = next((e for e in exemptions if e.covers(finding.package, finding.ids)), None)
        if match is None:
            open_.append(finding)
        else:
            exempted.append((finding, match))
            used.add(match)
    return open_, exempted, [e for e in exemptions if e not in used]


def _lines(items: Iterator[str]) -> str:
    return "".join(f"\n  {item}" for item in items)


def main(argv: Sequence[str] | None = None) -> int:
    """RETAIN_AUDIT_SOURCE and RETAIN_AUDIT_ADVISORIES steer it. ``--skip-unreachable`` (what
    `make lint` passes) turns "no advisories reachable" into a loud skip with its reasons rather
    than a failure, so lint still checks the code on a machine with no internet and no
    snapshot; `make audit` fails then, and a finding fails both."""
    args = sys.argv[1:] if argv is None else list(argv)
    skip_unreachable = "--skip-unreachable" in args
    started = time.monotonic()
    try:
        exemptions = load_exemptions()
        packages, others = locked_packages()
        with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="retain-audit-") as tmp:
            source = choose_source(stack, os.environ.get("RETAIN_AUDIT_SOURCE", "auto").strip() or "auto")
            say(f"{len(packages)} packages pinned in uv.lock; advisories from the {source.description}")
            if others:
                say(f"not from a registry, not audited: {', '.join(others)}")
            findings = run_pip_audit(packages, source, Path(tmp))
    except NoSourceError as error:
        if skip_unreachable:
            say(f"SKIPPED, not audited: {error}")
            return 0
        say(f"FAILED: {error}")
        return 2
    except AuditError as error:
        say(f"FAILED: {error}")
        return 2
    open_, exempted, unused = judge(findings, exemptions)
    for finding, exemption in exempted:
        say(f"exception {exemption.id} ({finding.package} {finding.version}): {exemption.reason}")
    for exemption in unused:
        say(
            f"note: exception {exemption.id} ({exemption.package}) matched nothing in this audit; "
            "remove it from tests/audit/exceptions.toml if it is fixed"
        )
    elapsed = f"{time.monotonic() - started:.1f} s"
    if open_:
        say(
            f"known vulnerabilities in locked packages: {len(open_)} ({elapsed}):"
            f"{_lines(f.line() for f in open_)}\n"
            "Upgrade the package (uv lock --upgrade-package NAME) or, if that cannot be done yet, add an "
            "[[exception]] with the reason to tests/audit/exceptions.toml."
        )
        return 1
    say(f"clean: no known vulnerabilities in {len(packages)} packages ({len(exempted)} excepted, {elapsed})")
    return 0
