"""Schemathesis against every service's own OpenAPI, with a valid admin key: no 5xx, and every
response fits the schema its operation documents (status code and body).

Excluded: the provider webhooks (form bodies checked against a signature: every generated case
is a 403, which says nothing; test_webhooks.py covers them). No check is excluded. Examples are
derandomized so a failure in CI reproduces locally; the bound (30 per operation) keeps the file
under a minute.

The schemas are read at import from apps that are never started (the OpenAPI does not depend on
settings); each case is then sent to a running app of the module, whose lifespan schemathesis
runs on its own event loop. State carries over from case to case, as it would in production.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance
from schemathesis.python.asgi import shutdown_lifespans

from shared.topics import all_topic_names, ensure_topics
from tests.hostile.apps import SERVICES, Keys, build
from tests.support.infra import KafkaHandle, PostgresHandle

pytestmark = pytest.mark.integration

AnyCase = schemathesis.Case[Any]
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
BOUNDED = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
WEBHOOKS = r"^/webhooks/"


def _spec(service: str) -> schemathesis.BaseSchema:
    spec_app = build(service, Path("/nonexistent"), keys=Path("/nonexistent/keys.json"))
    schema = schemathesis.openapi.from_dict(spec_app.openapi())
    schema.app = spec_app  # selects the ASGI transport; every call names the app that answers
    return schema


SCHEMAS = {service: _spec(service) for service in SERVICES}


class Running:
    def __init__(self, apps: dict[str, FastAPI], key: str) -> None:
        self.apps = apps
        self.key = key

    def check(self, service: str, case: AnyCase) -> None:
        case.call_and_validate(
            app=self.apps[service], headers={"Authorization": f"Bearer {self.key}"}, checks=CHECKS
        )


@pytest.fixture(scope="module")
def running(
    kafka: KafkaHandle, postgres: PostgresHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    tmp_path = tmp_path_factory.mktemp("schemathesis")
    unique = uuid.uuid4().hex[:10]
    prefix = f"t{unique}.retain."
    asyncio.run(ensure_topics(kafka.bootstrap, all_topic_names(prefix), partitions=1))
    keys = tmp_path / "keys.json"
    apps = {
        service: build(
            service,
            tmp_path,
            keys=keys,
            kafka_bootstrap=kafka.bootstrap,
            topic_prefix=prefix,
            database_url=None if service == "ingest" else postgres.create_database(f"st_{service}_{unique}"),
        )
        for service in SERVICES
    }
    yield Running(apps, Keys(keys).make(["admin"]))
    shutdown_lifespans()


@SCHEMAS["ingest"].parametrize()
@BOUNDED
def test_ingest(case: AnyCase, running: Running) -> None:
    running.check("ingest", case)


@SCHEMAS["segmenter"].parametrize()
@BOUNDED
def test_segmenter(case: AnyCase, running: Running) -> None:
    running.check("segmenter", case)


@SCHEMAS["messenger"].exclude(path_regex=WEBHOOKS).parametrize()
@BOUNDED
def test_messenger(case: AnyCase, running: Running) -> None:
    running.check("messenger", case)


@SCHEMAS["kpi"].parametrize()
@BOUNDED
def test_kpi(case: AnyCase, running: Running) -> None:
    running.check("kpi", case)
