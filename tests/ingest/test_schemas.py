"""The OpenAPI of POST /v1/events describes what the endpoint takes: checked by validating
bodies against the published schema and against ingest's own validation, side by side."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from services.ingest.app import create_app
from services.ingest.batch import InvalidBatchError, validate_batch
from services.ingest.config import IngestSettings
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


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("currency", "usd"),  # ISO 4217 is in capitals
        ("amount", "-5"),  # never below zero
        ("amount", "1.00001"),  # at most 4 decimals
        ("amount", "123456789012345"),  # at most 14 digits before the point
    ],
)
def test_what_ingest_refuses_in_a_purchase_the_schema_refuses_too(field: str, value: str) -> None:
    """The published schema let these pass (a string as any amount, any currency text); a client
    generated from it sent them and met a 422 it could not have foreseen."""
    item = {**EXAMPLES["purchase"], field: value}
    assert not _ingest_accepts(item)
    assert not _validator().is_valid(item)


def test_a_phone_the_schema_takes_is_e164_and_ingest_agrees() -> None:
    profile = EXAMPLES["profile"]
    good = {**profile, "phone": "+972521234567"}
    national = {**profile, "phone": "0521234567"}
    assert _ingest_accepts(good)
    assert _validator().is_valid(good)
    assert not _ingest_accepts(national)
    assert not _validator().is_valid(national)


def test_the_batch_s_bounds_are_those_ingest_keeps() -> None:
    """An empty array is refused (422); more than RETAIN_INGEST_MAX_BATCH is a 413: the schema
    says both, with the deployment's bound, where it said 1,000 whatever the setting."""
    body = events_request_body(50)
    array = body["requestBody"]["content"]["application/json"]["schema"]["anyOf"][1]
    assert (array["minItems"], array["maxItems"]) == (1, 50)
    assert not _validator().is_valid([])


def test_the_app_publishes_this_deployment_s_batch_bound_and_where_a_key_is_needed(tmp_path: Path) -> None:
    settings = IngestSettings(ingest_max_batch=50, var_dir=tmp_path, api_keys_file=tmp_path / "keys.json")
    spec = create_app(settings).openapi()
    post = spec["paths"]["/v1/events"]["post"]
    array = post["requestBody"]["content"]["application/json"]["schema"]["anyOf"][1]
    assert array["maxItems"] == 50
    assert post["security"] == [{"bearer": []}, {"apiKey": []}]
    # The headers a client acts on are in the document: when to resend, which scheme to use.
    for status in ("429", "503"):
        assert post["responses"][status]["headers"]["Retry-After"]["schema"] == {"type": "integer"}
    assert "WWW-Authenticate" in post["responses"]["401"]["headers"]
    assert "UTF-8" in post["responses"]["415"]["description"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert "security" not in spec
