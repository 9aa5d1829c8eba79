"""deploy/postgres/init.sh and init.sql, as the postgres image runs them on compose's first
start, against a fresh real cluster: the roles get the passwords compose passes in (quoted by
psql, whatever they hold), and each role gets what docs/operations.md says."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from shared.config import REPO_ROOT
from shared.infra.postgres import HOST, SUPERUSER, LocalPostgres
from tests.support.infra import TEST_VAR

pytestmark = pytest.mark.integration

INIT = REPO_ROOT / "deploy" / "postgres"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalPostgres]:
    root = TEST_VAR / f"pginit-{uuid.uuid4().hex[:6]}"
    server = LocalPostgres(root)
    server.start()
    try:
        yield server
    finally:
        server.stop("fast")
        shutil.rmtree(root, ignore_errors=True)


def psql(cluster: LocalPostgres, sql: str, database: str = "postgres", user: str = SUPERUSER) -> str:
    result = subprocess.run(
        [
            str(cluster.bin_dir / "psql"),
            "-X",
            "-q",
            "-At",
            "-h",
            HOST,
            "-p",
            str(cluster.port),
            "-U",
            user,
            "-d",
            database,
        ],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def scram_matches(verifier: str, password: str) -> bool:
    """Whether PostgreSQL's stored SCRAM-SHA-256 verifier is the one of ``password`` (RFC 5802)."""
    method, rest = verifier.split("$", 1)
    assert method == "SCRAM-SHA-256"
    params, keys = rest.split("$")
    iterations, salt = params.split(":")
    stored_key, _server_key = keys.split(":")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), base64.b64decode(stored_key))


def test_the_roles_get_compose_s_passwords_and_their_grants(cluster: LocalPostgres) -> None:
    retain_password = "it's a s3cret; DROP ROLE postgres; --"
    grafana_password = 'quote " and backslash \\'
    env = {
        **os.environ,
        "PGHOST": HOST,
        "PGPORT": str(cluster.port),
        "POSTGRES_USER": SUPERUSER,
        "RETAIN_DB_PASSWORD": retain_password,
        "RETAIN_GRAFANA_KPI_DB_PASSWORD": grafana_password,
        "RETAIN_INIT_SQL": str(INIT / "init.sql"),
        "PATH": f"{cluster.bin_dir}:{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        ["bash", str(INIT / "init.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr

    verifiers = dict(
        line.split("|", 1)
        for line in psql(
            cluster,
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ('retain', 'grafana_reader')",
        ).splitlines()
    )
    assert scram_matches(verifiers["retain"], retain_password)
    assert scram_matches(verifiers["grafana_reader"], grafana_password)
    assert not scram_matches(verifiers["retain"], "retain")  # not the local default
    assert (
        psql(cluster, "SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres'") == "t"
    )  # nothing injected

    owners = psql(
        cluster,
        "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
        "WHERE datname IN ('segmenter', 'messenger', 'kpi') ORDER BY datname",
    )
    assert owners.splitlines() == ["kpi|retain", "messenger|retain", "segmenter|retain"]
    connect = psql(
        cluster,
        "SELECT datname, has_database_privilege('grafana_reader', datname, 'CONNECT') FROM pg_database "
        "WHERE datname IN ('segmenter', 'messenger', 'kpi') ORDER BY datname",
    )
    assert connect.splitlines() == ["kpi|t", "messenger|f", "segmenter|f"]
    # A table the kpi service creates later (as retain) is readable by Grafana's role, not writable.
    psql(cluster, "SET ROLE retain; CREATE TABLE kpi_probe (n int); INSERT INTO kpi_probe VALUES (1);", "kpi")
    assert psql(cluster, "SET ROLE grafana_reader; SELECT n FROM kpi_probe;", "kpi") == "1"
    assert psql(cluster, "SELECT has_table_privilege('grafana_reader', 'kpi_probe', 'INSERT')", "kpi") == "f"
