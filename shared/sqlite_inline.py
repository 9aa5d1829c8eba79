"""SQLite for SQLAlchemy's asyncio engine without aiosqlite's thread.

aiosqlite runs every cursor call on a thread of its own and hands each result back to the
event loop: a statement costs three or four thread hand-offs (cursor, execute, fetch, close),
and a worker's batch transaction of a dozen statements pays for forty of them, which profiles
of the consumers showed as their largest single cost. SQLite itself answers a statement on a
local file in microseconds, so a worker whose loop does nothing else while its transaction
runs (a consumer between getmany() calls, the sender between settles) is faster calling it
directly on the loop's thread.

This module is a stand-in for the `aiosqlite` module that SQLAlchemy's aiosqlite dialect
drives: the same names, coroutines that finish without suspending. The dialect, its SQL, its
pool and its error translation stay SQLAlchemy's own; only where the call runs changes.

The price is that a statement blocks the event loop while it runs, including a wait for
another process's write lock (busy_timeout). That is why only the workers use it and the HTTP
APIs, which must keep answering while one request waits, keep aiosqlite
(`Database(url, inline_sqlite=True)`).
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util.concurrency import await_

if TYPE_CHECKING:
    from sqlalchemy.connectors.asyncio import AsyncIODBAPIConnection

# The exception names the dialect copies from the module it drives.
DatabaseError = sqlite3.DatabaseError
Error = sqlite3.Error
IntegrityError = sqlite3.IntegrityError
NotSupportedError = sqlite3.NotSupportedError
OperationalError = sqlite3.OperationalError
ProgrammingError = sqlite3.ProgrammingError
sqlite_version = sqlite3.sqlite_version
sqlite_version_info = sqlite3.sqlite_version_info
__version__ = "inline"


class Cursor:
    """aiosqlite.Cursor's coroutine interface over a sqlite3 cursor, run in place."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        self._cursor.execute(sql, () if parameters is None else parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> Cursor:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    async def nextset(self) -> None:
        return None

    async def setinputsizes(self, *_sizes: Any) -> None:
        return None

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class Connection:
    """aiosqlite.Connection's coroutine interface over a sqlite3 connection, run in place."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn: sqlite3.Connection | None = connection

    @property
    def _connection(self) -> sqlite3.Connection | None:
        # SQLAlchemy's adapter checks this before commit and rollback.
        return self._conn

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError("Connection closed")
        return self._conn

    def cursor(self) -> Cursor:
        return Cursor(self._open().cursor())

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        self._open().commit()

    async def rollback(self) -> None:
        self._open().rollback()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Close at once (aiosqlite's stop(), which SQLAlchemy's terminate calls)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def create_function(self, name: str, num_params: int, func: Callable[..., Any], **kw: Any) -> None:
        self._open().create_function(name, num_params, func, **kw)

    @property
    def isolation_level(self) -> str | None:
        return self._open().isolation_level

    @property
    def in_transaction(self) -> bool:
        return self._open().in_transaction


class _Connecting:
    """What `aiosqlite.connect()` returns: awaited once for the connection."""

    def __init__(self, database: str, kwargs: dict[str, Any]) -> None:
        self._database = database
        self._kwargs = kwargs

    def __await__(self) -> Generator[Any, None, Connection]:
        return _ready(Connection(sqlite3.connect(self._database, **self._kwargs)))


def _ready(value: Connection) -> Generator[Any, None, Connection]:
    return value
    yield  # pragma: no cover - makes this a generator that never suspends


def connect(database: str, **kwargs: Any) -> _Connecting:
    kwargs.pop("loop", None)
    return _Connecting(database, kwargs)


class _InlineAdaptedConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()

    @property
    def isolation_level(self) -> str | None:
        return cast("str | None", self._connection.isolation_level)

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        # aiosqlite's setter goes through its thread's queue; here the connection is local.
        self._connection._conn.isolation_level = value


class _InlineDBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        kw.pop("async_creator_fn", None)
        # Structurally what the adapter drives (the coroutine methods it awaits), though not
        # the whole of SQLAlchemy's protocol for asyncio drivers, which no stand-in spells out.
        connection = cast("AsyncIODBAPIConnection", await_(connect(*arg, **kw)))
        return _InlineAdaptedConnection(self, connection)


def dbapi() -> AsyncAdapt_aiosqlite_dbapi:
    """The `module=` to give create_async_engine() for a sqlite+aiosqlite URL."""
    return _InlineDBAPI(sys.modules[__name__], sqlite3)
