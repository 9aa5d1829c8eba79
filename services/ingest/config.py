from __future__ import annotations

from pydantic import Field

from shared.config import CommonSettings


class IngestSettings(CommonSettings):
    ingest_max_batch: int = Field(default=1000, ge=1, description="Most events in one request.")
    ingest_max_body_bytes: int = Field(default=1024 * 1024, ge=1024, description="Largest request body.")
    ingest_dedupe_ttl_s: float = Field(
        default=24 * 3600, ge=0, description="How long an accepted event id is answered as a duplicate."
    )
    ingest_dedupe_max_ids: int = Field(
        default=2_000_000, ge=0, description="Most event ids the dedupe window holds (oldest go first)."
    )
    ingest_ack_timeout_s: float = Field(
        default=10.0, gt=0, description="How long to wait for the broker before answering 503."
    )
    ingest_rate_limit_per_s: float = Field(
        default=500.0, ge=0, description="Requests per second per API key (0 = unlimited)."
    )
    ingest_rate_limit_burst: float = Field(
        default=1000.0, ge=1, description="Burst size of the per-key limit."
    )
    ingest_retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with a 503.")
