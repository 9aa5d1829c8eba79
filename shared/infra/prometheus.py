"""Prometheus from Debian's package, run as a local process with the repository's config.

``make ops`` runs it in the foreground against ``make run``'s services; the observability
tests start one on a free port, point its targets at their own services and query it.

Layout under ``root``::

    root/prometheus.yml  the repository's config as run: rule files made absolute, targets and
                         intervals rewritten when asked
    root/data            the TSDB (kept between runs)
    root/prometheus.log  the server's log

CLI::

    python -m shared.infra.prometheus run [--root var/prometheus] [--port 9090]

starts it, prints the URL, and stops it cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import httpx
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints; only safe_load/safe_dump

from shared.config import REPO_ROOT

__all__ = ["DEFAULT_CONFIG", "LocalPrometheus", "PrometheusError", "find_prometheus"]

DEFAULT_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DEFAULT_PORT = 9090
HOST = "127.0.0.1"
_INSTALL_HINT = "prometheus not found on PATH: install Debian's package with `apt-get install -y prometheus`."


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered a query with an error."""


def find_prometheus() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )
    if found is None:
        raise PrometheusError(_INSTALL_HINT)
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((HOST, port)) == 0


def render_config(
    config: Path,
    *,
    ports: Mapping[int, int] | None = None,
    scrape_interval: str | None = None,
    evaluation_interval: str | None = None,
) -> dict[str, Any]:
    """The config as it will run: rule files resolved against the config's own directory (the
    rendered copy lives elsewhere), every target whose port is in ``ports`` moved to the new
    port, and the global intervals replaced when given."""
    loaded: dict[str, Any] = yaml.safe_load(config.read_text(encoding="utf-8"))
    base = config.resolve().parent
    loaded["rule_files"] = [str(base / pattern) for pattern in loaded.get("rule_files", [])]
    glob = loaded.setdefault("global", {})
    if scrape_interval is not None:
        glob["scrape_interval"] = scrape_interval
        # A scrape may not outlast the interval; Prometheus refuses the config otherwise.
        glob["scrape_timeout"] = scrape_interval
        for job in loaded.get("scrape_configs", []):
            job.pop("scrape_interval", None)
            job.pop("scrape_timeout", None)
    if evaluation_interval is not None:
        glob["evaluation_interval"] = evaluation_interval
    for job in loaded.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            static["targets"] = [_moved(t, ports or {}) for t in static.get("targets", [])]
    return loaded


def _moved(target: str, ports: Mapping[int, int]) -> str:
    host, _, port = target.rpartition(":")
    if port.isdigit() and int(port) in ports:
        return f"{host}:{ports[int(port)]}"
    return target


class LocalPrometheus:
    """One Prometheus server on 127.0.0.1, owned by this object (``with`` or start/stop)."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        *,
        config: Path = DEFAULT_CONFIG,
        ports: Mapping[int, int] | None = None,
        scrape_interval: str | None = None,
        evaluation_interval: str | None = None,
        retention: str = "15d",
    ) -> None:
        self.root = Path(root)
        self.port = port if port is not None else _free_port()
        self.config = Path(config)
        self._ports = dict(ports or {})
        self._scrape_interval = scrape_interval
        self._evaluation_interval = evaluation_interval
        self._retention = retention
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=self.url, timeout=10.0)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "prometheus.yml"

    @property
    def log_path(self) -> Path:
        return self.root / "prometheus.log"

    def start(self, timeout: float = 30.0) -> str:
        """Write the config, start the server and wait until it is ready; return its URL."""
        if self._proc is not None:
            return self.url
        binary = find_prometheus()
        self.root.mkdir(parents=True, exist_ok=True)
        rendered = render_config(
            self.config,
            ports=self._ports,
            scrape_interval=self._scrape_interval,
            evaluation_interval=self._evaluation_interval,
        )
        self.config_path.write_text(yaml.safe_dump(rendered, sort_keys=False), encoding="utf-8")
        argv = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--storage.tsdb.retention.time={self._retention}",
            f"--web.listen-address={HOST}:{self.port}",
            "--web.enable-lifecycle",
        ]
        with self.log_path.open("ab") as log:
            # Its own session: a Ctrl-C in the terminal reaches only us, and we stop it in order.
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise PrometheusError(f"prometheus exited with {code}; log tail:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if self._http.get("/-/ready").status_code == 200:
                    return self.url
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Prometheus then flushes the head block and exits), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._http.close()

    def __enter__(self) -> LocalPrometheus:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- the HTTP API ----------------------------------------------------------------------------

    def _api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        if self._http.is_closed:
            self._http = httpx.Client(base_url=self.url, timeout=10.0)
        response = self._http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query now; the result's series (``metric`` labels and ``value``)."""
        data = self._api("query", {"query": promql})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their labels, ``health`` and ``lastError``."""
        active: list[dict[str, Any]] = self._api("targets", {"state": "active"})["activeTargets"]
        return active

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._api("rules")["groups"]
        return groups

    def reload(self) -> None:
        """Re-read the rendered config and the rule files (the lifecycle API)."""
        self._http.post("/-/reload").raise_for_status()

    def wait_until_targets_up(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return targets
            if time.monotonic() > deadline:
                down = {
                    t["scrapeUrl"]: t.get("lastError") or t["health"] for t in targets if t["health"] != "up"
                }
                raise PrometheusError(f"targets not up after {timeout:.0f}s: {down}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------ CLI


def _run_foreground(root: Path, port: int, config: Path) -> int:
    if port and _port_taken(port):
        free = _free_port()
        sys.stderr.write(f"port {port} is taken (a system prometheus?); using {free} instead\n")
        port = free
    prometheus = LocalPrometheus(root, port or None, config=config)
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    url = prometheus.start()
    sys.stdout.write(
        f"Prometheus {url}  (targets {url}/targets, alerts {url}/alerts)\n"
        f"  config {prometheus.config_path}, data {root / 'data'}, log {prometheus.log_path}\n"
        "Ctrl-C stops it.\n"
    )
    sys.stdout.flush()
    while not stop_requested.wait(1.0):
        if not prometheus.is_running():
            sys.stderr.write(f"prometheus exited unexpectedly; log tail:\n{prometheus.log_tail()}\n")
            return 1
    prometheus.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.infra.prometheus")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run Prometheus in the foreground against `make run`'s services")
    run.add_argument("--root", type=Path, default=REPO_ROOT / "var" / "prometheus")
    run.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="default 9090 (a free one if taken); 0: any free port"
    )
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    try:
        return _run_foreground(args.root, args.port, args.config)
    except PrometheusError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
