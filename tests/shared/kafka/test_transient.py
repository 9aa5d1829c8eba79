"""Which errors the consumer loop (and the sender) wait out instead of dead-lettering a batch."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from shared.kafka.consumer import is_transient


class _PgError(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    "sqlstate",
    [
        "57P03",  # the database system is not yet accepting connections (crash recovery)
        "57P01",  # terminating connection due to administrator command
        "08006",  # connection failure
        "53300",  # too many connections
    ],
)
def test_a_restarting_database_is_waited_out(sqlstate: str) -> None:
    assert is_transient(DBAPIError("SELECT 1", {}, _PgError(sqlstate)))


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
def test_a_transaction_the_server_rolled_back_for_another_is_run_again(sqlstate: str) -> None:
    """A deadlock (40P01) or a serialization failure (40001): the other transaction went on,
    and this one, run again, succeeds; its records are not poison."""
    assert is_transient(DBAPIError("UPDATE", {}, _PgError(sqlstate)))


@pytest.mark.parametrize("sqlstate", [None, "23505", "42P01", "22P02", "40002"])
def test_errors_in_the_data_or_the_sql_are_not(sqlstate: str | None) -> None:
    assert not is_transient(DBAPIError("SELECT 1", {}, _PgError(sqlstate)))
    assert not is_transient(IntegrityError("INSERT", {}, _PgError(sqlstate)))


def test_the_earlier_rules_hold() -> None:
    assert is_transient(DBAPIError("SELECT 1", {}, _PgError(None), connection_invalidated=True))
    assert is_transient(OperationalError("SELECT 1", {}, _PgError(None)))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(ValueError("bad record"))
