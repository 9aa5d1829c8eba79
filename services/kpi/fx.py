"""Money in the reporting currency. Pure.

The same idea as the segmenter's ``segmenter_fx_rates``: a fixed table of units of the
reporting currency per unit of each other currency. A currency missing from the table is not
guessed: amounts in it are left out of money totals and counted as unconverted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class Fx:
    reporting_currency: str
    rates: Mapping[str, Decimal] = field(default_factory=dict)

    def rate(self, currency: str) -> Decimal | None:
        if currency == self.reporting_currency:
            return Decimal(1)
        return self.rates.get(currency)

    def convert(self, amount: Decimal, currency: str) -> Decimal | None:
        """``amount`` in the reporting currency, or None when there is no rate for ``currency``."""
        rate = self.rate(currency)
        return None if rate is None else amount * rate

    def fingerprint(self) -> str:
        """Changes whenever a conversion would: part of the CLV model cache key."""
        pairs = ",".join(f"{c}={r.normalize()}" for c, r in sorted(self.rates.items()))
        return f"{self.reporting_currency}|{pairs}"
