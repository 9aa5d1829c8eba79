"""Database plumbing every service shares: engines for SQLite and PostgreSQL, one transaction
boundary, and the applied-event ledger that makes consumers idempotent."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Integer,
    MetaData,
    String,
    Table,
    any_,
    bindparam,
    event,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Result
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.sql.expression import Executable
from sqlalchemy.types import TypeDecorator

from shared import sqlite_inline
from shared.codec import DIGEST_VERSION_MASK
from shared.logs import get_logger

log = get_logger(__name__)


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# With background checkpoints (``WalCheckpointer``), the committing connection still
# checkpoints once the log passes this many pages (40 MB): a backstop for a checkpointer that
# falls behind, not the usual path (SQLite's default, 1,000 pages, would make it so again).
BACKSTOP_CHECKPOINT_PAGES = 10_000


def sqlite_file(url: str) -> str | None:
    """The file of a SQLite URL; None for PostgreSQL and for an in-memory database."""
    if not url.startswith("sqlite"):
        return None
    path = url.split(":///", 1)[-1]
    return path if path and path != ":memory:" else None


def create_engine(
    url: str, *, inline_sqlite: bool = False, wal_autocheckpoint: int | None = None, **kwargs: Any
) -> AsyncEngine:
    # JSON columns hold profiles and facts; orjson is several times faster than json here.
    kwargs.setdefault("json_serializer", _json_dumps)
    kwargs.setdefault("json_deserializer", orjson.loads)
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        if inline_sqlite:
            kwargs.setdefault("module", sqlite_inline.dbapi())
        engine = create_async_engine(url, **kwargs)
        # Inline, a wait for another process's write lock blocks the event loop: keep it well
        # under the consumer's session timeout (10 s) so heartbeats go on, and let the caller's
        # transient-error retry (which yields to the loop) do the rest of the waiting.
        _tune_sqlite(
            engine, busy_timeout_ms=3000 if inline_sqlite else 15000, autocheckpoint=wal_autocheckpoint
        )
        return engine
    return create_async_engine(url, pool_pre_ping=True, **kwargs)


def _tune_sqlite(engine: AsyncEngine, busy_timeout_ms: int, autocheckpoint: int | None) -> None:
    # pysqlite's own transaction handling defers BEGIN and cannot take the write lock up
    # front; SQLAlchemy's documented recipe is to disable it and emit BEGIN ourselves.
    # BEGIN IMMEDIATE makes two writers queue on busy_timeout instead of deadlocking.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms:d}")
        cursor.execute("PRAGMA foreign_keys=ON")
        if autocheckpoint is not None:
            cursor.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint:d}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A read (``Database.sessions``) begins deferred: in WAL mode it then reads a snapshot
        # beside the writer instead of queueing for the write lock, where an API's GET waited
        # behind the consumers' batches and, past the busy timeout, failed.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READS_ONLY) else "BEGIN IMMEDIATE")


# The execution option that marks the engine of read sessions.
_READS_ONLY = "retain_reads_only"


class Database:
    """One service's database. `inline_sqlite` runs SQLite on the event loop's own thread
    (see shared/sqlite_inline.py): for workers, not for HTTP APIs; ignored for PostgreSQL.

    ``sessions()`` is for reading (it never commits; on SQLite it does not take the write
    lock), ``transaction()`` for writing.

    ``background_checkpoints``: on a SQLite file, a ``WalCheckpointer`` from the first
    transaction on (for the workers, which write all the time); ignored for PostgreSQL."""

    def __init__(
        self, url: str, *, inline_sqlite: bool = False, background_checkpoints: bool = False, **kwargs: Any
    ) -> None:
        self.url = url
        self.sqlite_file = sqlite_file(url)
        self._checkpoints = (
            WalCheckpointer(self.sqlite_file) if background_checkpoints and self.sqlite_file else None
        )
        self.engine = create_engine(
            url,
            inline_sqlite=inline_sqlite,
            wal_autocheckpoint=BACKSTOP_CHECKPOINT_PAGES if self._checkpoints is not None else None,
            **kwargs,
        )
        self.sessions = async_sessionmaker(
            self.engine.execution_options(**{_READS_ONLY: True}), expire_on_commit=False
        )
        self._writes = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """The one place a transaction begins and ends: commit on success, roll back on error."""
        if self._checkpoints is not None:
            self._checkpoints.start()
        async with self._writes() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        if self._checkpoints is not None:
            await self._checkpoints.stop()
        await self.engine.dispose()


class WalCheckpointer:
    """Copies a SQLite database's write-ahead log back into the database file from a thread of
    its own, every ``interval_s``, instead of in the commit that takes the log past its limit.

    By default SQLite checkpoints in the committing connection once the log holds 1,000 pages
    (4 MB). A consumer batch writes more than that (a segmenter customer row with its state is
    several KB), so nearly every commit copied the pages of the one before, on the event loop's
    thread while the loop waited: 20 ms of each segmenter batch's commit. A PASSIVE
    checkpoint runs beside the writer without blocking it or waiting for it; here it runs on a
    thread (sqlite3 lets the GIL go while it works), and a page that several batches wrote in
    between is copied once. Measured on the segmenter's bench stream in-process (100k events,
    batches of 500, two runs each): commits 3.7-4.0 → 1.5-1.6 s, the run 28.2-30.0 →
    26.1-27.8 s."""

    def __init__(self, path: str, interval_s: float = 0.25) -> None:
        self._path = path
        self._interval_s = interval_s
        self._connection: sqlite3.Connection | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.checkpoints = 0  # completed, for tests and curiosity

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish the checkpoint under way (never interrupt the thread), then close."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            if not self._stopping.is_set():
                await asyncio.to_thread(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            if self._connection is None:
                self._connection = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
                # Another process checkpointing: skip this turn rather than wait for it.
                self._connection.execute("PRAGMA busy_timeout=0")
            self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.checkpoints += 1
        except sqlite3.Error as exc:
            # The next turn tries again, and the commit-time backstop is still there.
            log.warning("background checkpoint failed; retrying", path=self._path, error=str(exc)[:200])


def applied_events_table(metadata: MetaData) -> Table:
    """The ledger of applied event ids, written in the same transaction as their effects."""
    return Table(
        "applied_events",
        metadata,
        Column("event_id", String(255), primary_key=True),
        Column("topic", String(255), nullable=False),
        Column("partition", Integer, nullable=False),
        Column("offset", BigInteger, nullable=False),  # Kafka's offsets are 64-bit
        Column("applied_at", UtcDateTime(), nullable=False),
        # What the id named (shared.codec.event_digest), so that an id its producer reuses for
        # another event is dead-lettered, not dropped as a duplicate (claim_events). Null for
        # the ids of our own topics and for rows written before digests were kept.
        Column("digest", BigInteger, nullable=True),
    )


def dialect_insert(dialect: str, table: Table) -> Any:
    """The INSERT of ``dialect`` ("postgresql" or "sqlite"), which has ON CONFLICT."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


@dataclass(frozen=True, slots=True)
class RowsWrite:
    """A write of a batch of rows, for one dialect: an INSERT (with its ON CONFLICT clause,
    ``rows_insert``) or an UPDATE (``rows_update``).

    On PostgreSQL the batch goes as one array per column and the statement reads the rows back
    with ``unnest``: one statement for the whole batch. An executemany is one Bind/Execute
    per row, each with SQLAlchemy's parameter processing in Python before it; the kpi consumer
    spent more time there and in PostgreSQL's per-statement work than in inserting the rows.
    On SQLite, executemany of the plain statement, which is already a loop in C."""

    statement: Executable
    columns: tuple[str, ...] | None  # None: executemany (SQLite)

    async def execute(self, session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> Result[Any]:
        """Every row must have every column written (unnest would give a missing one NULL,
        not its default, so a missing key is an error here on every dialect)."""
        if self.columns is None:
            return await session.execute(self.statement, list(rows))
        return await session.execute(
            self.statement, {c: list(map(operator.itemgetter(c), rows)) for c in self.columns}
        )


def _array_param(name: str, column: Any) -> Any:
    """A parameter ``name`` that binds a list of ``column``'s values as one PostgreSQL array.
    One dimension: a JSON value that is a list is one element, not a sub-array."""
    return bindparam(name, type_=postgresql.ARRAY(column.type, dimensions=1))


def rows_insert(
    dialect: str,
    table: Table,
    finish: Callable[[Any], Any] = lambda ins: ins,
    columns: Sequence[str] | None = None,
) -> RowsWrite:
    """The ``RowsWrite`` of ``table``; ``finish`` adds the ON CONFLICT (and RETURNING) clauses
    to the dialect's INSERT, whose ``excluded`` it may use. ``columns``: the ones the rows
    give, if not all (the others take their defaults). Build it once (``functools.cache``)."""
    if dialect != "postgresql":
        return RowsWrite(finish(dialect_insert(dialect, table)), None)
    given = [table.c[name] for name in columns] if columns is not None else list(table.c)
    # Several set-returning functions in one select list advance together (PostgreSQL 10+),
    # so equal arrays give the rows back in their order (a serial column numbers them so).
    arrays = select(*(func.unnest(_array_param(c.name, c)) for c in given))
    names = tuple(c.name for c in given)
    return RowsWrite(finish(postgresql.insert(table).from_select(list(names), arrays)), names)


def rows_update(dialect: str, table: Table, key: str, columns: Sequence[str]) -> RowsWrite:
    """An UPDATE of ``columns`` of a batch of rows, each found by its ``key`` column, as a
    ``RowsWrite`` runs it: on PostgreSQL one statement for the batch (UPDATE … FROM the
    unnest of one array per column), on SQLite an executemany. Each row gives the key and
    every column as ``new_<name>`` (SQLAlchemy reserves the columns' own names in a SET).
    Build it once (``functools.cache``)."""
    names = (key, *columns)
    if dialect != "postgresql":
        where = table.c[key] == bindparam(f"new_{key}")
        return RowsWrite(update(table).where(where).values({c: bindparam(f"new_{c}") for c in columns}), None)
    arrays = select(*(func.unnest(_array_param(f"new_{n}", table.c[n])).label(n) for n in names)).subquery(
        "v"
    )
    stmt = update(table).where(table.c[key] == arrays.c[key]).values({c: arrays.c[c] for c in columns})
    return RowsWrite(stmt, tuple(f"new_{n}" for n in names))


def rows_ignoring_conflicts(session: AsyncSession, table: Table) -> RowsWrite:
    """The ``RowsWrite`` … ON CONFLICT DO NOTHING of ``table`` for the session's dialect."""
    return _rows_ignoring_conflicts(session.get_bind().dialect.name, table)


@functools.cache
def _rows_ignoring_conflicts(dialect: str, table: Table) -> RowsWrite:
    return rows_insert(dialect, table, lambda ins: ins.on_conflict_do_nothing())


async def copy_new_rows(session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows whose keys are new by construction: facts keyed by the event ids that this
    transaction's ledger claim (``claim_events``) has just returned as new. There is no conflict
    clause: a row whose key exists fails the transaction, as any broken invariant should.

    On PostgreSQL the rows go as one binary COPY: the kpi consumer's message statuses (eleven
    columns) went in at half the wall time and a third of the client CPU of the INSERT … SELECT
    unnest of ``rows_insert``, whose array encoding checks every element (80,000 rows in
    batches of 2,000, measured with asyncpg alone). The columns' bind processors run as they
    would in an INSERT (a naive datetime is still refused). On SQLite, an executemany.
    Every row must give every column. Must follow another statement of the transaction, which
    begins PostgreSQL's transaction (the claim does); otherwise it refuses."""
    if not rows:
        return
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql":
        await session.execute(_plain_insert(dialect.name, table), list(rows))
        return
    names, processors = _copy_columns(dialect, table)
    columns = []
    for name, process in zip(names, processors, strict=True):
        values = map(operator.itemgetter(name), rows)
        columns.append(list(values if process is None else map(process, values)))
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if driver is None or not driver.is_in_transaction():
        raise RuntimeError(f"COPY into {table.name} outside a begun transaction: it would not be atomic")
    try:
        await driver.copy_records_to_table(
            table.name, records=zip(*columns, strict=True), columns=names, schema_name=table.schema
        )
    except Exception as exc:
        raise await _as_statement_error(connection, raw.dbapi_connection, exc, f"COPY {table.name}") from exc


async def _as_statement_error(
    connection: AsyncConnection, adapted: Any, exc: Exception, statement: str
) -> Exception:
    """The error SQLAlchemy would have raised had the statement gone through it (asyncpg's own
    error translated to the DBAPI's, then wrapped: IntegrityError, OperationalError, …), with
    the connection invalidated if it is gone, so that callers, ``is_transient`` and the pool
    see a failed COPY as they see a failed INSERT."""
    try:
        adapted._handle_exception(exc)  # SQLAlchemy's asyncpg adapter: raises the DBAPI's error
    except Exception as translated:  # noqa: BLE001 - re-raised, wrapped, by the caller
        orig: Any = translated
    else:  # pragma: no cover - _handle_exception always raises
        orig = exc
    dialect = connection.dialect
    gone = dialect.is_disconnect(orig, adapted, None)
    if gone:
        await connection.invalidate(orig)
    wrapped: Exception = DBAPIError.instance(
        statement, None, orig, dialect.loaded_dbapi.Error, connection_invalidated=gone, dialect=dialect
    )
    return wrapped


@functools.cache
def _plain_insert(dialect: str, table: Table) -> Any:
    return dialect_insert(dialect, table)


@functools.cache
def _copy_columns(
    dialect: Dialect, table: Table
) -> tuple[tuple[str, ...], tuple[Callable[[Any], Any] | None, ...]]:
    names = tuple(c.name for c in table.c)
    return names, tuple(c.type.dialect_impl(dialect).bind_processor(dialect) for c in table.c)


def insert_ignoring_conflicts(session: AsyncSession, table: Table) -> Any:
    """INSERT … ON CONFLICT DO NOTHING for the session's dialect."""
    return _ignoring_conflicts(session.get_bind().dialect.name, table)


@functools.cache
def _ignoring_conflicts(dialect: str, table: Table) -> Any:
    # Built once per table: consumers insert every batch, and building the statement and its
    # cache key cost more than SQLite took to run it. Callers derive from it (.values(),
    # .returning()), which makes new statements and leaves this one as it is.
    return dialect_insert(dialect, table).on_conflict_do_nothing()


class _Identified(Protocol):
    @property
    def event_id(self) -> str: ...


class Claimable(Protocol):
    """A consumed record as the ledger sees it (shared.kafka.consumer.Delivered)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def digest(self) -> int | None: ...
    @property
    def value(self) -> _Identified: ...


C = TypeVar("C", bound=Claimable)


@dataclass(frozen=True, slots=True)
class Claimed(Generic[C]):
    """What a batch's claim found."""

    fresh: list[C]  # apply these: the first record of each id new to the ledger, in batch order
    # Not applied: an id applied before (or earlier in the batch) for another event, with what
    # to tell its producer. The consumer loop dead-letters them (BatchResult.reused).
    reused: list[tuple[C, str]]
    duplicates: int  # the others: their id applied before for the same event (or one not known)


async def claim_events(session: AsyncSession, ledger: Table, batch: Sequence[C]) -> Claimed[C]:
    """Record each new id of the batch in the ledger (with its digest, topic, partition and
    offset); say which records to apply, which are duplicates and which reuse an id.

    The caller applies only ``fresh``, in the same transaction, so a replay or a duplicate
    changes nothing twice. A record whose id was applied for an event of another digest is
    neither applied nor dropped: an id its producer reused (a second order sent under the
    first one's id) would otherwise vanish; ingest refuses the same with a 409. A digest not known
    (ours, or a ledger row from before digests were kept), or of another version, counts as
    the same.
    """
    if not batch:
        return Claimed([], [], 0)
    now = datetime.now(UTC)
    first: dict[str, C] = {}
    for d in batch:
        first.setdefault(d.value.event_id, d)
    rows = [
        {
            "event_id": event_id,
            "digest": d.digest,
            "topic": d.topic,
            "partition": d.partition,
            "offset": d.offset,
            "applied_at": now,
        }
        for event_id, d in first.items()
    ]
    dialect = session.get_bind().dialect.name
    new = {row[0] for row in await _claim(dialect, ledger).execute(session, rows)}
    if len(new) == len(batch):  # the steady state: every record new, none repeated
        return Claimed(list(batch), [], 0)
    # The id's first application: a row already in the ledger, or this batch's first record.
    known: dict[str, tuple[int | None, str, int, int]] = {
        event_id: (d.digest, d.topic, d.partition, d.offset)
        for event_id, d in first.items()
        if event_id in new
    }
    if len(new) < len(first):
        stored = await session.execute(
            _ledger_entries(dialect, ledger), {"ids": [i for i in first if i not in new]}
        )
        known |= {row[0]: (row[1], row[2], row[3], row[4]) for row in stored}
    fresh: list[C] = []
    reused: list[tuple[C, str]] = []
    for d in batch:
        event_id = d.value.event_id
        if event_id in new and first[event_id] is d:
            fresh.append(d)
            continue
        digest, topic, partition, offset = known[event_id]
        if _other_event(digest, d.digest):
            reused.append(
                (
                    d,
                    f"event_id {event_id!r} was applied for another event (first read from {topic} "
                    f"partition {partition} offset {offset}); this one is not applied. Send it "
                    "again under an event_id of its own: replaying this letter meets the same id",
                )
            )
    return Claimed(fresh, reused, len(batch) - len(fresh) - len(reused))


def _other_event(first: int | None, this: int | None) -> bool:
    """Whether two digests of one id say two events: both known, of one version, and unequal.
    A digest of another version says nothing (the encoding may have changed between them)."""
    if first is None or this is None:
        return False
    return (first ^ this) & DIGEST_VERSION_MASK == 0 and first != this


@functools.cache
def _ledger_entries(dialect: str, ledger: Table) -> Any:
    c = ledger.c
    return select(c.event_id, c.digest, c.topic, c.partition, c.offset).where(in_list(dialect, c.event_id))


@functools.cache
def _claim(dialect: str, ledger: Table) -> RowsWrite:
    # Built once too (every batch of every consumer claims).
    return rows_insert(dialect, ledger, lambda ins: ins.on_conflict_do_nothing().returning(ledger.c.event_id))


class _SqliteUtcText(sqlite.DATETIME):
    """SQLite's DATETIME (its DDL, and SQLAlchemy's storage format, unchanged) with the text
    made and read by ``UtcDateTime`` itself, in datetime's C methods: SQLAlchemy's own bind
    processor builds a dict and %-formats it for every value, which a consumer batch writing
    thousands of timestamps paid for twice over."""

    def bind_processor(self, dialect: Dialect) -> None:
        return None

    def result_processor(self, dialect: Dialect, coltype: object) -> None:
        return None


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes on every backend: stored in UTC, read back aware.

    SQLite has no time zone type, and SQLAlchemy hands back naive values from it; comparing
    those with aware ones would raise, so everything is normalised here. On SQLite the value
    is SQLAlchemy's text form, ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC, so text comparisons
    order it and files written before read the same.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return _SqliteUtcText()  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy
        return super().load_dialect_impl(dialect)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | str | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        if dialect.name != "sqlite":
            # PostgreSQL's timestamptz is an instant: asyncpg converts an aware value to UTC
            # itself, so converting it here too (pydantic's UTC is not datetime's, so every
            # timestamp of an event was converted) was work done twice per value.
            return value
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        # The naive text is the aware one without its "+00:00" (slicing is a third quicker
        # than replace(tzinfo=None), and a page of customers binds thousands).
        return value.isoformat(" ", "microseconds")[:-6]

    def process_result_value(self, value: datetime | str | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # SQLite: naive text in UTC
            # Parsed with its offset appended: six times quicker than replace(tzinfo=UTC)
            # afterwards, which was a tenth of reading a page of customers.
            try:
                return datetime.fromisoformat(value + "+00:00")
            except ValueError:  # text written with an offset of its own
                value = datetime.fromisoformat(value)
        if value.tzinfo is UTC:
            return value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def json_type() -> Any:
    return JSON().with_variant(postgresql.JSONB(), "postgresql")


_JSON_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def json_values(dialect: str, column: Any, keys: Sequence[str]) -> Any:
    """The values at ``keys`` of a JSON object ``column``, read as one JSON array (a list in
    Python, ``None`` for a key the object lacks).

    The database picks them out with its own JSON functions, so reading two keys of an object
    of kilobytes parses the object in C inside the database, not whole in Python. JSON
    ``true`` stays ``true`` (SQLite's ``json_extract`` alone would give 1). The keys are
    identifiers, written into the statement (a bound path makes PostgreSQL's ``->``
    ambiguous); build the expression once per key set. SQLite's ``->`` needs 3.38 or later.
    """
    bad = [k for k in keys if not _JSON_KEY.match(k)]
    if bad:
        raise ValueError(f"not an identifier: {bad}")
    if dialect == "postgresql":
        picked = [column.op("->")(literal_column(f"'{k}'")) for k in keys]
        return func.jsonb_build_array(*picked, type_=json_type())
    picked = [column.op("->")(literal_column(f"'$.{k}'")) for k in keys]
    return func.json_array(*picked, type_=json_type())


# Values per IN list of ``in_chunks``: bound parameters far below SQLite's (32,766) and asyncpg's
# (32,767) limits, a pair of columns' tuples included.
IN_CHUNK = 5000

V = TypeVar("V", str, tuple[str, str])


def in_chunks(values: Iterable[V]) -> Iterator[list[V]]:
    """``values`` in lists of at most ``IN_CHUNK``, each short enough for one ``IN (…)``; in
    order, so that transactions touching the same rows lock them in the same order."""
    ordered = sorted(values)
    for i in range(0, len(ordered), IN_CHUNK):
        yield ordered[i : i + IN_CHUNK]


def in_list(dialect: str, column: Any, name: str = "ids") -> Any:
    """``column`` IN the list bound as ``name``. On PostgreSQL ``column = ANY(:name)``, the list
    one array: an expanding IN has a placeholder per element, so each length of list is
    another statement, which SQLAlchemy compiled and PostgreSQL parsed, planned and prepared
    again (a rule publish's read of 400 movers spent more there than in reading them). On
    SQLite an expanding IN, whose elements are bound in C. Build the statement once."""
    if dialect == "postgresql":
        return column == any_(_array_param(name, column))
    return column.in_(bindparam(name, expanding=True))


async def migrate(db: Database, script_location: Path) -> None:
    """Bring the database to the newest Alembic revision. Several processes may call it at
    once: on PostgreSQL an advisory lock serialises them, on SQLite the write lock taken by
    BEGIN IMMEDIATE does."""
    from alembic import command  # noqa: PLC0415 - only at start-up
    from alembic.config import Config  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", str(script_location))

    async with db.engine.begin() as conn:
        if db.dialect == "postgresql":
            await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_lock_id(str(script_location))})")

        def run(sync_conn: Any) -> None:
            config.attributes["connection"] = sync_conn
            command.upgrade(config, "head")

        await conn.run_sync(run)


def _lock_id(name: str) -> int:
    import zlib  # noqa: PLC0415

    return zlib.crc32(name.encode())
