"""One contract, every backend: memory, SQLite and PostgreSQL behave the same."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from gate_middleware.storage import (
    Account,
    ApiKey,
    LedgerQuery,
    LedgerRow,
    Spend,
    Storage,
    StorageConflict,
    storage_from_url,
)

from .conftest import BACKENDS

pytestmark = pytest.mark.parametrize("database_url", BACKENDS, indirect=True)

NOW = 1_760_000_000.0


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    storage = storage_from_url(database_url)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


def account(id: str, parent: str | None = None, **fields: object) -> Account:
    return Account(id=id, name=id.upper(), parent_id=parent, created_at=NOW, **fields)  # type: ignore[arg-type]


def request_row(rid: str, acct: str, amount: int, **fields: object) -> LedgerRow:
    fields.setdefault("created", NOW)
    fields.setdefault("status", 200)
    fields.setdefault("source_account_id", acct)
    return LedgerRow(id=rid, account_id=acct, amount=amount, **fields)  # type: ignore[arg-type]


async def test_accounts_keys_and_chains(storage: Storage) -> None:
    await storage.add_account(
        account("a", multiplier=Decimal("1.5"), allowed_models=("openai/gpt-4.1",), rpm=60)
    )
    await storage.add_account(account("b", "a"))
    await storage.add_account(account("c", "b"))
    with pytest.raises(StorageConflict):
        await storage.add_account(account("a"))
    with pytest.raises(StorageConflict):
        await storage.add_account(account("x", "nobody"))

    chain = await storage.chain("c")
    assert [a.id for a in chain] == ["a", "b", "c"]
    assert chain[0].multiplier == Decimal("1.5") and chain[0].allowed_models == ("openai/gpt-4.1",)
    assert chain[0].rpm == 60 and chain[2].rpm is None
    assert await storage.chain("nobody") == []
    assert [a.id for a in await storage.children(None)] == ["a"]
    assert [a.id for a in await storage.children("a")] == ["b"]

    key = ApiKey(
        id="k1", account_id="c", name="ci", prefix="sk-gate-abc", digest="d1", created_at=NOW
    )
    await storage.add_key(key)
    with pytest.raises(StorageConflict):
        await storage.add_key(ApiKey(id="k2", account_id="c", name="dup", prefix="p", digest="d1"))
    with pytest.raises(StorageConflict):
        await storage.add_key(
            ApiKey(id="k3", account_id="nobody", name="n", prefix="p", digest="d3")
        )
    found = await storage.key_by_digest("d1")
    assert found is not None and found.id == "k1" and found.enabled
    assert await storage.key_by_digest("nope") is None
    updated = await storage.update_key("k1", {"enabled": False, "tpm": 1000})
    assert not updated.enabled and updated.tpm == 1000
    assert [k.id for k in await storage.keys("c")] == ["k1"]
    renamed = await storage.update_account("b", {"name": "Bee", "multiplier": Decimal("2")})
    assert renamed.name == "Bee" and renamed.multiplier == Decimal(2)
    with pytest.raises(StorageConflict):
        await storage.update_account("b", {"credits": 10**12})
    with pytest.raises(StorageConflict):
        await storage.update_account("nobody", {"name": "x"})


async def test_credit_and_adjustments_are_guarded(storage: Storage) -> None:
    await storage.add_account(account("a"))
    await storage.add_account(account("b", "a"))
    topped = await storage.credit(
        LedgerRow(id="t1", account_id="a", kind="topup", amount=1000, created=NOW, actor="admin")
    )
    assert topped.credits == 1000 and topped.available == 1000
    # A parent cannot give a child more than it has; nothing is written when refused.
    with pytest.raises(StorageConflict):
        await storage.credit(
            LedgerRow(id="t2", account_id="b", kind="topup", amount=1001, created=NOW), within="a"
        )
    child = await storage.credit(
        LedgerRow(id="t3", account_id="b", kind="topup", amount=600, created=NOW), within="a"
    )
    assert child.credits == 600
    with pytest.raises(StorageConflict):
        await storage.credit(
            LedgerRow(id="t4", account_id="a", kind="adjustment", amount=-1001, created=NOW)
        )
    with pytest.raises(StorageConflict):
        await storage.credit(LedgerRow(id="t5", account_id="nobody", kind="topup", amount=5))
    after = await storage.credit(
        LedgerRow(
            id="t6", account_id="a", kind="adjustment", amount=-400, created=NOW, note="refund"
        )
    )
    assert after.credits == 600
    entries = await storage.rows(LedgerQuery(account_id="a"))
    assert [(e.id, e.amount, e.kind) for e in entries] == [
        ("t6", -400, "adjustment"),
        ("t1", 1000, "topup"),
    ]
    assert entries[1].actor == "admin" and entries[0].note == "refund"


async def test_a_parent_gives_its_children_no_more_than_it_has(storage: Storage) -> None:
    """Top-ups add up: what the children hold unspent is no longer the parent's to give."""

    async def topup(account_id: str, amount: int) -> Account:
        row = LedgerRow(id=f"t{time.monotonic_ns()}", account_id=account_id, amount=amount)
        return await storage.credit(row, within="a")

    await storage.add_account(account("a"))
    await storage.add_account(account("b", "a"))
    await storage.add_account(account("c", "a"))
    await storage.credit(LedgerRow(id="t0", account_id="a", kind="topup", amount=1000))
    await topup("b", 600)
    with pytest.raises(StorageConflict, match="0.0000004 USD"):
        await topup("c", 401)
    assert (await topup("c", 400)).credits == 400
    with pytest.raises(StorageConflict):
        await topup("b", 1)
    # b spends 100 (its parent pays 50 of it at its own price): 50 is free again.
    await storage.write([], [Spend("account", "b", 100), Spend("account", "a", 50)])
    with pytest.raises(StorageConflict):
        await topup("c", 51)
    assert (await topup("c", 50)).credits == 450
    # Taking money back from a child gives the parent room again.
    await storage.credit(LedgerRow(id="t9", account_id="b", kind="adjustment", amount=-200))
    assert (await topup("b", 200)).credits == 600
    assert [a.credits for a in await storage.children("a")] == [600, 450]
    assert (await storage.account("a")).credits == 1000  # type: ignore[union-attr]

    # Concurrent top-ups of different children are checked one after another.
    await storage.add_account(account("p"))
    await storage.credit(LedgerRow(id="p0", account_id="p", kind="topup", amount=1000))
    for name in "vwxyz":
        await storage.add_account(account(name, "p"))

    async def give(name: str) -> bool:
        row = LedgerRow(id=f"g{name}", account_id=name, amount=300)
        try:
            await storage.credit(row, within="p")
        except StorageConflict:
            return False
        return True

    assert sum(await asyncio.gather(*(give(name) for name in "vwxyz"))) == 3


async def test_leases_never_exceed_the_budget(storage: Storage) -> None:
    await storage.add_account(account("a", spend_limit=800))
    await storage.credit(LedgerRow(id="t", account_id="a", kind="topup", amount=1000, created=NOW))
    # The spend limit (800) caps the credits (1000).
    first = await storage.lease("account", "a", need=100, want=500, owner="p1", expires_at=NOW)
    assert first is not None and first.amount == 500
    second = await storage.lease("account", "a", need=100, want=500, owner="p2", expires_at=NOW)
    assert second is not None and second.amount == 300
    assert await storage.lease("account", "a", need=1, want=10, owner="p3", expires_at=NOW) is None
    state = await storage.account("a")
    assert state is not None and state.leased == 800 and state.available == 0

    # Spend 120 from the first lease, then give the rest back.
    await storage.write([request_row("r1", "a", 120)], [Spend("account", "a", 120, first.id)])
    state = await storage.account("a")
    assert state is not None and (state.spent, state.leased) == (120, 680)
    await storage.release(first.id)
    await storage.release(first.id)  # twice is harmless
    state = await storage.account("a")
    assert state is not None and (state.spent, state.leased, state.available) == (120, 300, 380)
    with pytest.raises(StorageConflict):
        await storage.update_account("a", {"spend_limit": 100})  # below spent + held
    # An expired lease (its process died) comes back.
    assert await storage.reclaim(NOW + 1) == 1
    state = await storage.account("a")
    assert state is not None and (state.leased, state.available) == (0, 680)
    assert (await storage.update_account("a", {"spend_limit": 120})).available == 0


async def test_key_leases_and_unlimited_keys(storage: Storage) -> None:
    await storage.add_account(account("a"))
    await storage.add_key(
        ApiKey(id="k", account_id="a", name="k", prefix="p", digest="d", spend_limit=50)
    )
    lease = await storage.lease("key", "k", need=10, want=100, owner="p", expires_at=NOW)
    assert lease is not None and lease.amount == 50
    await storage.write([], [Spend("key", "k", 70, lease.id)])  # over the lease: still charged
    key = await storage.key("k")
    assert key is not None and (key.spent, key.leased) == (70, 0)
    # Only the leases that still exist are renewed (one reclaimed meanwhile is gone).
    assert await storage.renew([lease.id, "lease_gone"], NOW + 100) == {lease.id}
    assert await storage.reclaim(NOW + 50) == 0


async def test_one_batch_of_many_spends_lands_exactly(storage: Storage) -> None:
    """Accounts and keys, with and without a lease, one lease gone meanwhile."""
    for name in ("a", "b"):
        await storage.add_account(account(name))
        await storage.credit(
            LedgerRow(id=f"t{name}", account_id=name, kind="topup", amount=1000, created=NOW)
        )
    await storage.add_key(
        ApiKey(id="k", account_id="b", name="k", prefix="p", digest="d", spend_limit=500)
    )
    a1 = await storage.lease("account", "a", need=1, want=100, owner="p", expires_at=NOW)
    a2 = await storage.lease("account", "a", need=1, want=100, owner="p", expires_at=NOW)
    b1 = await storage.lease("account", "b", need=1, want=100, owner="p", expires_at=NOW)
    k1 = await storage.lease("key", "k", need=1, want=50, owner="p", expires_at=NOW)
    assert a1 and a2 and b1 and k1
    await storage.release(b1.id)  # gone before its spend lands: nothing comes off it
    spends = [
        Spend("key", "k", 80, k1.id),  # over its lease
        Spend("account", "a", 30, a1.id),
        Spend("account", "b", 40, b1.id),
        Spend("account", "a", 100, a2.id),
        Spend("account", "a", 5),
        Spend("key", "k", 7),
    ]
    rows = [request_row(f"r{i}", "a", 1) for i in range(3)]
    await storage.write(rows, spends)
    a, b, k = await storage.account("a"), await storage.account("b"), await storage.key("k")
    assert a is not None and (a.spent, a.leased) == (135, 70)
    assert b is not None and (b.spent, b.leased) == (40, 0)
    assert k is not None and (k.spent, k.leased) == (87, 0)
    assert len(await storage.rows(LedgerQuery(account_id="a", kind="request"))) == 3
    # What is left of each lease is what goes back.
    await storage.release(a1.id)
    await storage.release(a2.id)
    a = await storage.account("a")
    assert a is not None and (a.spent, a.leased, a.available) == (135, 0, 865)


async def test_concurrent_leases_are_atomic(storage: Storage) -> None:
    await storage.add_account(account("a"))
    await storage.credit(LedgerRow(id="t", account_id="a", kind="topup", amount=1000, created=NOW))
    leases = await asyncio.gather(
        *(
            storage.lease("account", "a", need=30, want=30, owner=f"p{i}", expires_at=NOW)
            for i in range(60)
        )
    )
    granted = [lease for lease in leases if lease is not None]
    assert len(granted) == 33  # 33 * 30 = 990 <= 1000
    state = await storage.account("a")
    assert state is not None and state.leased == 990


async def test_ledger_filters_pagination_and_overview(storage: Storage) -> None:
    await storage.add_account(account("a"))
    await storage.add_account(account("b", "a"))
    rows = []
    for i in range(25):
        rows.append(
            request_row(
                f"req{i}",
                "a",
                100 + i,
                created=NOW + i * 43_200,  # two a day
                model="gpt-4.1",
                model_id="openai/gpt-4.1" if i % 2 else "openai/gpt-4o",
                key_id="k1" if i < 10 else "k2",
                key_prefix="sk-gate-k1" if i < 10 else "sk-gate-k2",
                source_account_id="a" if i % 3 else "b",
                app="tool" if i % 5 == 0 else None,
                status=200 if i % 7 else 502,
                prompt_tokens=10,
                completion_tokens=i,
                estimated=i == 3,
            )
        )
    await storage.write(rows, [])
    await storage.write([request_row("other", "b", 5)], [])

    page1 = await storage.rows(LedgerQuery(account_id="a", limit=10))
    assert [r.id for r in page1] == [f"req{i}" for i in range(24, 14, -1)]
    page2 = await storage.rows(LedgerQuery(account_id="a", limit=10, before=page1[-1].seq))
    page3 = await storage.rows(LedgerQuery(account_id="a", limit=10, before=page2[-1].seq))
    assert [r.id for r in page2 + page3] == [f"req{i}" for i in range(14, -1, -1)]
    assert (await storage.rows(LedgerQuery(account_id="a", before=page3[-1].seq))) == []

    only = await storage.rows(LedgerQuery(account_id="a", model="openai/gpt-4o", status=502))
    assert {r.id for r in only} == {"req0", "req14"}
    ranged = await storage.rows(
        LedgerQuery(account_id="a", start=NOW + 43_200, end=NOW + 3 * 43_200)
    )
    assert [r.id for r in ranged] == ["req2", "req1"]
    assert [
        r.id for r in await storage.rows(LedgerQuery(account_id="a", key_id="k1", limit=2))
    ] == [
        "req9",
        "req8",
    ]
    row3 = await storage.by_request("req3", "a")
    assert row3 is not None and row3.estimated and row3.completion_tokens == 3
    assert await storage.by_request("req3", "b") is None

    by_day = await storage.overview(LedgerQuery(account_id="a"), "day")
    assert len(by_day) == 13 and by_day[0].key == time.strftime("%Y-%m-%d", time.gmtime(NOW))
    assert sum(g.requests for g in by_day) == 25
    assert sum(g.amount for g in by_day) == sum(100 + i for i in range(25))
    by_account = {g.key: g for g in await storage.overview(LedgerQuery(account_id="a"), "account")}
    assert by_account["b"].requests == 9 and by_account["a"].requests == 16
    by_app = {g.key: g.requests for g in await storage.overview(LedgerQuery(account_id="a"), "app")}
    assert by_app == {"tool": 5, None: 20}
    by_model = {g.key: g for g in await storage.overview(LedgerQuery(account_id="a"), "model")}
    assert by_model["openai/gpt-4o"].errors == 2 and by_model["openai/gpt-4.1"].errors == 2
    assert by_model["openai/gpt-4o"].completion_tokens == sum(range(0, 25, 2))
    keys = await storage.overview(LedgerQuery(account_id="a", start=NOW, end=NOW + 86_400), "key")
    assert [(g.key, g.requests) for g in keys] == [("sk-gate-k1", 2)]
    with pytest.raises(ValueError):
        await storage.overview(LedgerQuery(account_id="a"), "colour")
