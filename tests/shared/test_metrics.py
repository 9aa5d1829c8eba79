"""A worker's metrics listener: what a Prometheus scrape and a liveness probe get."""

from __future__ import annotations

import httpx
import pytest

from shared.metrics import METRICS_PORT_ENV, serve_worker_metrics
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
