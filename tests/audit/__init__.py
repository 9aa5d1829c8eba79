"""Dependency audit: pip-audit on every package in ``uv.lock`` (``make audit``, part of ``make lint``).

``python -m tests.audit`` picks its source of advisories — the live OSV API, PyPI's JSON API, or a
dated snapshot of the PyPA advisory database served by :mod:`tests.audit.osv` on 127.0.0.1 — and
says which. Exceptions, each with its reason, are in ``tests/audit/exceptions.toml``.
"""
