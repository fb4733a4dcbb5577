"""`Guard`: a step every metered request passes before and after its upstream call.

Rate limits, quotas and ledgers are guards. `admit` runs once the model is known and
may refuse (raise a `GateError`, e.g. 429 or 402) or add response headers through
`record.headers`; `settle` runs exactly once for every admitted request, whatever
happened to it (success, upstream error, client gone), with the usage that was seen.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .record import RequestRecord

__all__ = ["Guard"]


@runtime_checkable
class Guard(Protocol):
    async def admit(self, record: RequestRecord) -> None:
        """Check and reserve; raise a GateError to refuse the request."""

    async def settle(self, record: RequestRecord) -> None:
        """Correct what `admit` reserved to what the request really used."""
