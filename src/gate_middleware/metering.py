"""Metering: what a request cost at each level, and the ledger rows, written in batches.

`LedgerWriter.add` is a list append on the request's path; a background task writes
the batch (rows and the balance changes with them, in one transaction) every
`interval` or as soon as `batch` rows wait. `stop` writes whatever is left, so a
graceful shutdown loses no row.

A batch the database refuses for what it holds (`LedgerRejected`: a value it cannot
store) is written in halves, down to the rows it refuses on their own: those are
logged and kept in `rejected`, the rest written. Retried whole, such a batch would
stop every row after it, for good. The balance changes are applied all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence

from .pricing import Price, Rates, level_costs
from .record import RequestRecord
from .storage import LedgerRejected, LedgerRow, LedgerStore, Spend, Target

__all__ = ["LedgerWriter", "Spends", "ledger_rows", "request_cost"]

logger = logging.getLogger("gate_middleware.ledger")

_MAX_REJECTED = 1000  # rows the database refused, kept for a look


# Balance changes waiting for the next batch: (target, id, lease id) -> nanodollars.
Spends = dict[tuple[Target, str, str | None], int]


def request_cost(record: RequestRecord, price: Price | None, rates: Rates) -> list[int]:
    """Per level of the caller's chain (`rates`, root first); estimates usage the
    upstream withheld."""
    if record.usage_estimated:
        record.prompt_tokens = record.prompt_tokens or record.estimated_prompt_tokens
        record.completion_tokens = record.completion_tokens or record.estimated_completion_tokens
    if price is None:
        return [0] * len(rates)
    base = price.cost(record.prompt_tokens, record.completion_tokens, record.cached_tokens)
    return level_costs(base, rates)


def ledger_rows(record: RequestRecord, costs: Sequence[int], now: float) -> list[LedgerRow]:
    """One row per level (each with what that level was charged), or one without account.

    Made positionally, in `LedgerRow`'s field order (test_metering checks it), from one
    list of values that each level's row copies: `LedgerRow(...)`, by keyword or not,
    costs three times as long, on every request.
    """
    principal = record.principal
    values = [
        record.request_id,
        None,  # account_id: each level's
        "request",
        now,
        0,  # amount: each level's
        principal.account_id,
        principal.key_id,
        principal.key_hint.removesuffix("..."),
        record.model or None,
        record.model_id,
        record.provider,
        record.upstream_model,
        record.prompt_tokens,
        record.completion_tokens,
        record.cached_tokens,
        record.reasoning_tokens,
        record.latency_ms,
        record.ttft_ms,
        record.status,
        record.error_code,
        record.attempts,
        record.app,
        record.stream,
        record.usage_estimated,  # estimated
        record.route,
        record.parent_id,
        None,  # actor
        None,  # note
        None,  # seq
    ]
    if not principal.chain:
        return [_row(values)]
    rows = []
    for index, level in enumerate(principal.chain):  # cheaper than a zip, per request
        values[1], values[4] = level.account_id, costs[index]
        rows.append(_row(values))
    return rows


# A row from a tuple of all its values, with no Python-level call.
_row = functools.partial(tuple.__new__, LedgerRow)


class LedgerWriter:
    def __init__(self, storage: LedgerStore, *, batch: int = 1000, interval: float = 0.2) -> None:
        self._storage = storage
        self._batch = batch
        self._interval = interval
        self._rows: list[LedgerRow] = []
        # Added to by `merge`, with the rows they go with (see Accounting.record).
        self.spends: Spends = {}
        # Batches whose write failed, kept whole: one may have been committed all the
        # same (the connection lost after COMMIT), which only the whole batch can tell.
        self._failed: list[tuple[list[LedgerRow], list[Spend]]] = []
        self._writing: set[asyncio.Future[None]] = set()  # left running by a cancelled flush
        # Rows the database refused on their own (see the module's docstring), latest last.
        self.rejected: list[tuple[LedgerRow, str]] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pending(self) -> int:
        return len(self._rows) + sum(len(rows) for rows, _ in self._failed)

    def add(self, rows: Sequence[LedgerRow], spends: Sequence[Spend] = ()) -> None:
        self._rows.extend(rows)
        for spend in spends:
            key = (spend.target, spend.target_id, spend.lease_id)
            self.spends[key] = self.spends.get(key, 0) + spend.amount
        if len(self._rows) >= self._batch:
            self._wake.set()

    def merge(self, spends: Spends) -> None:
        """Queue a request's balance changes (call it with its rows, no await between:
        a batch's spends then always travel with rows, whose first one tells whether a
        failed batch was committed)."""
        queued = self.spends
        for key, amount in spends.items():
            queued[key] = queued.get(key, 0) + amount

    async def start(self) -> None:
        # Made anew each start: asyncio's Event and Lock stay bound to the first event
        # loop that waited on them, and a gateway may be started again on another (a
        # test's TestClient per test): the writer's task then died at once.
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="gate-ledger-writer")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        # Until nothing is left: a request still finishing may add rows meanwhile, and
        # a write a cancelled flush left running may yet fail (its batch then kept).
        while self._rows or self.spends or self._failed or self._writing:
            if self._writing:
                await asyncio.wait(set(self._writing))
            await self.flush()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                # The batch stays queued; the next round tries again.
                logger.exception("Writing %d ledger rows failed; will retry.", self.pending)

    def _requeue(
        self, write: asyncio.Future[None], *, rows: list[LedgerRow], spends: list[Spend]
    ) -> None:
        # A refused batch too: the flush that waits for it takes it back to split it,
        # but a cancelled flush no longer waits, and the batch must not vanish.
        if write.cancelled() or write.exception() is not None:
            self._failed.append((rows, spends))

    async def _write(
        self, rows: list[LedgerRow], spends: list[Spend], *, again: bool
    ) -> list[Spend]:
        """Write a batch, a refused one in parts (see `_split`); the balance changes
        that no row could carry (its rows all refused), to go with the next rows."""
        try:
            await self._attempt(rows, spends, again=again)
        except LedgerRejected as exc:
            return await self._split(rows, spends, str(exc))
        return []

    async def _attempt(self, rows: list[LedgerRow], spends: list[Spend], *, again: bool) -> None:
        # Shielded: a cancelled flush (a shutdown) must not leave a batch half known.
        # The write goes on; only if it fails is the batch kept to try again, so it is
        # never both written and queued (a refused one is split at once instead).
        write = asyncio.ensure_future(self._storage.write(rows, spends, again=again))
        write.add_done_callback(functools.partial(self._requeue, rows=rows, spends=spends))
        self._writing.add(write)
        write.add_done_callback(self._writing.discard)
        try:
            await asyncio.shield(write)
        except LedgerRejected:
            self._failed = [entry for entry in self._failed if entry[0] is not rows]
            raise

    async def _split(self, rows: list[LedgerRow], spends: list[Spend], reason: str) -> list[Spend]:
        """A refused batch (nothing of it written): its halves, each on its own, the
        spends with the first rows written; a row refused alone is set aside. Returns
        the spends if every row was refused.

        The spends never go alone while a row can carry them: a batch without rows
        cannot tell, written again, whether it was committed the first time."""
        if len(rows) > 1:
            half = len(rows) // 2
            try:
                spends = await self._write(rows[:half], spends, again=False)
            except BaseException:
                # Out of reach or cancelled meanwhile: the second half is kept as well.
                self._failed.append((rows[half:], []))
                raise
            return await self._write(rows[half:], spends, again=False)
        if not rows:  # balance changes alone, refused: nothing else to blame
            logger.error("The database refused balance changes %s: %s", spends, reason)
            return []
        if spends:
            # Refused with the batch's balance changes: the row alone tells which.
            try:
                await self._attempt(rows, [], again=False)
            except LedgerRejected:
                pass  # the row: set aside below, its spends go on with the next rows
            except BaseException:
                # The row is kept (or still being written); the spends, written with
                # nothing, wait for the next batch.
                self._carry(spends)
                raise
            else:
                logger.error("The database refused balance changes %s: %s", spends, reason)
                return []
        for row in rows:
            logger.error(
                "The database refused ledger row %s (%s, account %s, %d nanodollars; "
                "the balance is charged all the same): %s",
                row.id,
                row.kind,
                row.account_id,
                row.amount,
                reason,
            )
            if len(self.rejected) >= _MAX_REJECTED:
                del self.rejected[0]
            self.rejected.append((row, reason))
        return spends

    async def flush(self) -> None:
        """Write what is queued when the write starts; waits for a write already under way.

        Rows added during the write wait for the next round: draining until empty kept a
        busy gateway writing small batches back to back (measured on PostgreSQL: a
        transaction every ~35 ms of ~130 rows, where the interval allows 5 a second).
        """
        async with self._lock:
            while self._failed:  # first, in order: what failed before
                self._carry(await self._write(*self._failed.pop(0), again=True))
            left = len(self._rows)
            if not (left or self.spends):
                return
            while True:
                size = min(left, self._batch * 4)
                rows, self._rows = self._rows[:size], self._rows[size:]
                left -= size
                spends = []
                if not left:  # the balance changes go with the last rows
                    spends = [Spend(t, i, n, lease) for (t, i, lease), n in self.spends.items()]
                    self.spends = {}
                self._carry(await self._write(rows, spends, again=False))
                if not left:
                    return

    def _carry(self, spends: list[Spend]) -> None:
        """Balance changes whose rows were all refused: they go with the next rows."""
        self.merge({(s.target, s.target_id, s.lease_id): s.amount for s in spends})
