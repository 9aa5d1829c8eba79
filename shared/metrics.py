"""Prometheus metrics shared by every service. Labels stay bounded: no ids, no raw errors.

The HTTP apps serve these on their own ``/metrics``. Consumer and sender processes have no HTTP
app, so ``serve_worker_metrics`` gives each its own small metrics listener (ports in
deploy/prometheus/prometheus.yml).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from shared.logs import get_logger

log = get_logger(__name__)

HTTP_REQUESTS = Counter(
    "retain_http_requests_total",
    "HTTP requests by route and status.",
    ["service", "route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "retain_http_request_duration_seconds",
    "HTTP request latency by route.",
    ["service", "route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_BATCH_SIZE = Histogram(
    "retain_consumer_batch_size",
    "Records per consumed batch.",
    ["group"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2000),
)
CONSUMER_BATCH_SECONDS = Histogram(
    "retain_consumer_batch_seconds",
    "Time to decode, apply and commit one batch.",
    ["group"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONSUMER_RECORDS = Counter(
    "retain_consumer_records_total", "Records consumed, by outcome.", ["group", "topic", "outcome"]
)
CONSUMER_DUPLICATES = Counter(
    "retain_consumer_duplicates_total", "Records skipped because already applied.", ["group"]
)
CONSUMER_RETRIES = Counter(
    "retain_consumer_retries_total",
    "Batches (and offset commits) retried after a transient error.",
    ["group", "error"],
)
DLQ_MESSAGES = Counter(
    "retain_dlq_messages_total", "Records sent to a dead-letter topic.", ["topic", "reason"]
)
CONSUMER_LAG = Gauge(
    "retain_consumer_lag",
    "Records between the group's position and the partition's end (last stable offset), as of "
    "this consumer's latest fetch; only for the partitions this process holds.",
    ["group", "topic", "partition"],
)

CONSUMER_MISKEYED = Counter(
    "retain_consumer_miskeyed_total",
    "Records consumed (applied, or skipped as duplicates) whose Kafka key is not their customer id "
    "(a producer writing straight to Kafka with another key, or none): that customer's events may "
    "land on several partitions.",
    ["group", "topic"],
)

CONSUMER_BROKER_CONTACT = Gauge(
    "retain_consumer_broker_contact_timestamp_seconds",
    "When the broker last answered this consumer's metadata request, made every 15 s apart from "
    "the loop's passes (Unix seconds): it stands still while the broker is away or unreachable; "
    "until the broker first answers, the time the loop started.",
    ["group"],
)

WORKER_HEARTBEAT = Gauge(
    "retain_worker_heartbeat_timestamp_seconds",
    "When this worker's loop last completed a pass (Unix seconds): a consumer's batch applied or "
    "idle poll, and its work between batches (which beats while it runs, for up to 30 minutes); "
    "the sender's send pass. It stands still while the loop hangs or retries a database that is "
    "away.",
    ["loop"],
)

# A worker whose loop has not completed a pass for this long is stalled: its /healthz fails.
# Kafka's own limit on the time between two polls (max.poll.interval.ms) is the same 5 minutes.
STALL_AFTER_S = 300.0
_beats: dict[str, float] = {}  # loop → time.monotonic() of its latest pass


def heartbeat(loop: str) -> None:
    """A pass of ``loop`` completed (see ``WORKER_HEARTBEAT``)."""
    WORKER_HEARTBEAT.labels(loop).set_to_current_time()
    _beats[loop] = time.monotonic()


def stalled(now: float | None = None) -> dict[str, float]:
    """The loops of this process with no pass for ``STALL_AFTER_S``, and for how long."""
    now = time.monotonic() if now is None else now
    return {loop: now - at for loop, at in list(_beats.items()) if now - at > STALL_AFTER_S}


def forget_loop(loop: str) -> None:
    """A loop that stopped on purpose is not stalled."""
    _beats.pop(loop, None)


_EXPOSED: set[int] = set()  # ids of the collectors ``expose`` registered


def expose(collectors: Iterable[Collector]) -> None:
    """Register with this process's /metrics the metrics that only some processes of a service
    update (made with ``registry=None``). Every process of the service imports them; registered
    at import, the others would export copies frozen at 0, which a min(), an avg() or an alert
    per target counts as real (a publish job's progress stuck at 0 on the API). Idempotent (a
    second app in one process, a test); another collector of the same name is still an error."""
    for collector in collectors:
        if id(collector) not in _EXPOSED:
            REGISTRY.register(collector)
            _EXPOSED.add(id(collector))


METRICS_PORT_ENV = "RETAIN_METRICS_PORT"
METRICS_HOST_ENV = "RETAIN_METRICS_HOST"


_METRICS = make_wsgi_app()


def _text() -> list[tuple[str, str]]:
    # A new list for each response: wsgiref adds Content-Length to the one it is given.
    return [("Content-Type", "text/plain; charset=utf-8")]


def worker_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """/metrics, and /healthz (the process is alive and its loops are not stalled); 404 for
    anything else.
    prometheus_client's own listener answers every path with the metrics and 200, so a probe
    of a worker's /readyz passed whatever the worker's state."""
    path = environ.get("PATH_INFO", "")
    if path == "/metrics":
        return _METRICS(environ, start_response)  # type: ignore[no-any-return]
    if path == "/healthz":
        late = stalled()
        if late:
            # A hung loop still answers here (this listener has its own thread): say so, and a
            # liveness probe restarts the worker.
            start_response("503 Service Unavailable", _text())
            return [
                "".join(
                    f"stalled: {loop} has not completed a pass for {s:.0f} s\n" for loop, s in late.items()
                ).encode()
            ]
        start_response("200 OK", _text())
        return [b"ok\n"]
    start_response("404 Not Found", _text())
    return [b"this worker's listener serves /metrics and /healthz\n"]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Every scrape would be a line on stderr."""


def _server_class(host: str) -> type[ThreadingWSGIServer]:
    """IPv6 for an IPv6 bind address (``::``), as prometheus_client's own listener chose."""
    if ":" not in host:
        return ThreadingWSGIServer

    class _Server6(ThreadingWSGIServer):
        address_family = socket.AF_INET6

    return _Server6


def serve_worker_metrics(default_port: int) -> int | None:
    """Serve this worker process's /metrics in a background thread.

    Port: ``RETAIN_METRICS_PORT`` when set (``0`` turns the listener off), else ``default_port``;
    host: ``RETAIN_METRICS_HOST`` (default 127.0.0.1, as the APIs under ``make run``). A port that
    is taken (a second replica on one host) is logged and the worker runs on without metrics:
    losing a scrape target must never stop the pipeline. Returns the port served, if any.
    """
    raw = os.environ.get(METRICS_PORT_ENV, "").strip()
    port = int(raw) if raw else default_port
    if port == 0:
        return None
    host = os.environ.get(METRICS_HOST_ENV, "").strip() or "127.0.0.1"
    try:
        server = make_server(host, port, worker_app, _server_class(host), handler_class=_Quiet)
    except OSError as exc:
        log.warning(
            "metrics listener not started; set RETAIN_METRICS_PORT to a free port",
            host=host,
            port=port,
            error=type(exc).__name__,
        )
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics listener", url=f"http://{host}:{port}/metrics")
    return port
