from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from shared import auth as auth_module
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


def test_a_keys_file_broken_by_an_edit_refuses_its_keys_until_it_is_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edit may have been a revocation: keeping the keys of the last good version would keep
    the revoked key valid, silently. The request gets a 401, not a 500."""
    path = tmp_path / "keys.json"
    _key, plain = create_key(path, ["events:write"])
    os.utime(path, (0, 0))
    store = KeyStore(path)
    assert store.authenticate(plain) is not None
    good = path.read_text()
    errors: list[str] = []
    monkeypatch.setattr(auth_module.log, "error", lambda event, **_fields: errors.append(event))
    start = time.monotonic()
    clock = iter(range(10, 100, 10))  # seconds apart: each call looks at the file again
    monkeypatch.setattr(time, "monotonic", lambda: start + next(clock))
    path.write_text(good.replace('"keys"', '"keys" ,,'))  # a stray comma
    os.utime(path, (1, 1))
    assert store.authenticate(plain) is None
    assert store.authenticate(plain) is None  # still broken: refused, logged once
    assert errors == ["keys file unreadable: its keys are refused until it is fixed"]
    path.write_text(good)
    os.utime(path, (0, 0))  # the backup put back as it was (mv, cp -p): the first good version's time
    assert store.authenticate(plain) is not None
