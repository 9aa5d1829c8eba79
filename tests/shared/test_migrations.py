"""Each service's Alembic migrations build exactly the tables its code declares: a table, column
or index added to tables.py without a migration (or the reverse) fails here, not in production."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from services.kpi import tables as kpi_tables
from services.messenger import tables as messenger_tables
from services.segmenter import tables as segmenter_tables
from shared.config import REPO_ROOT
from shared.db import Database, migrate

SERVICES: dict[str, MetaData] = {
    "segmenter": segmenter_tables.metadata,
    "messenger": messenger_tables.metadata,
    "kpi": kpi_tables.metadata,
}


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_migrations_match_the_declared_tables(service: str, tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    try:
        await migrate(db, REPO_ROOT / "services" / service / "migrations")
        async with db.engine.connect() as conn:

            def diff(sync_conn: Any) -> list[Any]:
                context = MigrationContext.configure(sync_conn, opts={"compare_type": False})
                return list(compare_metadata(context, SERVICES[service]))

            differences = await conn.run_sync(diff)
    finally:
        await db.dispose()
    # alembic_version is Alembic's own; anything else is drift.
    drift = [d for d in differences if "alembic_version" not in repr(d)]
    assert drift == [], f"{service}: migrations and tables.py differ: {drift}"
