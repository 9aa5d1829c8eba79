"""The messenger's tables: the message ledger, customers as last seen, consent facts, caps."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Index, Integer, MetaData, String, Table, Text

from shared.db import UtcDateTime, applied_events_table, json_type
from shared.outbox import outbox_table

metadata = MetaData()

applied_events = applied_events_table(metadata)
outbox = outbox_table(metadata)

customers = Table(
    "customers",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("profile", json_type(), nullable=False),  # ProfileSnapshot of the latest update
    Column("profile_at", UtcDateTime(), nullable=False),  # occurred_at of that update
    Column("whatsapp_inbound_at", UtcDateTime(), nullable=True),  # opens the 24-hour window
    Column("updated_at", UtcDateTime(), nullable=False),
    # The snapshot's addresses again, indexed: how an inbound message or a bounce finds its
    # customer (matching inside the JSON read every profile).
    Column("email", Text, nullable=True),
    Column("phone", Text, nullable=True),
    Column("whatsapp", Text, nullable=True),
    Index("ix_customers_email", "email"),
    Index("ix_customers_phone", "phone"),
    Index("ix_customers_whatsapp", "whatsapp"),
)

# Opt-outs and opt-ins that do not come from profile events: STOP/START, unsubscribe links,
# bounces, spam reports, provider refusals. Durable: a stale profile event never lifts one.
consent_facts = Table(
    "consent_facts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("customer_id", String(128), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("opt_in", Boolean, nullable=False),
    Column("source", String(32), nullable=False),
    Column("marketing_only", Boolean, nullable=False),
    # The address it was about (a STOP from this number, a bounce of this email): it counts only
    # while that is the customer's address on the channel. Null: the channel's, whatever the
    # address (unsubscribe links; facts recorded before migration 0008).
    Column("address", String(320), nullable=True),
    Index("ix_consent_facts_customer", "customer_id"),
)

# The ledger: one row per candidate message, committed before any provider is called.
messages = Table(
    "messages",
    metadata,
    Column("id", String(36), primary_key=True),
    # journey (64) : customer (128) : entry (an event id, 128, or a segment change) #attempt
    Column("idempotency_key", String(512), nullable=False, unique=True),
    Column("customer_id", String(128), nullable=False),
    Column("journey", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("channel", String(16), nullable=True),
    Column("template", String(128), nullable=True),
    Column("locale", String(35), nullable=True),
    Column("tier", String(64), nullable=True),
    Column("status", String(24), nullable=False),
    Column("reason", Text, nullable=True),
    Column("send_at", UtcDateTime(), nullable=True),
    Column("expires_at", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("sent_at", UtcDateTime(), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("provider", String(32), nullable=True),
    Column("provider_message_id", String(255), nullable=True),
    Column("error_code", String(32), nullable=True),
    Column("trigger_event_id", String(128), nullable=True),
    Column("whatsapp_mode", String(16), nullable=True),
    Column("content", json_type(), nullable=True),  # what was rendered: subject, text, html
    Column("details", json_type(), nullable=True),
    Index("ix_messages_customer", "customer_id", "created_at"),
    Index("ix_messages_due", "status", "send_at"),
    Index("ix_messages_provider_id", "provider_message_id"),
    Index("ix_messages_created", "created_at", "id"),  # the order of GET /v1/messages
)

# The answers to the feedback survey behind a message's link (pages.py), one per message, for
# the people who follow them up (GET /v1/surveys): newest first, the unhappy ones by a filter.
# The message's details keep the answer too (what the page checks for "already answered").
survey_answers = Table(
    "survey_answers",
    metadata,
    Column("id", String(36), primary_key=True),  # the message's id
    Column("customer_id", String(128), nullable=False),
    Column("journey", String(64), nullable=False),
    Column("channel", String(16), nullable=True),
    Column("locale", String(35), nullable=True),
    Column("tier", String(64), nullable=True),
    Column("score", Integer, nullable=False),  # 1 (not at all) … 5 (very)
    Column("comment", Text, nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),  # when the customer answered
    # Support's follow-up (PUT /v1/surveys/{id}/follow-up): when, by which API key, and what
    # was done; all null while nobody has taken the answer up (or it was taken back).
    Column("followed_up_at", UtcDateTime(), nullable=True),
    Column("followed_up_by", String(64), nullable=True),
    Column("follow_up_note", Text, nullable=True),
    # Every follow-up, amendment and take-back, oldest first ({action, at, by, note}): a note
    # replaced or taken back is still there. Null: none yet.
    Column("follow_up_history", json_type(), nullable=True),
    Index("ix_survey_answers_created", "created_at", "id"),  # the order of GET /v1/surveys
    Index("ix_survey_answers_customer", "customer_id", "created_at"),
    # The unhappy answers waiting (refresh_gauges, every sender pass): a range of the open ones.
    Index("ix_survey_answers_waiting", "followed_up_at", "score", "created_at"),
)

# What customers wrote back by SMS or WhatsApp, anything but a STOP or a START (a reply, or a
# HELP), for support to read (GET /v1/replies): the messages invite replies ("write to us
# here"), and the customer who explains what went wrong must be read by someone.
replies = Table(
    "replies",
    metadata,
    Column("id", String(64), primary_key=True),  # the provider's id of the inbound message
    Column("customer_id", String(128), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("kind", String(8), nullable=False),  # reply | help
    Column("text", Text, nullable=False),
    # Our last message to them on the channel, which they answered (null: none yet).
    Column("message_id", String(36), nullable=True),
    Column("journey", String(64), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),  # when it came in
    # What came with it (a photo of the broken item): [{url, content_type}], Twilio's media
    # URLs, which Twilio serves to the account. Null: none.
    Column("media", json_type(), nullable=True),
    # Support's follow-up (PUT /v1/replies/{id}/follow-up), as a survey answer's.
    Column("followed_up_at", UtcDateTime(), nullable=True),
    Column("followed_up_by", String(64), nullable=True),
    Column("follow_up_note", Text, nullable=True),
    Column("follow_up_history", json_type(), nullable=True),
    Index("ix_replies_created", "created_at", "id"),  # the order of GET /v1/replies
    Index("ix_replies_customer", "customer_id", "created_at"),
    Index("ix_replies_waiting", "followed_up_at", "created_at"),  # the ones nobody took up
)

settings_table = Table(
    "messenger_settings",
    metadata,
    Column("name", String(64), primary_key=True),  # "caps", …
    Column("value", json_type(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(64), nullable=False),
)

# Durable journey waits (issue 6): a message to decide later unless an exit comes first.
journey_waits = Table(
    "journey_waits",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("customer_id", String(128), nullable=False),
    Column("journey", String(64), nullable=False),
    Column("due_at", UtcDateTime(), nullable=False),
    Column("trigger_event_id", String(128), nullable=True),
    Column("status", String(16), nullable=False),  # waiting, fired, cancelled
    Column("reason", Text, nullable=True),
    Column("data", json_type(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Index("ix_journey_waits_due", "status", "due_at"),
    Index("ix_journey_waits_customer", "customer_id", "journey"),
    Index("ix_journey_waits_created", "created_at", "id"),  # the order of GET /v1/waits
)

journey_entries = Table(
    "journey_entries",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("journey", String(64), primary_key=True),
    Column("entered_at", UtcDateTime(), nullable=False),
    Column("count", Integer, nullable=False),
)

# Signed provider deliveries already applied (sha256 of what was signed), kept for as long as
# their timestamp is accepted: a replay inside that window is refused, one outside it is stale.
webhook_receipts = Table(
    "webhook_receipts",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("received_at", UtcDateTime(), nullable=False),
    Index("ix_webhook_receipts_received_at", "received_at"),
)

# Inbound SMS/WhatsApp messages already applied, by Twilio's MessageSid. Twilio's signature has
# no time, so a delivery Twilio retries (or anyone replays) is valid for ever: applied again,
# an old START would lift a later STOP, and an old message would reopen the WhatsApp window.
inbound_messages = Table(
    "inbound_messages",
    metadata,
    Column("sid", String(64), primary_key=True),
    Column("received_at", UtcDateTime(), nullable=False),
    Index("ix_inbound_messages_received_at", "received_at"),
)
