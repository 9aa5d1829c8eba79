"""Settings every service shares. Each service's own settings extend ``CommonSettings``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETAIN_", extra="ignore")

    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma separated."
    )
    topic_prefix: str = Field(default="retain.", description="Prefix of every topic name.")
    partitions: int = Field(
        default=6, ge=1, le=1000, description="Partition count of every topic (same for all)."
    )
    var_dir: Path = Field(
        default=REPO_ROOT / "var", description="Where SQLite files, keys and the broker live."
    )
    api_keys_file: Path | None = Field(
        default=None, description="JSON file of hashed API keys; default <var_dir>/api_keys.json."
    )
    consumer_session_timeout_ms: int = Field(
        default=10000,
        ge=1000,
        description="How long the group waits for a silent consumer before giving its partitions away.",
    )
    http_max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body of the segmenter, messenger and kpi APIs (ingest: its own).",
    )
    log_level: str = Field(default="INFO", description="Log level of every process.")
    log_json: bool = Field(default=False, description="Log as JSON lines instead of console.")

    @property
    def keys_path(self) -> Path:
        return self.api_keys_file or self.var_dir / "api_keys.json"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def sqlite_url(self, service: str) -> str:
        return f"sqlite+aiosqlite:///{self.var_dir / f'{service}.db'}"
