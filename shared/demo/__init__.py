"""The demo: a seeded stream of realistic backend events, and a sender that posts it to ingest."""

from shared.demo.generator import DemoEvent, generate

__all__ = ["DemoEvent", "generate"]
