"""Prices and costs, exact: integer nanodollars (10^-9 USD), integers in between.

A catalogue price of P USD per million tokens is P * 10^9 femtodollars (10^-15 USD) per
token, an integer for any price with at most 9 decimals. The cost at each level of an
account chain is the base cost times every multiplier from the top account down to
that level (a parent resells at its own markup), each multiplier an exact ratio of
integers, rounded half up to nanodollars once, at the end, so no level pays for
another level's rounding. Integers, not Decimal: the same exact answer in a tenth of
the time. A caller's ratios (`level_rates`) are worked out once per principal, since
costs are counted twice on every request (the hold, then the charge).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from .auth import Principal
from .routing import ModelEntry

__all__ = [
    "NANOS_PER_USD",
    "Price",
    "Rates",
    "level_costs",
    "level_rates",
    "nanos_from_usd",
    "price_of",
    "usd",
]

NANOS_PER_USD = 10**9
_FEMTOS_PER_NANO = 10**6

# Per level of a chain, root first: (2 x top, bottom, 2 x bottom), where a level is
# charged base x top / bottom nanodollars for a base in femtodollars.
Rates = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class Price:
    """Femtodollars (10^-15 USD) per token."""

    prompt: int
    completion: int
    cached_prompt: int

    def cost(self, prompt: int, completion: int, cached: int = 0) -> int:
        """In femtodollars."""
        if cached > prompt:
            cached = prompt
        return (
            (prompt - cached) * self.prompt
            + cached * self.cached_prompt
            + completion * self.completion
        )


def price_of(entry: ModelEntry) -> Price | None:
    """The entry's price, or None when the catalogue has none for it."""
    if entry.input_price is None and entry.output_price is None:
        return None
    prompt = _per_token(entry.input_price)
    cached = prompt if entry.cached_input_price is None else _per_token(entry.cached_input_price)
    return Price(prompt, _per_token(entry.output_price), cached)


def _per_token(per_million: float | None) -> int:
    # str() first: the float 0.1 is not the decimal 0.1.
    femtos = Decimal(str(per_million or 0)) * NANOS_PER_USD
    return int(femtos.to_integral_value(ROUND_HALF_UP))


def level_rates(principal: Principal) -> Rates:
    """The exact ratio each account of the caller's chain pays, root first: the
    multipliers from the top down to it (and the key's own at the last level)."""
    rates = []
    top, bottom = 1, _FEMTOS_PER_NANO
    last = len(principal.chain) - 1
    for index, level in enumerate(principal.chain):
        n, d = level.multiplier.as_integer_ratio()
        top, bottom = top * n, bottom * d
        own_top, own_bottom = top, bottom
        if index == last and principal.key_multiplier != 1:
            n, d = principal.key_multiplier.as_integer_ratio()
            own_top, own_bottom = top * n, bottom * d
        rates.append((2 * own_top, own_bottom, 2 * own_bottom))
    return tuple(rates)


def level_costs(base: int, rates: Rates) -> list[int]:
    """What each level is charged in nanodollars for `base` femtodollars: half up, for
    the non-negative amounts costs are."""
    costs = []
    for top2, bottom, bottom2 in rates:  # a loop: a comprehension is one more call
        costs.append((base * top2 + bottom) // bottom2)
    return costs


def nanos_from_usd(value: Decimal | int | float | str) -> int:
    """Exact: raises ValueError for amounts finer than a nanodollar or not numbers."""
    amount = Decimal(str(value)) * NANOS_PER_USD
    if not amount.is_finite() or amount != amount.to_integral_value():
        raise ValueError(f"{value!r} is not an amount in USD with at most 9 decimals.")
    return int(amount)


def usd(nanos: int) -> float:
    """For JSON answers that tools read as numbers; the ledger itself stays integer."""
    return nanos / NANOS_PER_USD
