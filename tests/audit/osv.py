"""A local stand-in for OSV's ``POST /v1/query``, answering from a snapshot of the PyPA advisory database.

The snapshot is a directory laid out like https://github.com/pypa/advisory-database: ``vulns/<package>/
<ID>.yaml``, one OSV record per file (YAML encoding of the OSV schema), plus the ``SNAPSHOT.json`` that
``tests.audit.refresh`` writes (which commit, which date). pip-audit talks to it with
``--vulnerability-service osv --osv-url http://127.0.0.1:<port>/v1/query``; it sends one query per
package, ``{"package": {"name", "ecosystem": "PyPI"}, "version"}``, and reads ``{"vulns": [...]}``
(``{}`` when there are none), as from api.osv.dev.

Which versions a record affects follows the OSV schema (https://ossf.github.io/osv-schema/): a version
is affected when it is in an ``affected[].versions`` list, or inside an ``ECOSYSTEM`` range — events
sorted by version, ``introduced`` (``"0"`` = from the start) opens it, ``fixed`` closes it at that
version, ``last_affected`` closes it after that version. PEP 440 ordering (``packaging``) is PyPI's
ecosystem order. ``GIT`` ranges name commits, not releases, and are skipped (PyPA records give an
ECOSYSTEM range or a versions list beside them). A bound that is not a PEP 440 version (a handful in
the database, e.g. ``2.6.0-NA``) cannot be compared, so it is read the cautious way: an unreadable
``introduced`` opens the range from the start, an unreadable ``fixed``/``last_affected`` does not
close it. Withdrawn records are not served.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints; types-PyYAML is not a dependency
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

Record = dict[str, Any]

# Every scalar as a string, as in OSV's JSON: an unquoted `2.10` stays "2.10", not the float 2.1.
_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


_ZERO = Version("0")


def _parse(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def in_events(version: Version, events: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``version`` lies inside one ECOSYSTEM range given by its ``events``."""
    steps: list[tuple[Version | None, int, str]] = []  # (bound or None for "0", tie order, kind)
    for event in events:
        if "introduced" in event:
            text = str(event["introduced"])
            steps.append((None if text == "0" else _parse(text), 0, "introduced"))  # unreadable → "0"
        for kind in ("fixed", "last_affected"):
            if kind in event and (bound := _parse(str(event[kind]))) is not None:  # unreadable → no end
                steps.append((bound, 1, kind))
    # The schema's algorithm: walk the events in version order (an introduced event before an end
    # of the same version); the last one at or below `version` decides.
    steps.sort(key=lambda step: (step[0] is not None, step[0] or _ZERO, step[1]))
    affected = False
    for bound, _, kind in steps:
        if kind == "introduced":
            affected = affected or bound is None or version >= bound
        elif bound is not None and (version >= bound if kind == "fixed" else version > bound):
            affected = False
    return affected


def affects(record: Mapping[str, Any], name: str, version: str) -> bool:
    """Whether an OSV record affects PyPI package ``name`` (any spelling) at ``version``."""
    wanted = canonicalize_name(name)
    parsed = _parse(version)
    for entry in record.get("affected") or ():
        package = entry.get("package") or {}
        if package.get("ecosystem") != "PyPI" or canonicalize_name(str(package.get("name", ""))) != wanted:
            continue
        for listed in entry.get("versions") or ():
            listed_version = _parse(str(listed))
            if str(listed) == version or (parsed is not None and listed_version == parsed):
                return True
        if parsed is None:
            continue
        for range_ in entry.get("ranges") or ():
            if range_.get("type") not in ("ECOSYSTEM", "SEMVER"):
                continue
            if in_events(parsed, range_.get("events") or ()):
                return True
    return False


class Advisories:
    """The records of a snapshot directory, read per package on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        vulns = root / "vulns"
        if not vulns.is_dir():
            raise FileNotFoundError(f"{root} has no vulns/ directory: not an advisory snapshot")
        self._dirs: dict[str, list[Path]] = {}
        for directory in sorted(p for p in vulns.iterdir() if p.is_dir()):
            self._dirs.setdefault(canonicalize_name(directory.name), []).append(directory)
        self._records: dict[str, list[Record]] = {}
        self._lock = threading.Lock()

    @property
    def packages(self) -> int:
        return len(self._dirs)

    def records(self, name: str) -> list[Record]:
        key = canonicalize_name(name)
        with self._lock:
            if key not in self._records:
                loaded: list[Record] = []
                for directory in self._dirs.get(key, []):
                    for path in sorted(directory.glob("*.yaml")):
                        text = path.read_text(encoding="utf-8")
                        record = yaml.load(text, Loader=_LOADER)  # noqa: S506 - builds only str/list/dict
                        if isinstance(record, dict) and "id" in record:
                            loaded.append(record)
                self._records[key] = loaded
            return self._records[key]

    def query(self, name: str, version: str) -> list[Record]:
        """The records affecting ``name`` at ``version``, as OSV would return them."""
        key = canonicalize_name(name)
        found = []
        for record in self.records(key):
            if record.get("withdrawn") or not affects(record, key, version):
                continue
            served = copy.deepcopy(record)
            # pip-audit reads fix versions only from an `affected` entry whose name equals the
            # canonical name; the database sometimes spells it as on the project page.
            for entry in served.get("affected") or ():
                package = entry.get("package") or {}
                if canonicalize_name(str(package.get("name", ""))) == key:
                    package["name"] = key
            found.append(served)
        return found


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/query":
            self._send(HTTPStatus.NOT_FOUND, {"code": 5, "message": "only POST /v1/query is served"})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            package = body["package"]
            name, ecosystem, version = str(package["name"]), package.get("ecosystem"), body["version"]
        except (ValueError, KeyError, TypeError):
            self._send(
                HTTPStatus.BAD_REQUEST,
                {"code": 3, "message": "expected {package: {name, ecosystem}, version}"},
            )
            return
        vulns = self.server.advisories.query(name, str(version)) if ecosystem == "PyPI" else []
        self._send(HTTPStatus.OK, {"vulns": vulns} if vulns else {})

    def _send(self, status: HTTPStatus, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pip-audit's report is the output."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, advisories: Advisories) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.advisories = advisories


@contextlib.contextmanager
def serve(advisories: Advisories) -> Iterator[str]:
    """Serve ``advisories`` on 127.0.0.1 (a free port) while the block runs; yields the query URL."""
    server = _Server(advisories)
    thread = threading.Thread(target=server.serve_forever, name="osv-snapshot", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/query"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
