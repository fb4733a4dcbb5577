"""Ledger throughput: rows/s written through the batched writer, SQLite and PostgreSQL.

Each row is a full request row (as the gateway writes it) and every batch carries the
balance changes of its requests, spread over 50 accounts, all in one transaction per
batch: the same work the gateway's background writer does. Request ids as the
gateway makes them (a prefix per process and a counter: each index insert lands after
the last), and random ones, as clients that send their own `x-request-id` give (each
lands anywhere in the index on `id`: on SQLite that index costs more than the rest).
Usage: python bench/ledger.py [--rows 200000] [--batch 1000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid

from gate_middleware.metering import LedgerWriter
from gate_middleware.storage import Account, LedgerRow, Spend, storage_from_url

ACCOUNTS = 50


def request_row(i: int, account: str, rid: str = "") -> LedgerRow:
    return LedgerRow(
        id=rid or f"req_{uuid.uuid4().hex}", account_id=account, created=time.time(),
        amount=1234 + i,
        source_account_id=account, key_id="key_bench", key_prefix="sk-gate-abcdef",
        model="gpt-4.1", model_id="openai/gpt-4.1", provider="openai", upstream_model="gpt-4.1",
        prompt_tokens=12, completion_tokens=30, latency_ms=12.5, ttft_ms=3.1, status=200,
        attempts=1, app="bench",
    )  # fmt: skip


async def bench(url: str, rows: int, batch: int, ids: str) -> float:
    storage = storage_from_url(url)
    await storage.open()
    try:
        accounts = [f"acct_bench_{uuid.uuid4().hex[:8]}" for _ in range(ACCOUNTS)]
        for account in accounts:
            await storage.add_account(Account(id=account, name="bench", created_at=time.time()))
        prefix = uuid.uuid4().hex[:20]
        made = [
            request_row(
                i, accounts[i % ACCOUNTS], f"req_{prefix}{i:012x}" if ids == "gateway" else ""
            )
            for i in range(rows)
        ]
        writer = LedgerWriter(storage, batch=batch, interval=0.05)
        await writer.start()
        started = time.perf_counter()
        for start in range(0, rows, batch):
            chunk = made[start : start + batch]
            for row in chunk:
                writer.add((row,), (Spend("account", row.account_id or "", row.amount),))
            await asyncio.sleep(0)  # let the writer run, as a busy gateway would
        await writer.stop()
        elapsed = time.perf_counter() - started
        spent = 0
        for account in accounts:
            state = await storage.account(account)
            spent += state.spent if state else 0
        assert spent == sum(r.amount for r in made), "balances do not match the rows"
        return rows / elapsed
    finally:
        await storage.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "GATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args()
    print(f"{args.rows} rows, batches of {args.batch}")
    for ids in ("gateway", "random"):
        with tempfile.TemporaryDirectory() as tmp:
            rate = await bench(f"sqlite:///{tmp}/bench.db", args.rows, args.batch, ids)
            print(f"sqlite     {rate:>10,.0f} rows/s  (request ids: {ids})")
    schema = f"gate_bench_{uuid.uuid4().hex[:8]}"
    try:
        for ids in ("gateway", "random"):
            rate = await bench(f"{args.postgres}?schema={schema}", args.rows, args.batch, ids)
            print(f"postgresql {rate:>10,.0f} rows/s  (request ids: {ids})")
    except OSError as exc:
        print(f"postgresql skipped: {exc}")
    finally:
        try:
            import asyncpg

            conn = await asyncpg.connect(args.postgres)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()
        except Exception:
            pass


if __name__ == "__main__":
    asyncio.run(main())
