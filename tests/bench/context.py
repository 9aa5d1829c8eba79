"""What every section gets: the options, and shared infrastructure started on first use."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from tests.bench.infra import KafkaInfo, kafka_cluster


@dataclass(frozen=True)
class Options:
    seconds: float  # the timed window of each measurement
    warmup: float  # load before each window, not counted
    concurrency: int  # keep-alive connections of the load generator
    rounds: int  # each measurement is repeated, interleaved with the others; medians are reported
    partitions: int  # of every topic the bench creates
    profile: bool  # also run ingest under cProfile and print where its time goes


class BenchContext:
    """Sections ask for Kafka here; it starts once and stops when the whole run ends."""

    def __init__(self, options: Options, stack: contextlib.ExitStack) -> None:
        self.options = options
        self.stack = stack
        self._kafka: KafkaInfo | None = None

    def kafka(self) -> KafkaInfo:
        if self._kafka is None:
            self._kafka = self.stack.enter_context(kafka_cluster(self.options.partitions))
        return self._kafka

    @property
    def kafka_version(self) -> str | None:
        return self._kafka.version if self._kafka is not None else None
