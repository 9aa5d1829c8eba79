"""Stoplight Prism (npm, pinned in deploy/prism/) as a spec-validating mock of Twilio and SendGrid.

Prism runs with ``--errors``: a request that breaks the provider's official OpenAPI spec gets an
error response (422 for a bad body or path, 401 without credentials) instead of an example, so
the real ``twilio`` / ``sendgrid`` clients raise and the test fails. The specs live beside the
repository, in ``../shared/specs/`` (CI puts a copy of shared/ beside the clone the same way).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.config import REPO_ROOT
from tests.support.infra import TEST_VAR, free_port

PRISM_DIR = REPO_ROOT / "deploy" / "prism"
PRISM_BIN = PRISM_DIR / "node_modules" / ".bin" / "prism"
SPECS_DIR = REPO_ROOT.parent / "shared" / "specs"
TWILIO_SPEC = SPECS_DIR / "twilio_api_v2010.json"
SENDGRID_SPEC = SPECS_DIR / "sendgrid_v3.json"
STARTUP_TIMEOUT_S = 120.0


@dataclass
class PrismServer:
    url: str
    spec: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def ensure_prism() -> Path:
    """The prism binary, installed from deploy/prism's lock file when node_modules is missing."""
    if not PRISM_BIN.exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PRISM_DIR,
            check=True,
            timeout=600,
        )
    return PRISM_BIN


def twilio_spec_for_mock(directory: Path) -> Path:
    """Twilio's spec with one fix: the paging fields of list responses (``uri``,
    ``first_page_uri``, ``next_page_uri``, ``previous_page_uri``) hold relative references
    ("/2010-04-01/Accounts/..."), in Twilio's own examples and in real responses, but are
    declared ``format: uri`` (absolute). Prism, validating responses under ``--errors``, turns
    its own example into a 500; ``uri-reference`` is what they are. Requests are untouched."""
    spec = json.loads(TWILIO_SPEC.read_text())
    _relax_paging_uris(spec)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "twilio_api_v2010_for_mock.json"
    out.write_text(json.dumps(spec))
    return out


def _relax_paging_uris(node: object) -> None:
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            for key in ("uri", "first_page_uri", "next_page_uri", "previous_page_uri"):
                field = props.get(key)
                if isinstance(field, dict) and field.get("format") == "uri":
                    field["format"] = "uri-reference"
        for value in node.values():
            _relax_paging_uris(value)
    elif isinstance(node, list):
        for value in node:
            _relax_paging_uris(value)


def sendgrid_spec_with_v3(directory: Path) -> Path:
    """SendGrid's spec keeps /v3 in its server URL; the client puts it in the path. Prism routes
    on paths alone, so serve a copy whose paths carry the prefix."""
    spec = json.loads(SENDGRID_SPEC.read_text())
    spec["paths"] = {f"/v3{path}": item for path, item in spec["paths"].items()}
    spec["servers"] = [{"url": "http://api.sendgrid.com"}]
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "sendgrid_v3_prefixed.json"
    out.write_text(json.dumps(spec))
    return out


@contextmanager
def prism_mock(spec: Path, name: str) -> Iterator[PrismServer]:
    """Run ``prism mock --errors spec`` on a free port until the block ends."""
    prism = ensure_prism()
    port = free_port()
    TEST_VAR.mkdir(parents=True, exist_ok=True)
    log_path = TEST_VAR / f"prism-{name}-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(prism), "mock", "-h", "127.0.0.1", "-p", str(port), "--errors", str(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=PRISM_DIR,
            start_new_session=True,  # its own process group: node and its children stop together
        )
    server = PrismServer(f"http://127.0.0.1:{port}", spec, log_path, process)
    try:
        _wait_listening(server)
        yield server
    finally:
        _stop(process)


def _wait_listening(server: PrismServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"prism exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        if "Prism is listening" in server.log():
            return
        time.sleep(0.1)
    raise TimeoutError(f"prism did not start within {STARTUP_TIMEOUT_S}s:\n{server.log()[-4000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
