"""Whether text from a request can be stored. Pure.

PostgreSQL refuses a NUL character in TEXT and JSONB ("\\u0000" in JSON), and no database
driver can encode a lone surrogate ("\\ud800" in JSON) as UTF-8. Either would fail deep in a
query as a 500, so the API refuses them up front as a 422 that names where they are.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")
_BAD_KEY = object()


def _bad(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def unstorable_paths(value: object, path: str = "$") -> list[str]:
    """JSON paths of the strings (object keys too) in ``value`` that cannot be stored. A loop,
    not recursion: the JSON may be nested as deep as the parser allowed."""
    found: list[str] = []
    stack: list[tuple[object, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if item is _BAD_KEY or (isinstance(item, str) and _bad(item)):
            found.append(where)
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if isinstance(key, str) and _bad(key):
                    stack.append((child, f"{where}[?]"))
                    stack.append((_BAD_KEY, f"{where}[?]"))  # popped first: the key, then its value
                else:
                    stack.append((child, f"{where}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in reversed(list(enumerate(item))))
    return found


def storable(value: T) -> T:
    """``value`` itself, or ValueError naming each string that cannot be stored (a pydantic
    ``AfterValidator``: it becomes a 422 naming the field)."""
    paths = unstorable_paths(value)
    if paths:
        shown = ", ".join(paths[:5]) + (" …" if len(paths) > 5 else "")
        raise ValueError(f"NUL characters and lone surrogates are not allowed (at {shown})")
    return value
