"""Settings every service shares, and what is said at start about the environment."""

from __future__ import annotations

import re
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared import config
from shared.config import (
    NOT_SETTINGS,
    NOT_SETTINGS_PREFIXES,
    CommonSettings,
    check_fx_table,
    setting_names,
    unknown_variables,
    warn_at_start,
)
from tests.support.logs import WarningRecorder

REPO = Path(__file__).resolve().parents[2]


def test_a_misspelt_variable_is_named_with_the_setting_it_misses() -> None:
    environ = {
        "RETAIN_MESSENGER_MPS_TOLLFREE": "10",  # the field is ..._TOLL_FREE: the default stayed
        "RETAIN_MESENGER_LINK_SECRET": "s3cret",
        "retain_kpi_timezone": "Asia/Jerusalem",  # settings read any case: known
        "RETAIN_SEGMENTER_GROUP_ID": "g",  # another service's: known everywhere
        "RETAIN_GRAFANA_KPI_DB_USER": "grafana",  # compose's, for Grafana
        "RETAIN_DB_PASSWORD": "x",
        "RETAIN_NOTHING_LIKE_IT": "1",
        "PATH": "/usr/bin",
    }
    assert unknown_variables(environ) == [
        ("RETAIN_MESENGER_LINK_SECRET", "RETAIN_MESSENGER_LINK_SECRET"),
        ("RETAIN_MESSENGER_MPS_TOLLFREE", "RETAIN_MESSENGER_MPS_TOLL_FREE"),
        ("RETAIN_NOTHING_LIKE_IT", None),
    ]


def test_the_start_warns_of_them_and_of_a_missing_keys_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = WarningRecorder()
    monkeypatch.setattr(config, "log", recorder)
    monkeypatch.setenv("RETAIN_KAFKA_BOOTSTRAPS", "broker:9092")
    settings = CommonSettings(var_dir=tmp_path)
    warn_at_start(settings)  # a worker: no keys to check
    assert [f for _, f in recorder.warnings] == [
        {"variable": "RETAIN_KAFKA_BOOTSTRAPS", "did_you_mean": "RETAIN_KAFKA_BOOTSTRAP"}
    ]
    warn_at_start(settings, api=True)
    event, fields = recorder.warnings[-1]
    assert "every request needing a key is refused" in event
    assert fields == {"api_keys_file": str(tmp_path / "api_keys.json")}
    (tmp_path / "api_keys.json").write_text("{}")
    monkeypatch.delenv("RETAIN_KAFKA_BOOTSTRAPS")
    before = len(recorder.warnings)
    warn_at_start(settings, api=True)
    assert len(recorder.warnings) == before


def test_every_retain_variable_the_repository_uses_is_a_setting_or_declared_not_one() -> None:
    """So that NOT_SETTINGS keeps up: a variable compose or a script reads, left out of it,
    would be warned of as a typo at every start."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    used: set[str] = set()
    for name in files.stdout.split():
        path = REPO / name
        if (
            path.suffix in {".py", ".yml", ".yaml", ".md", ".sh", ".env", ".json", ".ini", ""}
            and path.is_file()
        ):
            used.update(re.findall(r"\bRETAIN_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    stray = {
        n
        for n in used - setting_names() - NOT_SETTINGS
        if not n.startswith(NOT_SETTINGS_PREFIXES)
        # Names the docs give as families ("RETAIN_KPI_*") and this file's own examples.
        and n
        not in {"RETAIN_MESENGER_LINK_SECRET", "RETAIN_MESSENGER_MPS_TOLLFREE", "RETAIN_NOTHING_LIKE_IT"}
        and n not in {"RETAIN_KAFKA_BOOTSTRAPS", "RETAIN_X"}
    }
    assert stray == set()


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"log_level": "verbose"}, "log_level"),
        ({"ingest_max_future_s": "inf"}, "finite number"),
        ({"ingest_max_future_s": "nan"}, "finite number"),
        # "No limit" overflowed now + max_future: every ingest request answered 500.
        ({"ingest_max_future_s": "1e12"}, "less than or equal to 31622400"),
    ],
)
def test_common_settings_refuse_what_would_fail_later(values: dict[str, str], words: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(words)):
        CommonSettings(**values)  # type: ignore[arg-type]


def test_the_log_level_is_taken_as_logging_takes_it() -> None:
    assert CommonSettings(log_level="warning").log_level == "WARNING"
    assert CommonSettings(log_level="WARN").log_level == "WARNING"
    assert CommonSettings(log_level="fatal").log_level == "CRITICAL"


def test_an_exchange_table_for_another_reporting_currency_is_refused() -> None:
    check_fx_table("ILS", {"USD": Decimal("3.65"), "ILS": Decimal(1)}, "C", "R")
    with pytest.raises(ValueError, match=re.escape("R gives USD, the reporting currency (C), the rate 3.65")):
        check_fx_table("USD", {"USD": Decimal("3.65")}, "C", "R")
