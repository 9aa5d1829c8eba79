"""The segmenter's tables (SQLAlchemy Core). Migrations in ``migrations/`` create them."""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text

from shared.db import UtcDateTime, applied_events_table, json_type
from shared.outbox import outbox_table

metadata = MetaData()

applied_events = applied_events_table(metadata)
outbox = outbox_table(metadata)

customers = Table(
    "customers",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("state", json_type(), nullable=False),  # profile.dump_state: the facts as merged
    Column("facts", json_type(), nullable=False),  # profile.facts as of updated_at, for rules
    Column("tier", String(64), nullable=False),
    Column("segments", json_type(), nullable=False),
    Column("lifecycle_stage", String(32), nullable=False),
    Column("rule_version", Integer, nullable=False),
    # When time alone next changes something about this customer; the sweep's index.
    Column("next_check_at", UtcDateTime(), nullable=True),
    # The instant tier, segments and facts are evaluated as of (``updates.decide``): for
    # events ``updates.as_of_events``, now for the sweep and a publish.
    Column("updated_at", UtcDateTime(), nullable=False),
    Index("ix_customers_next_check_at", "next_check_at"),
    Index("ix_customers_tier", "tier"),
)

memberships = Table(
    "memberships",
    metadata,
    Column("segment", String(64), primary_key=True),
    Column("customer_id", String(128), primary_key=True),
    Column("entered_at", UtcDateTime(), nullable=False),
)

rule_versions = Table(
    "rule_versions",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("rules", json_type(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("note", Text, nullable=True),
)

rule_draft = Table(
    "rule_draft",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: one draft
    Column("rules", json_type(), nullable=False),
    Column("etag", String(64), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(64), nullable=False),
)

rule_audit = Table(
    "rule_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime(), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("version", Integer, nullable=True),
    Column("diff", json_type(), nullable=False),
)

publish_jobs = Table(
    "publish_jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # pending, running, done, superseded
    Column("total", Integer, nullable=False),
    Column("done", Integer, nullable=False),
    Column("changed", Integer, nullable=False),
    Column("cursor", String(128), nullable=True),  # last customer id re-evaluated
    Column("created_at", UtcDateTime(), nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("started_at", UtcDateTime(), nullable=True),
    Column("finished_at", UtcDateTime(), nullable=True),
    Index("ix_publish_jobs_status", "status"),
)
