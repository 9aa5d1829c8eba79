"""Chaos: the whole pipeline under kills, broker and database restarts and rebalances, checked
against an oracle (``make chaos``; a short version runs in ``make test``)."""
