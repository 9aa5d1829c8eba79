"""LocalPostgres: a real cluster, a real database, a real query, an immediate stop, a restart."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from shared.infra.postgres import LocalPostgres, find_pg_bin

pytestmark = pytest.mark.integration


def test_find_pg_bin_has_server_binaries() -> None:
    bin_dir = find_pg_bin()
    for name in ("initdb", "pg_ctl", "pg_isready", "psql", "postgres"):
        assert (bin_dir / name).is_file(), name


async def _insert(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE customers (id text PRIMARY KEY, name text, clv numeric)"))
            await conn.execute(
                text("INSERT INTO customers VALUES (:id, :name, :clv)"),
                [
                    {"id": "c-1", "name": "Dana", "clv": 120.5},
                    {"id": "c-2", "name": "ניר", "clv": 0},
                ],
            )
        async with engine.connect() as conn:
            result = await conn.execute(text("SELECT id, name, clv FROM customers ORDER BY id"))
            rows = result.all()
        assert [(r.id, r.name, float(r.clv)) for r in rows] == [
            ("c-1", "Dana", 120.5),
            ("c-2", "ניר", 0.0),
        ]
    finally:
        await engine.dispose()


async def _select(url: str) -> list[tuple[str, str]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text("SELECT id, name FROM customers ORDER BY id"))
            return [(r.id, r.name) for r in result]
    finally:
        await engine.dispose()


async def test_start_query_immediate_stop_restart(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "pg")
    try:
        admin_url = pg.start()
        assert admin_url == f"postgresql+asyncpg://postgres@127.0.0.1:{pg.port}/postgres"
        assert pg.is_running()
        assert (pg.data_dir / "PG_VERSION").is_file()
        # The unix socket lives under root/run, not in /var/run/postgresql.
        assert stat.S_ISSOCK((pg.socket_dir / f".s.PGSQL.{pg.port}").stat().st_mode)

        url = pg.create_database("retain_test")
        assert pg.create_database("retain_test") == url  # idempotent
        await _insert(url)

        # The insert was acknowledged with synchronous_commit=on (the default), so its WAL
        # reached the OS before COMMIT returned: it survives an immediate (crash-like) stop
        # even with fsync=off, because the kernel page cache outlives the server processes.
        pg.stop("immediate")
        assert not pg.is_running()
        pg.restart()
        assert pg.is_running()
        assert await _select(url) == [("c-1", "Dana"), ("c-2", "ניר")]
    finally:
        pg.stop("fast")
    assert not pg.is_running()
