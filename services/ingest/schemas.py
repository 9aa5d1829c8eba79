from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from shared.errors import ErrorResponse
from shared.events import EVENT_ADAPTER, EXAMPLES

__all__ = ["AcceptedResponse", "ErrorResponse", "FieldProblem", "events_request_body"]


class AcceptedResponse(BaseModel):
    accepted: int = Field(description="Events in the request.")
    event_ids: list[str] = Field(description="The event ids, in the order sent (assigned where absent).")
    duplicates: int = Field(description="Events already accepted recently, answered without producing.")


class FieldProblem(BaseModel):
    index: int = Field(description="Position of the event in the request (0 for a single event).")
    field: str = Field(description="Dotted path of the field, e.g. items.0.unit_price.")
    message: str


def _event_models(schema: dict[str, Any]) -> list[str]:
    return [ref.rsplit("/", 1)[1] for ref in schema["discriminator"]["mapping"].values()]


def _as_sent_over_http(model: dict[str, Any]) -> dict[str, Any]:
    """An event's schema as POST /v1/events takes it, which is not quite the Kafka contract:
    ``event_id`` may be left out (ingest assigns one), and ``type`` must be given (it picks the
    model; the models' defaults would read as if it could be left out)."""
    model = {**model, "properties": dict(model["properties"])}
    event_id = dict(model["properties"]["event_id"])
    event_id["description"] = (
        "Your id for this event, unique per event: a retry with the same id is not applied twice. "
        "When left out, one is made from the event's content (a name-based UUID, returned in "
        "event_ids): a retry of the same content is the same event, and two events alike in every "
        "field are one; give ids of your own to send such events apart."
    )
    type_ = {k: v for k, v in model["properties"]["type"].items() if k != "default"}
    model["properties"]["event_id"] = event_id
    model["properties"]["type"] = type_
    model["required"] = ["type", *(f for f in model.get("required", []) if f not in ("event_id", "type"))]
    return model


def events_request_body(max_batch: int = 1000) -> dict[str, Any]:
    """The OpenAPI request body of POST /v1/events: one event or an array of 1 to ``max_batch``
    (RETAIN_INGEST_MAX_BATCH; more is a 413), with examples."""
    schema = EVENT_ADAPTER.json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    for name in _event_models(schema):
        defs[name] = _as_sent_over_http(defs[name])
    one = schema
    examples: dict[str, Any] = {
        name: {"summary": f"one {name} event", "value": value} for name, value in EXAMPLES.items()
    }
    examples["batch"] = {"summary": "a batch of events", "value": list(EXAMPLES.values())}
    return {
        "defs": defs,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [one, {"type": "array", "items": one, "minItems": 1, "maxItems": max_batch}]
                    },
                    "examples": examples,
                }
            },
        },
    }
