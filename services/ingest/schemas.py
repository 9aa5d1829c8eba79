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


def events_request_body() -> dict[str, Any]:
    """The OpenAPI request body of POST /v1/events: one event or an array, with examples."""
    schema = EVENT_ADAPTER.json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
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
                    "schema": {"anyOf": [one, {"type": "array", "items": one, "maxItems": 1000}]},
                    "examples": examples,
                }
            },
        },
    }
