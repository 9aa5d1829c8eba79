"""The OpenAPI of POST /v1/events describes what the endpoint takes: checked by validating
bodies against the published schema and against ingest's own validation, side by side."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema_rs
import pytest

from services.ingest.batch import InvalidBatchError, validate_batch
from services.ingest.schemas import events_request_body
from shared.events import EVENT_ADAPTER, EXAMPLES


def _validator() -> Any:
    body = events_request_body()
    schema = body["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.validator_for({**schema, "components": {"schemas": body["defs"]}})


def _ingest_accepts(item: dict[str, Any]) -> bool:
    try:
        validate_batch([copy.deepcopy(item)], 10)
    except InvalidBatchError:
        return False
    return True


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_the_schema_and_ingest_agree_on_what_may_be_left_out(kind: str) -> None:
    validator = _validator()
    example = EXAMPLES[kind]
    without_id = {k: v for k, v in example.items() if k != "event_id"}
    without_type = {k: v for k, v in example.items() if k != "type"}
    assert validator.is_valid(example)
    assert _ingest_accepts(example)
    # Ingest assigns an id where none is sent; the schema says so.
    assert validator.is_valid(without_id)
    assert _ingest_accepts(without_id)
    assert validator.is_valid([example, without_id])
    # The type picks the model: without it ingest refuses, and the schema no longer reads as if
    # the model's default made it optional.
    assert not validator.is_valid(without_type)
    assert not _ingest_accepts(without_type)


def test_the_id_is_documented_as_the_retry_key_and_the_kafka_contract_still_requires_it() -> None:
    defs = events_request_body()["defs"]
    for name in ("ProfileEvent", "PurchaseEvent", "SupportEvent", "CancellationEvent"):
        assert "event_id" not in defs[name]["required"]
        assert defs[name]["required"][0] == "type"
        assert "retry" in defs[name]["properties"]["event_id"]["description"]
    # On Kafka (events produced straight to the topics) the id is the consumers' idempotency
    # key and stays required: only the HTTP body's schema is relaxed.
    contract = EVENT_ADAPTER.json_schema()["$defs"]
    assert "event_id" in contract["PurchaseEvent"]["required"]
