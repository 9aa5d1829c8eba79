from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.auth import KeyStore, create_key, hash_key


def test_keys_are_stored_only_as_hashes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, plain = create_key(path, ["events:write"], "crm")
    stored = path.read_text()
    assert plain not in stored
    assert json.loads(stored)["keys"][0]["hash"] == hash_key(plain) == key.hash
    assert path.stat().st_mode & 0o077 == 0


def test_authenticate(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, plain = create_key(path, ["events:write", "kpi:read"])
    store = KeyStore(path)
    found = store.authenticate(plain)
    assert found is not None
    assert found.id == key.id
    assert found.scopes == {"events:write", "kpi:read"}
    assert store.authenticate(plain[:-1] + ("A" if plain[-1] != "A" else "B")) is None
    assert store.authenticate("rk_unknown_secret") is None
    assert store.authenticate("garbage") is None


def test_unknown_scope_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown scopes"):
        create_key(tmp_path / "k.json", ["events:delete"])
