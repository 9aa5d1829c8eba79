"""Which provider status may replace which: a replayed or late callback never moves a message
backwards (queued → sent → delivered / undelivered / failed → read). Pure."""

from __future__ import annotations

# Twilio's message statuses, by how far along they are.
_RANK = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 0,
    "sending": 1,
    "sent": 2,
    "delivered": 3,
    "undelivered": 3,
    "failed": 3,
    "read": 4,  # WhatsApp: after delivered
}
TERMINAL = frozenset({"delivered", "undelivered", "failed", "read"})


def ours(provider_status: str) -> str | None:
    """Our ledger status for a provider status (None for statuses we do not track)."""
    return {
        "sent": "sent",
        "delivered": "delivered",
        "read": "delivered",
        "undelivered": "undelivered",
        "failed": "failed",
    }.get(provider_status)


def advances(current: str, incoming: str) -> bool:
    """Whether ``incoming`` (a provider status) may replace ``current`` (ours or provider's)."""
    if incoming not in _RANK:
        return False
    if current in ("undelivered", "failed"):
        return False  # a failure is final; a later 'delivered' would be a provider bug
    if current == "delivered":
        return incoming == "read"
    return _RANK[incoming] > _RANK.get(current, -1)
