"""API keys with scopes. Keys are stored only as SHA-256 hashes and compared in constant time.

A key looks like ``rk_<id>_<secret>``; the id finds the stored entry, the hash of the whole
key must match it. The secret has 256 bits of entropy, so a fast hash is enough (a password
hash would only slow every request down without adding safety).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request

from shared.errors import ForbiddenError, UnauthorizedError
from shared.logs import get_logger

log = get_logger(__name__)

SCOPES = frozenset(
    {
        "events:write",
        "rules:read",
        "rules:write",
        "messages:read",
        "messages:write",
        # Support's follow-up of survey answers and replies, without the caps, journeys and templates.
        "surveys:write",
        "kpi:read",
        "admin",
    }
)


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scopes: frozenset[str]
    hash: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    key_id = secrets.token_hex(4)
    return key_id, f"rk_{key_id}_{secrets.token_urlsafe(32)}"


def _key_id(key: str) -> str | None:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "rk":
        return None
    return parts[1]


class KeyStore:
    """Hashed keys from a JSON file (re-read when it changes) plus keys given in settings."""

    def __init__(self, path: Path, extra: Iterable[ApiKey] = ()) -> None:
        self._path = path
        self._extra = {k.id: k for k in extra}
        self._keys: dict[str, ApiKey] = dict(self._extra)
        self._mtime: float | None = None  # of the version loaded
        self._broken: float | None = None  # of a version that could not be loaded, logged
        self._checked = 0.0

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = self._path.stat().st_mtime
        except FileNotFoundError:
            self._keys = dict(self._extra)
            self._mtime = None
            return
        if mtime == self._mtime:
            return
        try:
            loaded = load_keys(self._path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # A hand edit that broke the file: refuse its keys until it is fixed rather than keep
            # the ones it had (the edit may have been a revocation), and say so once per version.
            if self._broken != mtime:
                self._broken = mtime
                log.error(
                    "keys file unreadable: its keys are refused until it is fixed",
                    path=str(self._path),
                    error=f"{type(exc).__name__}: {exc}"[:300],
                )
            self._keys = dict(self._extra)
            self._mtime = None  # a backup restored with its old mtime (mv, cp -p) is read again
            return
        self._mtime, self._broken = mtime, None
        self._keys = {**loaded, **self._extra}

    def authenticate(self, presented: str) -> ApiKey | None:
        self._refresh()
        key_id = _key_id(presented)
        stored = self._keys.get(key_id) if key_id else None
        # Compare even when the id is unknown, so timing does not tell ids apart.
        expected = stored.hash if stored else "0" * 64
        ok = hmac.compare_digest(hash_key(presented), expected)
        return stored if ok and stored else None


def load_keys(path: Path) -> dict[str, ApiKey]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        entry["id"]: ApiKey(entry["id"], entry.get("name", ""), frozenset(entry["scopes"]), entry["hash"])
        for entry in data.get("keys", [])
    }


def create_key(path: Path, scopes: Iterable[str], name: str = "") -> tuple[ApiKey, str]:
    """Add a key to the file and return it with its plain text, which is never stored."""
    scopes = frozenset(scopes)
    unknown = scopes - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    key_id, plain = new_key()
    entry: dict[str, Any] = {
        "id": key_id,
        "name": name,
        "scopes": sorted(scopes),
        "hash": hash_key(plain),
        "created_at": datetime.now(UTC).isoformat(),
    }
    data: dict[str, Any] = {"keys": []}
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
    data["keys"].append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return ApiKey(key_id, name, scopes, entry["hash"]), plain


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key") or None


@dataclass(frozen=True, slots=True)
class ScopeRequirement:
    """A FastAPI dependency: the caller's key, which must carry ``scope`` (or ``admin``). A class
    rather than a closure so the OpenAPI can tell which operations need a key."""

    store_of: Callable[[Request], KeyStore]
    scope: str

    async def __call__(self, request: Request) -> ApiKey:
        return authorize(request, self.store_of(request), self.scope)


def require_scope(store_of: Callable[[Request], KeyStore], scope: str) -> ScopeRequirement:
    return ScopeRequirement(store_of, scope)


def allows(key: ApiKey, scope: str) -> bool:
    """Whether ``key`` carries ``scope`` (``admin`` carries them all)."""
    return scope in key.scopes or "admin" in key.scopes


def authorize(request: Request, store: KeyStore, scope: str) -> ApiKey:
    """The caller's key, which must carry ``scope`` (or ``admin``); 401/403 otherwise."""
    presented = presented_key(request)
    if presented is None:
        raise UnauthorizedError(
            "an API key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = store.authenticate(presented)
    if key is None:
        raise UnauthorizedError("the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    if not allows(key, scope):
        raise ForbiddenError(f"the API key lacks the scope {scope!r}")
    request.state.api_key = key
    return key
