"""What metering and quotas cost per request: the gateway with them off and on.

Starts the fake upstream and the demo gateway (one uvicorn worker each) three ways:
settings keys only (no accounting), on SQLite, and on PostgreSQL (a ledger row per
request, a quota hold and settlement, a lease now and then), and drives each with wrk.
Prints requests/s, p50/p99 and the gateway's own CPU time per request, and the
difference from "off". Usage: python bench/metering.py [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import uuid

from _servers import KEY, ensure_wrk, free_port, run_wrk, serve, stop

from gate_middleware.accounts import Accounts
from gate_middleware.auth import Principal
from gate_middleware.storage import storage_from_url

ADMIN = Principal(id="admin", key_hint="admin", admin=True)


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
    parser.add_argument("--duration", type=int, default=10)
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
    setups = {
        "off": ({**base, "GATE_API_KEYS": KEY}, KEY),
    }
    for name, url in (
        ("sqlite", f"sqlite:///{tmp}/bench.db"),
        ("postgresql", f"{args.postgres}?schema={schema}"),
    ):
        setups[name] = ({**base, "GATE_DATABASE_URL": url}, asyncio.run(funded_key(url)))
    # "off" again at the end: the machine and the upstream drift during a run, and the
    # two "off" rows show by how much.
    setups["off again"] = setups["off"]
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
        results: dict[str, dict[str, dict]] = {case: {} for case in cases}
        for name, (env, key) in setups.items():
            port = free_port()
            process = serve("gateway", port, env)
            processes.append(process)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            for case, body in cases.items():
                run_wrk(wrk, url, body, 2, args.connections, process.pid, key)  # warm-up
                results[case][name] = run_wrk(
                    wrk, url, body, args.duration, args.connections, process.pid, key
                )
            process.terminate()
            process.wait(30)
        print(f"wrk: {args.connections} connections, {args.duration}s each, one uvicorn worker")
        for case, rows in results.items():
            print(f"\n{case}")
            print(
                f"{'accounting':<12}{'req/s':>10}{'p50':>10}{'p99':>10}{'cpu ms/req':>12}"
                f"{'non-2xx':>9}{'vs off: req/s / cpu':>22}"
            )
            off = {k: (rows["off"][k] + rows["off again"][k]) / 2 for k in ("rps", "cpu_ms")}
            for name, r in rows.items():
                change = (
                    f"{r['rps'] / off['rps'] - 1:+.1%} / {r['cpu_ms'] / off['cpu_ms'] - 1:+.0%}"
                    if not name.startswith("off")
                    else ""
                )
                print(
                    f"{name:<12}{r['rps']:>10.0f}{r['p50']:>10}{r['p99']:>10}"
                    f"{r['cpu_ms']:>12.3f}{r['errors']:>9}{change:>22}"
                )
    finally:
        stop([p for p in processes if p.poll() is None])
        with contextlib.suppress(Exception):
            asyncio.run(drop(args.postgres, schema))


if __name__ == "__main__":
    main()
