"""Benchmarks: ``make bench`` (``python -m tests.bench``).

Every number is reported as a ratio against a baseline measured in the same run on the same
machine; absolute numbers are printed for context only. Nothing here passes or fails: a
target that is not met is shown as such in the table.

Sections (``--only NAME``) are functions returning a :class:`tests.bench.report.Section`;
see ``tests/bench/__main__.py`` for the registry.
"""
