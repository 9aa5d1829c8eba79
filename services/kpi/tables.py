"""The kpi service's tables (SQLAlchemy Core). Migrations in ``migrations/`` create them.

Three kinds: *facts* as the events stated them (one row per order, ticket step, cancellation,
message status, survey answer), written by the consumer; *derived rows* recomputed from all of an entity's
facts (``customers`` in the batch, ``tickets`` by the periodic rollup: see ``stale_tickets``);
and the *Grafana tables* (``kpi_*_daily`` / ``kpi_churn_monthly``), recomputed by the
consumer's tick from the facts with the same pure functions as the API. Every KPI can be
recomputed from the facts alone.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    Float,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
)

from shared.db import UtcDateTime, applied_events_table, json_type
from shared.outbox import outbox_table

metadata = MetaData()

applied_events = applied_events_table(metadata)
outbox = outbox_table(metadata)

Money = Numeric(18, 4)

# --- facts ---------------------------------------------------------------------------------------

purchases = Table(
    "purchases",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("order_id", String(128), primary_key=True),
    # As in the segmenter: the order's date is that of its first event; its amount and currency
    # are those of its newest (amount_at, then event id), whose id is event_id.
    Column("event_id", String(128), nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("amount_at", UtcDateTime(), nullable=False),
    Column("amount", Money, nullable=False),
    Column("currency", String(3), nullable=False),
    # A customer's orders come by the primary key; no second (customer_id, …) index to keep up.
    Index("ix_purchases_occurred_at", "occurred_at"),
)

support_events = Table(
    "support_events",
    metadata,
    Column("event_id", String(128), primary_key=True),
    Column("ticket_id", String(128), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("action", String(32), nullable=False),
    Column("category", String(64), nullable=False),
    Column("priority", String(16), nullable=True),
    Column("is_complaint", Boolean, nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=False),
    # A ticket is its customer's: two help desks (or two brands) may number theirs alike.
    Index("ix_support_events_ticket", "customer_id", "ticket_id"),
)

cancellations = Table(
    "cancellations",
    metadata,
    Column("event_id", String(128), primary_key=True),
    Column("customer_id", String(128), nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("reason", String(16), nullable=False),
    Column("subscription_id", String(128), nullable=True),
    # Read whole (churn histories), never by customer: no index beyond the primary key.
)

message_events = Table(
    "message_events",
    metadata,
    # Wider than backend ids: the messenger derives message and event ids from customer ids.
    Column("event_id", String(255), primary_key=True),
    Column("message_id", String(200), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("status", String(32), nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("journey", String(128), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("channel", String(16), nullable=True),
    Column("tier", String(128), nullable=True),
    Column("locale", String(35), nullable=True),
    Column("holdout", Boolean, nullable=False),
    Index("ix_message_events_message", "message_id"),
    Index("ix_message_events_occurred_at", "occurred_at"),
)

# The 'replied' statuses that carry a survey score (services/kpi/csat.py): a table of their own,
# so that the consumer's every other message status does not write a column it never has.
survey_answers = Table(
    "survey_answers",
    metadata,
    Column("event_id", String(255), primary_key=True),
    Column("message_id", String(200), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("score", Integer, nullable=False),  # 1 … 5
    Column("journey", String(128), nullable=False),
    Column("channel", String(16), nullable=True),
    Column("tier", String(128), nullable=True),
    Column("locale", String(35), nullable=True),
    Index("ix_survey_answers_message", "message_id"),
    Index("ix_survey_answers_occurred_at", "occurred_at"),
)

# --- derived from the facts -------------------------------------------------------------------

tickets = Table(
    "tickets",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("ticket_id", String(128), primary_key=True),
    Column("category", String(64), nullable=False),
    Column("priority", String(16), nullable=True),
    Column("is_complaint", Boolean, nullable=False),
    Column("opened_at", UtcDateTime(), nullable=False),
    Column("opened_inferred", Boolean, nullable=False),  # no 'opened' event yet
    Column("first_response_at", UtcDateTime(), nullable=True),
    Column("first_response_s", Float, nullable=True),
    Column("resolved_at", UtcDateTime(), nullable=True),  # final resolution; null while open
    Column("resolution_s", Float, nullable=True),
    Column("reopened", Integer, nullable=False),
    Index("ix_tickets_opened_at", "opened_at"),
    Index("ix_tickets_open", "resolved_at"),
)

# Tickets with steps newer than their ``tickets`` row. The consumer marks them in the batch
# transaction (one small row instead of a read of the ticket's steps and a write of three
# B-trees per batch); the periodic rollup rebuilds them, and readers derive them from their
# steps until then. ``marks`` counts the batches that marked the ticket, so a rebuild clears
# only the marks it saw.
stale_tickets = Table(
    "stale_tickets",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("ticket_id", String(128), primary_key=True),
    Column("marks", Integer, nullable=False),
)

# The latest known attributes of a customer, each its own last-writer-wins register
# (occurred_at, then event id): locale and preferred channel from profile events, tier from
# the messages the messenger sent (it stamps the segmenter's tier on each).
customers = Table(
    "customers",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("locale", String(35), nullable=True),
    Column("locale_at", String(300), nullable=True),  # "<occurred_at ISO UTC>|<event id>"
    Column("channel", String(16), nullable=True),
    Column("channel_at", String(300), nullable=True),
    Column("tier", String(128), nullable=True),
    Column("tier_at", String(300), nullable=True),
)

# --- CLV ----------------------------------------------------------------------------------------

clv_models = Table(
    "clv_models",
    metadata,
    Column("as_of", Date, primary_key=True),
    Column("fingerprint", String(200), nullable=False),  # the data and settings it was fitted on
    Column("fitted_at", UtcDateTime(), nullable=False),
    Column("model", json_type(), nullable=False),
)

clv_predictions = Table(
    "clv_predictions",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("model_as_of", Date, nullable=False),
    Column("computed_at", UtcDateTime(), nullable=False),
    Column("historic_value", Float, nullable=False),
    Column("predicted_clv", Float, nullable=False),
    Column("p_alive", Float, nullable=False),
    Column("expected_purchases_90d", Float, nullable=False),
    # What was last published on retain.clv: a change is published only beyond the tolerance.
    Column("published_clv", Float, nullable=True),
    Column("published_p_alive", Float, nullable=True),
    Column("published_expected_90d", Float, nullable=True),
    Column("published_at", UtcDateTime(), nullable=True),
)

# --- Grafana tables and their bookkeeping ---------------------------------------------------------

# Per rollup: the earliest local day whose rows are stale (set by the consumer, cleared by the
# rollup that recomputed from it).
rollup_state = Table(
    "rollup_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("dirty_from", Date, nullable=True),
    Column("computed_at", UtcDateTime(), nullable=True),
    # The settings the rows were computed with (time zone, windows, rates): a change redoes all.
    Column("settings", String(64), nullable=True),
    # The day a running rollup took from dirty_from, until it is done (a failed run leaves it).
    Column("taken_from", Date, nullable=True),
)

kpi_response_time_daily = Table(
    "kpi_response_time_daily",
    metadata,
    Column("day", Date, primary_key=True),  # local day the tickets were opened
    Column("dimension", String(16), primary_key=True),  # all, category, priority, complaint
    Column("value", String(64), primary_key=True),  # 'all' for dimension all
    Column("tickets", Integer, nullable=False),
    Column("answered", Integer, nullable=False),
    Column("first_response_p50_s", Float, nullable=True),
    Column("first_response_p90_s", Float, nullable=True),
    Column("first_response_mean_s", Float, nullable=True),
    Column("resolved", Integer, nullable=False),
    Column("resolution_p50_s", Float, nullable=True),
    Column("resolution_p90_s", Float, nullable=True),
    Column("resolution_mean_s", Float, nullable=True),
    Column("breached", Integer, nullable=False),
    Column("breach_rate", Float, nullable=True),
    Column("reopened_tickets", Integer, nullable=False),
    Column("computed_at", UtcDateTime(), nullable=False),
)

kpi_churn_monthly = Table(
    "kpi_churn_monthly",
    metadata,
    Column("month", Date, primary_key=True),  # first local day of the month
    Column("kind", String(16), primary_key=True),  # contractual, non_contractual
    Column("dimension", String(16), primary_key=True),  # all, reason, tier
    Column("value", String(64), primary_key=True),
    Column("active_at_start", Integer, nullable=False),
    Column("churned", Integer, nullable=False),
    Column("churn_rate", Float, nullable=True),
    Column("computed_at", UtcDateTime(), nullable=False),
)

kpi_conversion_daily = Table(
    "kpi_conversion_daily",
    metadata,
    Column("day", Date, primary_key=True),  # local day of the message's decision (its first event)
    Column("dimension", String(16), primary_key=True),  # all, journey, channel, tier, locale
    Column("value", String(128), primary_key=True),
    Column("sent", Integer, nullable=False),
    Column("conversions", Integer, nullable=False),
    Column("conversion_rate", Float, nullable=True),
    Column("revenue", Float, nullable=False),
    Column("revenue_per_message", Float, nullable=True),
    Column("holdout", Integer, nullable=False),
    Column("holdout_conversions", Integer, nullable=False),
    Column("holdout_rate", Float, nullable=True),
    Column("assigned", Integer, nullable=False, server_default="0"),  # the uplift's intent-to-treat arm
    Column("assigned_conversions", Integer, nullable=False, server_default="0"),
    Column("assigned_rate", Float, nullable=True),
    Column("uplift", Float, nullable=True),
    Column("uplift_ci_low", Float, nullable=True),
    Column("uplift_ci_high", Float, nullable=True),
    Column("attempted", Integer, nullable=False),
    Column("delivered", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("delivery_rate", Float, nullable=True),
    Column("failure_rate", Float, nullable=True),
    Column("actions", Integer, nullable=False),
    Column("actions_per_engagement", Float, nullable=True),
    Column("computed_at", UtcDateTime(), nullable=False),
)

kpi_csat_daily = Table(
    "kpi_csat_daily",
    metadata,
    Column("day", Date, primary_key=True),  # local day of the answer
    Column("dimension", String(16), primary_key=True),  # all, journey, channel, tier, locale
    Column("value", String(128), primary_key=True),
    Column("answers", Integer, nullable=False),
    Column("satisfied", Integer, nullable=False),  # scores 4 and 5
    Column("neutral", Integer, nullable=False),  # 3
    Column("dissatisfied", Integer, nullable=False),  # 1 and 2
    Column("score_sum", Integer, nullable=False),  # a range's mean: sum(score_sum) / sum(answers)
    Column("csat", Float, nullable=True),  # satisfied / answers
    Column("mean_score", Float, nullable=True),
    Column("computed_at", UtcDateTime(), nullable=False),
)
