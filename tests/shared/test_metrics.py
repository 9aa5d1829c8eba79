"""A worker's metrics listener: what a Prometheus scrape and a liveness probe get; which process
exports which metric."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shared import metrics as metrics_module
from shared.metrics import (
    METRICS_PORT_ENV,
    STALL_AFTER_S,
    WORKER_HEARTBEAT,
    forget_loop,
    heartbeat,
    serve_worker_metrics,
    stalled,
)
from tests.support.infra import free_port


def test_the_worker_listener_serves_metrics_and_health_only(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv(METRICS_PORT_ENV, str(port))
    assert serve_worker_metrics(1) == port
    base = f"http://127.0.0.1:{port}"
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.status_code == 200
    assert "retain_consumer_lag" in metrics.text
    assert httpx.get(f"{base}/healthz").text == "ok\n"
    # prometheus_client's own listener answered these with the metrics page and 200.
    for path in ("/readyz", "/", "/anything"):
        missing = httpx.get(base + path)
        assert missing.status_code == 404
        assert missing.text == "this worker's listener serves /metrics and /healthz\n"
        # Each response's own headers: a shared list once took the first body's Content-Length.
        assert httpx.get(f"{base}/healthz").text == "ok\n"
    # A second listener on the same port is logged and skipped: the worker runs on.
    assert serve_worker_metrics(1) is None


def test_a_worker_whose_loop_stopped_passing_is_not_healthy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener has its own thread, so a worker whose asyncio loop hangs (or retries a
    database that is away) still answered ok; a liveness probe now sees the stall."""
    port = free_port()
    monkeypatch.setenv(METRICS_PORT_ENV, str(port))
    assert serve_worker_metrics(1) == port
    health = f"http://127.0.0.1:{port}/healthz"
    heartbeat("retain-test-loop")
    assert httpx.get(health).status_code == 200
    assert "retain-test-loop" not in stalled()
    monkeypatch.setitem(metrics_module._beats, "retain-test-loop", time.monotonic() - STALL_AFTER_S - 30)
    late = httpx.get(health)
    assert late.status_code == 503
    assert late.text.startswith("stalled: retain-test-loop has not completed a pass for 33")
    heartbeat("retain-test-loop")  # it passes again
    assert httpx.get(health).status_code == 200
    monkeypatch.setitem(metrics_module._beats, "retain-test-loop", time.monotonic() - STALL_AFTER_S - 30)
    forget_loop("retain-test-loop")  # stopped on purpose
    assert httpx.get(health).status_code == 200
    assert WORKER_HEARTBEAT.labels("retain-test-loop")._value.get() == pytest.approx(time.time(), abs=60)


# What each process of a service exports when started as `make run` starts it: an API by its
# create_app, a worker by its main(), stopped where shared.service_main.worker would start its
# metrics listener (its metrics registered; no database or broker needed yet).
_API = """
from prometheus_client import generate_latest
from services.{service}.app import create_app
create_app()
print(generate_latest().decode())
"""
_WORKER = """
import asyncio
from prometheus_client import generate_latest
import services.{module} as entry
import shared.service_main

class Started(Exception):
    pass

def serve_worker_metrics(port):
    raise Started  # the worker's listener would serve now: its metrics are registered

shared.service_main.serve_worker_metrics = serve_worker_metrics
try:
    asyncio.run(entry.main())
except Started:
    print(generate_latest().decode())
"""
REFRESHED = {
    "retain_messenger_held_messages",
    "retain_messenger_held_oldest_age_seconds",
    "retain_messenger_held_overdue_seconds",
    "retain_messenger_unhappy_answers_waiting",
    "retain_messenger_unhappy_answers_oldest_age_seconds",
    "retain_messenger_replies_waiting",
    "retain_messenger_replies_oldest_age_seconds",
}
ONLY_WHERE_UPDATED = {
    # process: (exported there, not exported there)
    "segmenter api": (set(), {"retain_segmenter_publish_job_progress_ratio", "retain_segmenter_swept_total"}),
    "segmenter consumer": (
        {"retain_segmenter_publish_job_progress_ratio", "retain_segmenter_swept_total"},
        set(),
    ),
    "messenger api": (REFRESHED, set()),  # refreshed on its /readyz
    "messenger consumer": (set(), REFRESHED),
    "messenger sender": (REFRESHED, set()),
    "kpi api": (
        {"retain_kpi_clv_customers", "retain_kpi_clv_fit_seconds"},
        {"retain_kpi_clv_predictions_published_total"},
    ),
    "kpi consumer": (
        {"retain_kpi_clv_predictions_published_total", "retain_kpi_clv_fit_seconds"},
        {"retain_kpi_clv_customers"},
    ),
}


@pytest.mark.parametrize("process", sorted(ONLY_WHERE_UPDATED))
def test_a_metric_only_some_processes_update_is_exported_by_those_only(process: str, tmp_path: Path) -> None:
    """Every process of a service imports its metrics; one that never updates a metric would
    export it frozen at 0, which a min(), an avg() or an alert per target reads as real: a rule
    publish's progress stuck at 0 on the segmenter's API, no messages held on the consumer."""
    service, kind = process.split()
    script = _API.format(service=service) if kind == "api" else _WORKER.format(module=f"{service}.{kind}")
    env = {**os.environ, "RETAIN_VAR_DIR": str(tmp_path), "RETAIN_LOG_LEVEL": "WARNING"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    families = {line.split(" ")[2] for line in out.stdout.splitlines() if line.startswith("# TYPE ")}
    exported, not_exported = ONLY_WHERE_UPDATED[process]
    assert exported <= families, (process, exported - families)
    assert not (not_exported & families), (process, not_exported & families)
    # And it is the service's process, with the metrics every process of it exports.
    assert any(f.startswith(f"retain_{service}_") for f in families), families
