"""Where a profiled server spent its time: a cProfile dump summarised as markdown.

Self time (``tottime``) is grouped by where the code lives, so the groups add up to the whole
run; cProfile's per-call overhead inflates Python-heavy code relative to C, so read the shares
as a ranking rather than exact fractions.
"""

from __future__ import annotations

import pstats
from collections import defaultdict
from pathlib import Path
from typing import Any

from shared.config import REPO_ROOT
from tests.bench.report import table

_REPO = f"{REPO_ROOT}/"

# (substring of the file path or built-in's name, group), first match wins
_FILE_GROUPS: tuple[tuple[str, str], ...] = (
    ("services/ingest/", "ingest service code"),
    ("/shared/", "shared/ code (auth, http, errors)"),
    ("/phonenumbers/", "validators: phonenumbers"),
    ("/babel/", "validators: babel locale"),
    ("/email_validator/", "validators: email"),
    ("/zoneinfo/", "validators: zoneinfo"),
    ("/pydantic", "pydantic (python side)"),
    ("/aiokafka/", "aiokafka producer"),
    ("/fastapi/", "fastapi"),
    ("/starlette/", "starlette"),
    ("/uvicorn/", "uvicorn http protocol"),
    ("/prometheus_client/", "prometheus_client metrics"),
    ("/structlog/", "logging"),
    ("/logging/", "logging"),
    ("/asyncio/", "asyncio (python side)"),
    ("/anyio/", "anyio"),
)
_BUILTIN_GROUPS: tuple[tuple[str, str], ...] = (
    ("uvloop", "event loop in C (uvloop, includes idle waits)"),
    ("select", "event loop in C (uvloop, includes idle waits)"),
    ("_hashlib", "auth: sha256 of the key"),
    ("hmac", "auth: sha256 of the key"),
    ("compare_digest", "auth: sha256 of the key"),
    ("orjson", "json (orjson)"),
    ("pydantic_core", "pydantic core (validate / serialize)"),
    ("validate_python", "pydantic core (validate / serialize)"),
    ("to_json", "pydantic core (validate / serialize)"),
    ("lz4", "aiokafka producer"),
    ("crc32c", "aiokafka producer"),
    ("_json", "json (stdlib)"),
    ("uuid", "uuid"),
)


def _group(filename: str, name: str) -> str:
    if filename == "~":
        for needle, group in _BUILTIN_GROUPS:
            if needle in name:
                return group
        return "other built-ins"
    path = filename.replace("\\", "/")
    for needle, group in _FILE_GROUPS:
        if needle in path:
            return group
    if "/json/" in path:
        return "json (stdlib)"
    return "other python"


def _where(filename: str, line: int, name: str) -> str:
    if filename == "~":
        return name
    short = filename.rsplit("site-packages/", maxsplit=1)[-1].removeprefix(_REPO)
    return f"{name} ({short}:{line})"


# Functions whose cumulative time tells the request path apart (matched by name).
_PATH_FUNCTIONS = (
    "__call__",  # middlewares and apps, filtered by file below
    "post_events",
    "_limited_writer",
    "dependency",
    "authenticate",
    "_read_body",
    "parse_body",
    "validate_batch",
    "accept",
    "_produce",
    "send_all",
    "send",
    "solve_dependencies",
    "run_endpoint_function",
    "render",
    "encode_event",
    "observe",
    "inc",
    "labels",
)


def summarize(prof: Path, top: int = 25) -> list[str]:
    stats: Any = pstats.Stats(str(prof))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats
    total = sum(v[2] for v in raw.values()) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in raw.items():
        groups[_group(filename, name)] += tt
    lines = [f"Self time by area ({total:.1f} s profiled in the ingest process):", ""]
    lines += table(
        ["area", "self time", "share"],
        [[g, f"{t:.2f} s", f"{t / total:.1%}"] for g, t in sorted(groups.items(), key=lambda kv: -kv[1])],
        align="lrr",
    )
    busy = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    lines += ["", f"Top {top} functions by self time:", ""]
    lines += table(
        ["function", "calls", "self", "cumulative"],
        [[_where(*k), str(v[1]), f"{v[2]:.2f} s", f"{v[3]:.2f} s"] for k, v in busy],
        align="lrrr",
    )
    path = [
        (k, v)
        for k, v in raw.items()
        if k[2] in _PATH_FUNCTIONS
        and (
            (k[0].startswith(_REPO) and "site-packages" not in k[0])
            or "/fastapi/" in k[0]
            or "/aiokafka/producer/producer.py" in k[0]
        )
    ]
    path.sort(key=lambda kv: -kv[1][3])
    lines += ["", "The request path (cumulative time; a coroutine's counts only while it runs):", ""]
    lines += table(
        ["function", "calls", "cumulative", "per call"],
        [
            [_where(*k), str(v[1]), f"{v[3]:.2f} s", f"{v[3] / max(v[1], 1) * 1e6:.0f} µs"]
            for k, v in path[:top]
        ],
        align="lrrr",
    )
    return lines


def _package(filename: str, name: str) -> str:
    """Where a function lives, coarsely: the repo's top package and service, a library, or C."""
    if filename == "~":
        for needle, group in _BUILTIN_GROUPS:
            if needle in name and not group.startswith(("auth", "event loop")):
                return group
        if "poll" in name or "select" in name:
            return "event loop waiting (idle, or awaiting the DB thread / broker)"
        return "other built-ins"
    path = filename.replace("\\", "/")
    if path.startswith(_REPO) and "site-packages" not in path:
        parts = path.removeprefix(_REPO).split("/")
        return "/".join(parts[:2]) + "/" if parts[0] == "services" else parts[0] + "/"
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/asyncio/" in path:
        return "asyncio"
    return "other python (stdlib)"


def where_time_goes(
    prof: Path, *, roots: tuple[str, ...] = ("services/", "shared/"), top: int = 25
) -> list[str]:
    """Self time by package, then the top cumulative entries of the repo's own code.

    For code run in-process (a consumer loop rather than a server under load): the profile
    covers the thread that ran the event loop; work in other threads (aiosqlite's) shows up as
    the loop waiting for it.
    """
    stats: Any = pstats.Stats(str(prof))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats
    total = sum(v[2] for v in raw.values()) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in raw.items():
        groups[_package(filename, name)] += tt
    lines = [f"Self time by package ({total:.1f} s profiled on the event-loop thread):", ""]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])
    lines += table(
        ["package", "self time", "share"],
        [[g, f"{t:.2f} s", f"{t / total:.1%}"] for g, t in ranked[:top]],
        align="lrr",
    )
    ours = [
        (k, v)
        for k, v in raw.items()
        if k[0].startswith(_REPO)
        and "site-packages" not in k[0]
        and k[0].removeprefix(_REPO).startswith(roots)
    ]
    ours.sort(key=lambda kv: -kv[1][3])
    lines += [
        "",
        f"Top {top} entries of {', '.join(roots)} by cumulative time (a coroutine's time counts only "
        "while it runs, not while it awaits):",
        "",
    ]
    lines += table(
        ["function", "calls", "self", "cumulative", "per call"],
        [
            [
                _where(*k),
                str(v[1]),
                f"{v[2]:.2f} s",
                f"{v[3]:.2f} s",
                f"{v[3] / max(v[1], 1) * 1e6:,.0f} µs",
            ]
            for k, v in ours[:top]
        ],
        align="lrrrr",
    )
    return lines
