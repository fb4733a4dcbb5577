"""Prices and costs, exact: integer nanodollars (10^-9 USD), Decimal in between.

A catalogue price of P USD per million tokens is P * 1000 nanodollars per token. The
cost at each level of an account chain is the base cost times every multiplier from
the top account down to that level (a parent resells at its own markup), rounded
half up once, at the end, so no level pays for another level's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from .auth import Principal
from .routing import ModelEntry

__all__ = ["NANOS_PER_USD", "Price", "level_costs", "nanos_from_usd", "price_of", "usd"]

NANOS_PER_USD = 10**9
_PER_TOKEN = Decimal(1000)  # nanodollars per token for 1 USD per million tokens
_ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class Price:
    """Nanodollars per token."""

    prompt: Decimal
    completion: Decimal
    cached_prompt: Decimal

    def cost(self, prompt: int, completion: int, cached: int = 0) -> Decimal:
        cached = min(cached, prompt)
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


def _per_token(per_million: float | None) -> Decimal:
    # str() first: the float 0.1 is not the decimal 0.1.
    return Decimal(str(per_million or 0)) * _PER_TOKEN


def level_costs(base: Decimal, principal: Principal) -> list[int]:
    """What each account of the caller's chain is charged, root first."""
    costs, factor = [], _ONE
    last = len(principal.chain) - 1
    for index, level in enumerate(principal.chain):
        factor *= level.multiplier
        scaled = factor * principal.key_multiplier if index == last else factor
        costs.append(int((base * scaled).to_integral_value(ROUND_HALF_UP)))
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
