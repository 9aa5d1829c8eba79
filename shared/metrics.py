"""Prometheus metrics shared by every service. Labels stay bounded: no ids, no raw errors."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
    "retain_consumer_retries_total", "Batches retried after a transient error.", ["group", "error"]
)
DLQ_MESSAGES = Counter(
    "retain_dlq_messages_total", "Records sent to a dead-letter topic.", ["topic", "reason"]
)
