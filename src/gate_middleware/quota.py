"""Quotas without overspend, with no database call on the hot path.

Each process keeps a `Purse` per account (and per key with a spend limit). A purse
holds money leased from the database by one conditional UPDATE (`leased += x WHERE
budget - spent - leased >= x`), so the leases of all processes together never exceed
what the account may spend. A request holds the most it can cost from the purse of
every level of its chain (in memory, no await), and on settlement gives back the
hold and spends the real cost; the spend reaches the database with the ledger rows,
taken off the lease in the same transaction. Used-up and idle leases go back (so a
purse under steady load keeps one or two, not one per top-up since it started); a
dead process's leases expire and are reclaimed by the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InsufficientQuotaError, ServiceUnavailableError
from .metering import LedgerWriter, Spends
from .storage import BalanceStore, Lease, Target

__all__ = ["LeaseBook", "Purse"]

logger = logging.getLogger("gate_middleware.quota")


@dataclass(slots=True)
class Purse:
    target: Target
    target_id: str
    free: int = 0  # leased, not held, not spent
    held: int = 0
    leases: list[Lease] = field(default_factory=list)
    used_up: list[Lease] = field(default_factory=list)  # spent to 0, to go back
    used: float = 0.0  # monotonic time of the last settlement
    # Wall-clock time until which every lease is surely still this purse's: the soonest
    # expiry last written. Past it another process may reclaim them (see `LeaseBook`).
    until: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def spend(self, cost: int, spends: Spends) -> None:
        """Take the cost off the leases, oldest first (each lease's `amount` here is what
        is left of it), into `spends`; the part no lease covers is spent all the same."""
        for lease in self.leases:
            if cost <= 0:
                break
            take = cost if cost < lease.amount else lease.amount
            if take > 0:
                lease.amount -= take
                cost -= take
                leased: tuple[Target, str, str | None] = (self.target, self.target_id, lease.id)
                spends[leased] = spends.get(leased, 0) + take
        if cost > 0:
            key = (self.target, self.target_id, None)
            spends[key] = spends.get(key, 0) + cost
        while self.leases and self.leases[0].amount == 0:
            self.used_up.append(self.leases.pop(0))


class LeaseBook:
    """This process's purses. `hold` and `settle` are the request path.

    A purse, once made, stays in the book: callers may keep it (`Accounting` does, per
    principal)."""

    def __init__(
        self,
        storage: BalanceStore,
        writer: LedgerWriter,
        *,
        slice_nanos: int,
        lease_seconds: float,
    ) -> None:
        self._storage = storage
        self._writer = writer
        self._slice = slice_nanos
        self._seconds = lease_seconds
        self.owner = f"proc_{uuid.uuid4().hex[:12]}"
        self._purses: dict[tuple[Target, str], Purse] = {}
        self._task: asyncio.Task[None] | None = None

    def purse(self, target: Target, target_id: str) -> Purse:
        key = (target, target_id)
        purse = self._purses.get(key)
        if purse is None:
            purse = self._purses[key] = Purse(target, target_id)
        return purse

    async def hold(self, purses: Sequence[Purse], amounts: Sequence[int]) -> None:
        """Hold each amount from its purse, leasing more where needed, or none (402)."""
        taken = 0
        now = time.time()
        try:
            for index, amount in enumerate(amounts):  # cheaper than a zip, per request
                purse = purses[index]
                if purse.leases and now >= purse.until:
                    await self._keep(purse)
                while purse.free < amount:  # `free` can drop while a lease is awaited
                    await self._top_up(purse, amount)
                purse.free -= amount
                purse.held += amount
                taken += 1
        except BaseException:
            for index in range(taken):
                purses[index].free += amounts[index]
                purses[index].held -= amounts[index]
            raise

    async def _top_up(self, purse: Purse, amount: int) -> None:
        async with purse.lock:
            if purse.free >= amount:
                return  # another request leased meanwhile
            need = amount - purse.free
            try:
                lease = await self._storage.lease(
                    purse.target,
                    purse.target_id,
                    need=need,
                    want=max(need, self._slice),
                    owner=self.owner,
                    expires_at=time.time() + self._seconds,
                )
            except Exception as exc:
                logger.error("Leasing from %s failed: %s", purse.target_id, exc)
                raise _unreachable() from None
            if lease is None:
                what = "account" if purse.target == "account" else "API key"
                raise InsufficientQuotaError(
                    f"The {what} '{purse.target_id}' has not enough balance left for this "
                    "request (its most possible cost is held before the call). Top it up, "
                    "or ask for fewer max_tokens.",
                )
            purse.until = min(purse.until, lease.expires_at) if purse.leases else lease.expires_at
            purse.leases.append(lease)
            purse.free += lease.amount

    async def _keep(self, purse: Purse) -> None:
        """Renew a purse's leases before it holds from them again: the upkeep could not
        (the database was out of reach), so another process may have reclaimed them."""
        async with purse.lock:
            if not purse.leases or time.time() < purse.until:
                return  # another request renewed them meanwhile
            sent = {lease.id for lease in purse.leases}
            try:
                renewed = await self._storage.renew(list(sent), time.time() + self._seconds)
            except Exception as exc:
                logger.error("Renewing the leases of %s failed: %s", purse.target_id, exc)
                raise _unreachable() from None
            self._renewed(purse, sent, renewed, time.time() + self._seconds)

    def _renewed(self, purse: Purse, sent: set[str], renewed: set[str], expires_at: float) -> None:
        """After a renewal: a lease sent that no longer exists was reclaimed by another
        process (this one seemed dead), and its money went back to the balance; it is
        dropped. What requests in flight hold from it is then owed (`free` below 0), and
        the next hold leases that too. A lease taken meanwhile stays as it is."""
        kept = []
        for lease in purse.leases:
            if lease.id in renewed:
                lease.expires_at = expires_at
                kept.append(lease)
            elif lease.id not in sent:
                kept.append(lease)
            else:
                logger.warning("Lease %s of %s was reclaimed; dropped.", lease.id, purse.target_id)
                purse.free -= lease.amount
        purse.leases = kept
        purse.until = min((lease.expires_at for lease in kept), default=0.0)

    def settle(
        self, purses: Sequence[Purse], held: Sequence[int], costs: Sequence[int], spends: Spends
    ) -> None:
        """Give back each hold and spend the real cost, added to `spends` (queued with
        the request's ledger rows); no await, so nothing interleaves."""
        now = time.monotonic()
        for index, amount in enumerate(held):
            purse, cost = purses[index], costs[index]
            purse.held -= amount
            purse.free += amount - cost
            purse.used = now
            purse.spend(cost, spends)

    async def give_back(self, target: Target, target_id: str) -> None:
        """Return the target's leases now, unless a request holds from them: a spend
        limit is being lowered, and an idle slice must not be what stands in its way."""
        purse = self._purses.get((target, target_id))
        if purse is not None:
            await self._return(purse)

    # Lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        for purse in self._purses.values():
            # Started again, perhaps on another event loop: a lock stays bound to the
            # loop it was first contended on (and every hold behind it was a 500).
            purse.lock = asyncio.Lock()
        self._task = asyncio.create_task(self._maintain(), name="gate-leases")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._writer.flush()
        for purse in list(self._purses.values()):
            await self._return(purse)

    async def _maintain(self) -> None:
        """Renew leases in use, return idle ones, reclaim those of dead processes."""
        while True:
            await asyncio.sleep(self._seconds / 3)
            try:
                await self.tidy()
            except Exception:
                logger.exception("Lease upkeep failed; will retry.")

    async def tidy(self) -> None:
        idle_after = time.monotonic() - self._seconds / 3
        renew: list[tuple[Purse, Lease]] = []
        used_up: list[Lease] = []
        for purse in list(self._purses.values()):
            used_up += purse.used_up
            purse.used_up = []
            if purse.held == 0 and purse.used < idle_after:
                await self._return(purse)
            else:
                renew.extend((purse, lease) for lease in purse.leases)
        if used_up:
            # Their spends reach the database first (see `_return`).
            await self._writer.flush()
            for lease in used_up:
                await self._storage.release(lease.id)
        if renew:
            expires_at = time.time() + self._seconds
            sent = {lease.id for _, lease in renew}
            renewed = await self._storage.renew(list(sent), expires_at)
            for purse in {id(purse): purse for purse, _ in renew}.values():
                self._renewed(purse, sent, renewed, expires_at)
        # Another process's lease is taken back only long after it stopped renewing.
        await self._storage.reclaim(time.time() - self._seconds)

    async def _return(self, purse: Purse) -> None:
        if not (purse.leases or purse.used_up) or purse.held:
            return
        leases = purse.leases + purse.used_up
        purse.leases, purse.used_up, purse.free = [], [], 0
        # Spends against these leases must reach the database before they go back.
        await self._writer.flush()
        for lease in leases:
            await self._storage.release(lease.id)


def _unreachable() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "Balances cannot be checked right now: their database is out of reach. "
        "Please try again shortly."
    )
