"""``python -m tests.audit.refresh``: make (or renew) the advisory snapshot that ``make audit`` falls back to.

The snapshot is a copy of the PyPA advisory database (https://github.com/pypa/advisory-database, the
data behind PyPI's vulnerability reports; CC-BY-4.0): its ``vulns/`` and ``LICENSE``, plus
``SNAPSHOT.json`` (repository, commit, commit date, when it was taken) and a README. Without
``--from`` it clones the repository (needs internet); ``--from`` takes a checkout or a bare git
directory of it instead. ``--only-locked`` keeps only the packages in ``uv.lock`` (a few hundred
files instead of about seven thousand; a package added to the lock later is then not covered).

    python -m tests.audit.refresh                        # → var/audit/advisories
    python -m tests.audit.refresh --out ../shared/advisories --from /path/to/advisory-database
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from packaging.utils import canonicalize_name

from tests.audit.audit import REPO_ROOT, locked_packages

UPSTREAM = "https://github.com/pypa/advisory-database"
DEFAULT_OUT = REPO_ROOT / "var" / "audit" / "advisories"


def _git(git_args: Sequence[str]) -> str:
    return subprocess.run(["git", *git_args], capture_output=True, text=True, check=True).stdout.strip()


def export(source: Path, into: Path) -> tuple[str, str]:
    """Copy ``vulns/`` and ``LICENSE`` of the checkout or bare repository ``source`` into ``into``.

    Returns the commit and its ISO date (``unknown`` for a plain directory without git).
    """
    if (source / "vulns").is_dir():  # a work tree (or an unpacked archive)
        shutil.copytree(source / "vulns", into / "vulns")
        shutil.copy2(source / "LICENSE", into / "LICENSE")
        try:
            commit, date = _git(["-C", str(source), "log", "-1", "--format=%H%n%cI"]).splitlines()
        except (subprocess.CalledProcessError, ValueError):
            commit, date = "unknown", ""
        return commit, date
    git_dir = ["--git-dir", str(source)]
    commit, date = _git([*git_dir, "log", "-1", "--format=%H%n%cI", "HEAD"]).splitlines()
    archive = subprocess.run(
        ["git", *git_dir, "archive", "--format=tar", commit, "vulns", "LICENSE"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return commit, date


def select_locked(vulns: Path, lock: Path) -> None:
    """Remove every package directory that is not in ``lock``."""
    keep = {canonicalize_name(name) for name, _ in locked_packages(lock)[0]}
    for directory in list(vulns.iterdir()):
        if directory.is_dir() and canonicalize_name(directory.name) not in keep:
            shutil.rmtree(directory)


def write_readme(out: Path, info: dict[str, object]) -> None:
    note = f"\n{info['note']}\n" if info.get("note") else ""
    (out / "README.md").write_text(
        f"""# PyPA advisory database snapshot

A copy of `vulns/` of {info["repository"]} (the PyPA advisory database: OSV records, YAML) at
commit {info["commit"]} of {info["date"]}, taken {info["taken"]}: {info["records"]} records for
{info["packages"]} packages ({info["selection"]}). Licensed CC-BY-4.0 (`LICENSE`), © the PyPA
advisory database contributors.
{note}
Retain's `make audit` (part of `make lint`) serves it to pip-audit on 127.0.0.1 when the live
vulnerability services cannot be reached. Renew it with `python -m tests.audit.refresh` (see
Retain's docs/operations.md, "Dependency audit").
""",
        encoding="utf-8",
    )


def refresh(
    source: Path | None, out: Path, *, repository: str, note: str = "", only_locked: bool
) -> dict[str, object]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".advisories-", dir=out.parent) as tmp:
        staging = Path(tmp) / "snapshot"
        staging.mkdir()
        if source is None:
            clone = Path(tmp) / "clone"
            _git(["clone", "--quiet", "--depth", "1", UPSTREAM, str(clone)])
            source = clone
        commit, date = export(source, staging)
        if only_locked:
            select_locked(staging / "vulns", REPO_ROOT / "uv.lock")
        records = sum(1 for _ in (staging / "vulns").glob("*/*.yaml"))
        info: dict[str, object] = {
            "repository": repository,
            **({"note": note} if note else {}),
            "commit": commit,
            "date": date,
            "taken": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "records": records,
            "packages": sum(1 for p in (staging / "vulns").iterdir() if p.is_dir()),
            "selection": "the packages in Retain's uv.lock" if only_locked else "the whole database",
        }
        (staging / "SNAPSHOT.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        write_readme(staging, info)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.audit.refresh", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--from", dest="source", type=Path, help=f"checkout or bare git dir (default: clone {UPSTREAM})"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"where to put it (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--repository", default="pypa/advisory-database", help="the source's name, for the record"
    )
    parser.add_argument("--note", default="", help="one line on where the copy came from, for the record")
    parser.add_argument("--only-locked", action="store_true", help="keep only the packages in uv.lock")
    args = parser.parse_args(argv)
    info = refresh(
        args.source, args.out, repository=args.repository, note=args.note, only_locked=args.only_locked
    )
    sys.stdout.write(f"{args.out}: {json.dumps(info)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
