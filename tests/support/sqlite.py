"""A repository's SQLite database for its tests, and how SQLite runs the repository's reads:
EXPLAIN QUERY PLAN of the statements themselves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import Database, migrate


@asynccontextmanager
async def migrated(path: Path, migrations: Path) -> AsyncIterator[Database]:
    """A SQLite database at ``path``, run inline as the workers run theirs, migrated to the
    newest revision of ``migrations``; disposed on the way out."""
    database = Database(f"sqlite+aiosqlite:///{path}", inline_sqlite=True)
    try:
        await migrate(database, migrations)
        yield database
    finally:
        await database.dispose()


async def plans(db: Database, read: Callable[[AsyncSession], Awaitable[object]]) -> list[str]:
    """The plan of each SELECT that ``read`` runs in a read session, with its own parameters,
    its steps joined by "; " (e.g. "SEARCH messages USING INDEX ix_messages_customer (…)")."""
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with db.sessions() as session:
            await read(session)
            connection = await session.connection()
            out: list[str] = []
            for statement, parameters in statements:
                rows = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
                # (id, parent, notused, detail) per step of the plan
                out.append("; ".join(str(step.detail) for step in rows))
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", seen)
    return out
