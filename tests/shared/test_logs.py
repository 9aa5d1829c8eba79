"""shared.logs: what reaches the operator's log, at which level."""

from __future__ import annotations

import logging

import pytest

from shared.logs import configure_logging

COORDINATOR = "aiokafka.consumer.group_coordinator"


def test_a_coordinator_not_there_yet_is_a_warning_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    configure_logging()
    configure_logging()  # again, as every process start does: one filter, not two
    log = logging.getLogger(COORDINATOR)
    assert len(log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=COORDINATOR):
        # aiokafka's own words (group_coordinator.py) for the transient, then for a real failure.
        log.error("Group Coordinator Request failed: %s", "[Error 15] GroupCoordinatorNotAvailableError")
        log.error("Group Coordinator Request failed: %s", "[Error 30] GroupAuthorizationFailedError")
    levels = [
        (r.levelname, r.getMessage().rsplit(" ", 1)[-1]) for r in caplog.records if r.name == COORDINATOR
    ]
    assert levels == [
        ("WARNING", "GroupCoordinatorNotAvailableError"),
        ("ERROR", "GroupAuthorizationFailedError"),
    ]
