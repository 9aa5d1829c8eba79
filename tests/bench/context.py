"""What every section gets: the options, and shared infrastructure started on first use."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from tests.bench.infra import KafkaInfo, PostgresInfo, kafka_cluster, postgres_cluster


@dataclass(frozen=True)
class Options:
    seconds: float  # the timed window of each measurement
    warmup: float  # load before each window, not counted
    concurrency: int  # keep-alive connections of the load generator
    rounds: int  # each measurement is repeated, interleaved with the others; medians are reported
    partitions: int  # of every topic the bench creates
    profile: bool  # also run each section under cProfile and print where its time goes
    scale: float = 1.0  # data sizes of the consumer sections (1 = the issues' sizes)


class BenchContext:
    """Sections ask for Kafka and PostgreSQL here; each starts once and stops when the whole
    run ends."""

    def __init__(self, options: Options, stack: contextlib.ExitStack) -> None:
        self.options = options
        self.stack = stack
        self._kafka: KafkaInfo | None = None
        self._postgres: PostgresInfo | None = None

    def kafka(self) -> KafkaInfo:
        if self._kafka is None:
            self._kafka = self.stack.enter_context(kafka_cluster(self.options.partitions))
        return self._kafka

    def postgres(self) -> PostgresInfo:
        if self._postgres is None:
            self._postgres = self.stack.enter_context(postgres_cluster())
        return self._postgres

    @property
    def kafka_version(self) -> str | None:
        return self._kafka.version if self._kafka is not None else None

    @property
    def postgres_version(self) -> str | None:
        return self._postgres.version if self._postgres is not None else None
