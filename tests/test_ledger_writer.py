"""The batched ledger writer: what one flush writes, and every row once whatever fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from gate_middleware.metering import LedgerWriter
from gate_middleware.storage import (
    Account,
    LedgerQuery,
    LedgerRejected,
    LedgerRow,
    Spend,
    Storage,
    storage_from_url,
)

from .conftest import BACKENDS

NOW = 1_760_000_000.0


def row(rid: str) -> LedgerRow:
    return LedgerRow(id=rid, account_id="a", amount=1, created=NOW, status=200)


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    storage = storage_from_url(database_url)
    await storage.open()
    await storage.add_account(Account(id="a", name="A", created_at=NOW))
    try:
        yield storage
    finally:
        await storage.close()


async def written(storage: Storage) -> tuple[int, list[str]]:
    account = await storage.account("a")
    assert account is not None
    rows = await storage.rows(LedgerQuery(account_id="a", limit=10_000))
    return account.spent, sorted(r.id for r in rows)


@pytest.mark.parametrize("database_url", ["memory"], indirect=True)
async def test_a_flush_writes_what_was_queued_when_it_began(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = LedgerWriter(storage)
    real = storage.write
    batches: list[int] = []

    async def slow(rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool) -> None:
        batches.append(len(rows))
        if len(batches) == 1:  # a request that ends mid-write
            ledger.add([row("late")], [Spend("account", "a", 1)])
        await asyncio.sleep(0.01)
        await real(rows, spends, **kw)

    monkeypatch.setattr(storage, "write", slow)
    ledger.add([row(f"r{i}") for i in range(5)], [Spend("account", "a", 5)])
    await ledger.flush()
    # One write: the row that came meanwhile waits for the next round, not a write of
    # its own right after (a busy gateway wrote batch after small batch that way).
    assert batches == [5] and ledger.pending == 1
    assert await written(storage) == (5, [f"r{i}" for i in range(5)])
    await ledger.flush()
    assert batches == [5, 1]
    assert await written(storage) == (6, ["late", *(f"r{i}" for i in range(5))])


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_a_failed_batch_is_written_once_later_and_in_order(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = LedgerWriter(storage, batch=1)  # a flush writes 4 rows a transaction
    real = storage.write
    calls = 0

    async def second_fails(rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("the database went away")
        await real(rows, spends, **kw)

    monkeypatch.setattr(storage, "write", second_fails)
    ids = [f"r{i:02}" for i in range(10)]
    ledger.add([row(i) for i in ids], [Spend("account", "a", 10)])
    with pytest.raises(ConnectionError):
        await ledger.flush()
    # The first 4 rows are in; the failed 4 and the 2 never tried wait, in order, with
    # the balance change (it goes with the last rows).
    assert await written(storage) == (0, ids[:4])
    assert ledger.pending == 6
    await ledger.flush()
    assert await written(storage) == (10, ids)
    assert ledger.pending == 0


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_a_flush_cancelled_mid_write_counts_the_batch_once(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = storage.write

    async def slow_answer(rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool) -> None:
        await real(rows, spends, **kw)
        await asyncio.sleep(0.2)  # committed; the answer is still on its way

    monkeypatch.setattr(storage, "write", slow_answer)
    ledger = LedgerWriter(storage)
    ledger.add([row(f"r{i}") for i in range(3000)], [Spend("account", "a", 3000)])
    flushing = asyncio.ensure_future(ledger.flush())
    await asyncio.sleep(0.1)
    flushing.cancel()  # a shutdown, say
    with pytest.raises(asyncio.CancelledError):
        await flushing
    await asyncio.sleep(0.3)  # the write finishes on its own
    await ledger.flush()
    spent, ids = await written(storage)
    assert (spent, len(ids), len(set(ids))) == (3000, 3000, 3000)


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_a_batch_committed_before_its_connection_was_lost_is_not_written_twice(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database committed, then the connection dropped before the answer: the writer
    saw a failure. Trying the same batch again must not count it twice, and what came
    meanwhile is still written."""
    real = storage.write
    calls: list[bool] = []

    async def lost_after_commit(
        rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool
    ) -> None:
        calls.append(kw.get("again", False))
        await real(rows, spends, **kw)
        if len(calls) == 1:
            raise ConnectionResetError("connection lost after COMMIT")

    monkeypatch.setattr(storage, "write", lost_after_commit)
    ledger = LedgerWriter(storage)
    ledger.add([row(f"r{i}") for i in range(3)], [Spend("account", "a", 3)])
    with pytest.raises(ConnectionResetError):
        await ledger.flush()
    ledger.add([row("later")], [Spend("account", "a", 1)])
    await ledger.flush()
    assert calls == [False, True, False]
    assert await written(storage) == (4, ["later", "r0", "r1", "r2"])
    assert ledger.pending == 0


@pytest.mark.parametrize("database_url", ["memory"], indirect=True)
async def test_stop_waits_for_a_write_a_cancelled_flush_left_running(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown cancels a flush mid-write; the write goes on and then fails. `stop`
    must wait for it and write the batch again, not return with it still in the air."""
    real = storage.write
    calls = 0

    async def slow_then_lost(
        rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool
    ) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.2)
            raise ConnectionError("the database went away")
        await real(rows, spends, **kw)

    monkeypatch.setattr(storage, "write", slow_then_lost)
    ledger = LedgerWriter(storage)
    ledger.add([row("r0")], [Spend("account", "a", 1)])
    flushing = asyncio.ensure_future(ledger.flush())
    await asyncio.sleep(0.05)
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    await ledger.stop()
    assert calls == 2 and await written(storage) == (1, ["r0"])


@pytest.mark.parametrize("database_url", [b for b in BACKENDS if b != "memory"], indirect=True)
async def test_a_row_the_database_refuses_is_set_aside_and_the_rest_written(
    storage: Storage,
) -> None:
    """A value no database stores (an unpaired surrogate, a count past 64 bits) once
    made its batch fail on every retry, and every row queued after it with it; a
    graceful stop then raised. Now the refused rows are set aside, logged, and the
    others written with their balance changes."""
    ledger = LedgerWriter(storage, batch=100)
    bad_text = row("bad-text")._replace(model="openai/gpt-4.1\ud800")
    bad_count = row("bad-count")._replace(prompt_tokens=2**70)
    good = [row(f"r{i}") for i in range(6)]
    ledger.add([*good[:2], bad_text, *good[2:4], bad_count, *good[4:]], [Spend("account", "a", 8)])
    await ledger.flush()
    assert await written(storage) == (8, [r.id for r in good])
    assert sorted(r.id for r, _ in ledger.rejected) == ["bad-count", "bad-text"]
    assert ledger.pending == 0
    # Later rows are not held up, and a stop finishes.
    ledger.add([row("later")], [Spend("account", "a", 1)])
    await ledger.start()
    await ledger.stop()
    assert await written(storage) == (9, sorted(["later", *(r.id for r in good)]))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_database_out_of_reach_sets_nothing_aside(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a refusal of the values splits a batch: a failure to reach the database
    keeps the batch whole, to be written later."""
    import sqlite3

    ledger = LedgerWriter(storage)
    real = storage.write
    down = True

    async def flaky(rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool) -> None:
        if down:
            raise sqlite3.OperationalError("database is locked")
        await real(rows, spends, **kw)

    monkeypatch.setattr(storage, "write", flaky)
    ledger.add([row("r0"), row("r1")], [Spend("account", "a", 2)])
    with pytest.raises(sqlite3.OperationalError):
        await ledger.flush()
    assert ledger.rejected == [] and ledger.pending == 2
    down = False
    await ledger.flush()
    assert await written(storage) == (2, ["r0", "r1"])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_refused_batch_whose_split_loses_the_database_keeps_every_row(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch refused for one bad row is split; the database then went away on the
    first half. That half was kept, the rest of the batch vanished (six rows here)."""
    real = storage.write
    down = True

    async def flaky(rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool) -> None:
        nonlocal down
        if rows and len(rows) < 8 and down:
            down = False
            raise ConnectionError("the database went away")
        await real(rows, spends, **kw)

    monkeypatch.setattr(storage, "write", flaky)
    ledger = LedgerWriter(storage)
    good = [row(f"r{i}") for i in range(7)]
    ledger.add([*good[:3], row("bad")._replace(prompt_tokens=2**70), *good[3:]])
    ledger.merge({("account", "a", None): 8})
    with pytest.raises(ConnectionError):
        await ledger.flush()
    await ledger.flush()
    assert await written(storage) == (8, [r.id for r in good])
    assert [r.id for r, _ in ledger.rejected] == ["bad"] and ledger.pending == 0


@pytest.mark.parametrize("database_url", ["memory", "sqlite"], indirect=True)
async def test_a_refused_batch_of_a_cancelled_flush_is_not_lost(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush (a request's, for GET /ledger) cancelled while the database refuses its
    batch: the write went on, the refusal came with nobody left to split the batch,
    and every row and balance change of it was dropped."""
    real = storage.write

    async def slow(rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool) -> None:
        await asyncio.sleep(0.05)
        if any(r.id == "bad" for r in rows):  # as PostgreSQL refuses a NUL
            raise LedgerRejected("invalid byte sequence")
        await real(rows, spends, **kw)

    monkeypatch.setattr(storage, "write", slow)
    ledger = LedgerWriter(storage)
    good = [row(f"r{i}") for i in range(7)]
    ledger.add([*good[:3], row("bad"), *good[3:]], [Spend("account", "a", 8)])
    flushing = asyncio.ensure_future(ledger.flush())
    await asyncio.sleep(0.01)
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    await asyncio.sleep(0.1)  # the refusal arrives
    await ledger.flush()
    assert await written(storage) == (8, [r.id for r in good])
    assert [r.id for r, _ in ledger.rejected] == ["bad"] and ledger.pending == 0


@pytest.mark.parametrize("database_url", ["memory", "sqlite"], indirect=True)
async def test_the_balance_changes_of_a_refused_first_row_go_with_the_next_rows(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first row refused: its batch's balance changes were written alone, a batch
    no first row can vouch for. Committed, then the connection lost before the answer,
    they were written again on the retry: the account charged twice."""
    real = storage.write
    lost = False

    async def flaky(rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool) -> None:
        nonlocal lost
        if any(r.id == "bad" for r in rows):  # as PostgreSQL refuses a NUL
            raise LedgerRejected("invalid byte sequence")
        await real(rows, spends, **kw)
        if spends and not lost:
            lost = True  # committed; the answer never came
            raise ConnectionError("the database went away")

    monkeypatch.setattr(storage, "write", flaky)
    ledger = LedgerWriter(storage)
    ledger.add([row("bad"), row("g1"), row("g2")], [Spend("account", "a", 8)])
    with pytest.raises(ConnectionError):
        await ledger.flush()
    await ledger.flush()
    assert await written(storage) == (8, ["g1", "g2"])
    assert [r.id for r, _ in ledger.rejected] == ["bad"] and ledger.pending == 0


@pytest.mark.parametrize("database_url", ["memory", "sqlite"], indirect=True)
async def test_balance_changes_the_database_refuses_set_no_row_aside(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The balance changes refused (PostgreSQL: spent past BIGINT), not a row: they
    went with the first half down to the first row, which was set aside, never in the
    ledger, though the database stores it."""
    real = storage.write

    async def refusing(rows: Sequence[LedgerRow], spends: Sequence[Spend], **kw: bool) -> None:
        if any(s.amount > 2**40 for s in spends):
            raise LedgerRejected("bigint out of range")
        await real(rows, spends, **kw)

    monkeypatch.setattr(storage, "write", refusing)
    ledger = LedgerWriter(storage)
    good = [row(f"g{i}") for i in range(4)]
    ledger.add(good, [Spend("account", "a", 2**41)])
    await ledger.flush()
    assert await written(storage) == (0, [r.id for r in good])
    assert ledger.rejected == [] and ledger.pending == 0 and not ledger.spends
