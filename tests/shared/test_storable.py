from __future__ import annotations

import pytest

from shared.storable import storable, unstorable_paths


def test_plain_json_is_storable() -> None:
    value = {"name": "נועה", "tags": ["a", "b"], "n": 1, "x": None, "nested": {"ok": "emoji 🎉"}}
    assert unstorable_paths(value) == []
    assert storable(value) is value


def test_nul_and_lone_surrogates_are_named_by_json_path() -> None:
    value = {
        "tiers": [{"name": "gold", "description": "a\x00b"}],
        "text": "hi \ud800",
        "bad\x00key": 1,
        "list": ["ok", "\x00"],
    }
    assert unstorable_paths(value) == ["$.tiers[0].description", "$.text", "$[?]", "$.list[1]"]
    with pytest.raises(ValueError, match=r"not allowed \(at \$\.tiers\[0\]\.description, \$\.text"):
        storable(value)


def test_a_bare_string_is_checked_too() -> None:
    assert unstorable_paths("\x00") == ["$"]
    assert storable("fine") == "fine"


def test_nesting_deeper_than_the_recursion_limit_is_walked() -> None:
    value: object = "\x00"
    for _ in range(5000):
        value = {"not": [value]}
    [path] = unstorable_paths(value)
    assert path.startswith("$.not[0].not[0]")
