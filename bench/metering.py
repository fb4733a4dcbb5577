"""What metering and quotas cost per request: the gateway with them off and on.

Starts the fake upstream and the demo gateway (one uvicorn worker each) five ways:
settings keys only (no accounting), on SQLite (ledger written by its writer process, and
from a thread), on PostgreSQL (a ledger row per request, a quota hold and settlement, a
lease now and then), and on PostgreSQL with the ledger's writes dropped (what the
request path's accounting costs by itself), and drives each with wrk.
Prints requests/s, p50/p99 and the gateway's own CPU time per request, and the
difference from "off", in interleaved rounds. Usage: python bench/metering.py
[--duration 5] [--rounds 3] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

from _servers import KEY, ensure_wrk, free_port, run_wrk, serve, stop

from gate_middleware.accounts import Accounts
from gate_middleware.auth import Principal
from gate_middleware.storage import LedgerRow, Spend, storage_from_url

ADMIN = Principal(id="admin", key_hint="admin", admin=True)


def unwritten_gateway() -> Any:
    """The demo gateway whose ledger batches (rows and spends) go nowhere."""
    from gate_middleware.demo import create_app

    app = create_app(tune=True)

    async def nowhere(
        rows: Sequence[LedgerRow], spends: Sequence[Spend], *, again: bool = False
    ) -> None:
        pass

    app.state.gateway.accounting.storage.write = nowhere
    return app


async def funded_key(url: str) -> str:
    storage = storage_from_url(url)
    await storage.open()
    try:
        accounts = Accounts(storage, max_credit=10**18)
        account = await accounts.create_account(ADMIN, {"name": "bench"})
        await accounts.credit(ADMIN, account.id, {"amount_usd": "100000"}, kind="topup")
        return (await accounts.create_key(ADMIN, account.id, {"name": "bench"}))[1]
    finally:
        await storage.close()


async def drop(postgres: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(postgres)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "GATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args()
    wrk = ensure_wrk()
    tmp = tempfile.mkdtemp()
    schema = f"gate_bench_{uuid.uuid4().hex[:8]}"
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}/v1"
    base = {
        "BENCH_UPSTREAM": upstream_url,
        "GATE_PROVIDERS": json.dumps({"openai": {"base_url": upstream_url, "api_key": "up"}}),
    }
    postgres = f"{args.postgres}?schema={schema}"
    setups = {
        "off": ("gateway", {**base, "GATE_API_KEYS": KEY}, KEY),
    }
    for name, target, url in (
        ("sqlite", "gateway", f"sqlite:///{tmp}/bench.db"),
        ("sqlite/thread", "gateway", f"sqlite:///{tmp}/thread.db?writer=thread"),
        ("postgresql", "gateway", postgres),
        ("pg, no writes", "metering:unwritten_gateway", postgres),
    ):
        env = {**base, "GATE_DATABASE_URL": url}
        setups[name] = (target, env, asyncio.run(funded_key(url)))
    processes = [serve("upstream", up_port, base)]
    try:
        messages = [{"role": "user", "content": "Benchmark me."}]
        cases = {
            "non-streaming": {"model": "openai/gpt-4.1", "messages": messages, "max_tokens": 16},
            "streaming": {
                "model": "openai/gpt-4.1",
                "messages": messages,
                "stream": True,
                "max_tokens": 16,
            },
        }
        targets = {}
        for name, (target, env, key) in setups.items():
            port = free_port()
            processes.append(serve(target, port, env))
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            targets[name] = (url, processes[-1].pid, key)
        # Rounds interleaved, medians compared: the machine drifts during a run.
        results: dict[str, dict[str, list[dict]]] = {
            case: {name: [] for name in targets} for case in cases
        }
        for case, body in cases.items():
            for url, pid, key in targets.values():
                run_wrk(wrk, url, body, 2, args.connections, pid, key)  # warm-up
            for _ in range(args.rounds):
                for name, (url, pid, key) in targets.items():
                    results[case][name].append(
                        run_wrk(wrk, url, body, args.duration, args.connections, pid, key)
                    )
        print(
            f"wrk: {args.connections} connections, {args.rounds} rounds of {args.duration}s, "
            "one uvicorn worker; medians (CPU: the gateway's process and its ledger writer)"
        )
        for case, rows in results.items():
            print(f"\n{case}")
            print(
                f"{'accounting':<14}{'req/s':>10}{'cpu ms/req':>12}{'p99':>10}"
                f"{'vs off: req/s / cpu':>22}   req/s by round"
            )
            off = {k: statistics.median(r[k] for r in rows["off"]) for k in ("rps", "cpu_ms")}
            for name, runs in rows.items():
                rps = statistics.median(r["rps"] for r in runs)
                cpu = statistics.median(r["cpu_ms"] for r in runs)
                change = (
                    f"{rps / off['rps'] - 1:+.1%} / {cpu / off['cpu_ms'] - 1:+.0%}"
                    if name != "off"
                    else ""
                )
                rounds_text = ", ".join(f"{r['rps']:.0f}" for r in runs)
                print(
                    f"{name:<14}{rps:>10.0f}{cpu:>12.3f}{runs[-1]['p99']:>10}"
                    f"{change:>22}   {rounds_text}"
                )
    finally:
        stop([p for p in processes if p.poll() is None])
        with contextlib.suppress(Exception):
            asyncio.run(drop(args.postgres, schema))


if __name__ == "__main__":
    main()
