"""What rate limits cost: per request in microseconds, and in gateway throughput.

1. The guard alone: `admit` + `settle` of one request against a key with requests per
   minute and per day, tokens per minute and a concurrency cap (what a metered key
   typically has), on memory:// and on Redis, one request at a time and 32 at once.
2. The gateway under wrk (bench/throughput.py's servers: uvicorn, fake upstream, all on
   loopback), limits off, on memory://, on Redis; rounds interleaved, medians reported,
   with the gateway process's CPU time per request (the steadiest figure on a shared box).

Usage: python bench/ratelimit_bench.py [--redis redis://127.0.0.1:6379/0] [--duration 8]
       [--rounds 3] [--connections 32] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import ensure_wrk, free_port, run_wrk, serve  # noqa: E402

from gate_middleware import GateSettings, Gateway, Principal, RequestRecord  # noqa: E402

KEY = "sk-bench-0123456789"
# OpenAI's shape: requests and tokens a minute, plus a cap on requests in flight.
LIMITS = {
    "key": {"requests": "10000000/minute", "tokens": "1000000000/minute", "concurrency": 10000}
}
# Everything at once: a day limit too, a parent account, the model and the deployment.
HEAVY = {
    "key": {**LIMITS["key"], "requests": "10000000/minute;100000000/day"},
    "models": {"openai/gpt-4.1": {"requests": "10000000/minute"}},
    "deployments": {"fake": {"requests": "10000000/minute", "tokens": "1000000000/minute"}},
}


def _record(principal: Principal, n: int) -> RequestRecord:
    return RequestRecord(
        request_id=f"req_{n}",
        principal=principal,
        endpoint="chat.completions",
        model="openai/gpt-4.1",
        model_id="openai/gpt-4.1",
        provider="fake",
        upstream_model="gpt-4.1",
        estimated_prompt_tokens=12,
        max_completion_tokens=None,
    )


async def guard_cost(limits: dict[str, Any], requests: int, parallel: int, keys: int = 1) -> float:
    """CPU microseconds of admit + settle per request, in this process."""
    gateway = Gateway(GateSettings(api_keys=[KEY], rate_limits=limits))
    guard = gateway.rate_limiter
    principals = [Principal(f"key-{n}", "sk-bench...") for n in range(keys)]

    async def one(n: int, principal: Principal = principals[0]) -> None:
        record = _record(principal, n)
        await guard.admit(record)
        record.usage_reported, record.prompt_tokens, record.completion_tokens = True, 12, 16
        await guard.settle(record)

    async with gateway:
        for n, principal in enumerate(principals):  # other keys with live windows
            await one(n, principal)
        for n in range(min(requests // 10, 1000)):  # warm-up: connections, caches
            await one(n)
        started = time.process_time()
        if parallel == 1:
            for n in range(requests):
                await one(n)
                await asyncio.sleep(0)  # let background tasks run, as in a server
        else:
            for start in range(0, requests, parallel):
                await asyncio.gather(*(one(n) for n in range(start, start + parallel)))
        elapsed = time.process_time() - started
    return elapsed / requests * 1e6


def micro(redis_url: str | None) -> None:
    print("1. the guard alone: CPU per request for admit + settle")
    print("   limits: rpm + tpm + concurrency on the key, unless said otherwise")
    print(f"{'storage':<10}{'strategy / case':<34}{'one at a time':>15}{'32 at once':>13}")
    base = asyncio.run(guard_cost({}, 20000, 1))
    print(f"{'-':<10}{'no limits configured':<34}{base:>13.1f}us")
    stores: list[tuple[str, dict[str, Any], int]] = [("memory", {}, 20000)]
    prefix = f"gate-bench-{uuid.uuid4().hex[:8]}"
    if redis_url:
        stores.append(("redis", {"storage_uri": redis_url, "key_prefix": prefix}, 2000))
    for name, store, requests in stores:
        cases: list[tuple[str, dict[str, Any], int]] = [
            (strategy, {**LIMITS, "strategy": strategy}, 1)
            for strategy in ("fixed-window", "sliding-window-counter", "moving-window")
        ]
        cases.append(("fixed-window, rpd + model + upstream", {**HEAVY}, 1))
        if name == "memory":
            cases.append(("fixed-window, 10,000 keys in use", {**LIMITS}, 10000))
        for label, limits, keys in cases:
            limits = {**limits, **store}
            if name == "redis":
                limits["key_prefix"] = f"{prefix}-{len(label)}-{label[:5]}"
            serial = asyncio.run(guard_cost(limits, requests, 1, keys))
            burst = asyncio.run(guard_cost(limits, requests, 32, keys))
            print(f"{name:<10}{label:<34}{serial:>13.1f}us{burst:>11.1f}us")
    if redis_url:
        import redis

        with redis.Redis.from_url(redis_url) as client:
            stale = list(client.scan_iter(f"{prefix}*"))
            if stale:
                client.delete(*stale)


def throughput(redis_url: str | None, duration: int, rounds: int, connections: int) -> None:
    wrk = ensure_wrk()
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}/v1"
    env = {
        "BENCH_UPSTREAM": upstream_url,
        "GATE_API_KEYS": KEY,
        "GATE_PROVIDERS": json.dumps({"openai": {"base_url": upstream_url, "api_key": "up"}}),
    }
    limits_env = {
        "GATE_RATE_LIMITS__KEY__REQUESTS": LIMITS["key"]["requests"],
        "GATE_RATE_LIMITS__KEY__TOKENS": LIMITS["key"]["tokens"],
        "GATE_RATE_LIMITS__KEY__CONCURRENCY": str(LIMITS["key"]["concurrency"]),
    }
    configs = {"limits off": env, "memory://": {**env, **limits_env}}
    if redis_url:
        configs["redis://"] = {
            **env,
            **limits_env,
            "GATE_RATE_LIMITS__STORAGE_URI": redis_url,
            "GATE_RATE_LIMITS__KEY_PREFIX": f"gate-bench-{uuid.uuid4().hex[:8]}",
        }
    processes = [serve("_apps:upstream", up_port, env)]
    targets = {}
    try:
        for name, config in configs.items():
            port = free_port()
            processes.append(serve("_apps:gateway", port, config))
            targets[name] = (f"http://127.0.0.1:{port}/v1/chat/completions", processes[-1].pid)
        body = {"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "Hi."}]}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for url, pid in targets.values():
            run_wrk(wrk, url, body, 2, connections, pid)  # warm-up
        for _ in range(rounds):
            for name, (url, pid) in targets.items():
                results[name].append(run_wrk(wrk, url, body, duration, connections, pid))
        print(
            f"\n2. gateway throughput, non-streaming, wrk {connections} connections, "
            f"{rounds} x {duration}s each, medians"
        )
        print(f"{'limits':<12}{'req/s':>10}{'cpu ms/req':>12}{'non-2xx':>9}")
        medians = {}
        for name, runs in results.items():
            rps = statistics.median(r["rps"] for r in runs)
            cpu = statistics.median(r["cpu_ms"] for r in runs)
            errors = sum(r["errors"] for r in runs)
            medians[name] = (rps, cpu)
            print(f"{name:<12}{rps:>10.0f}{cpu:>12.3f}{errors:>9}")
        off_rps, off_cpu = medians["limits off"]
        for name in list(medians)[1:]:
            rps, cpu = medians[name]
            print(
                f"{name}: {1 - rps / off_rps:+.1%} fewer requests/s, "
                f"{cpu / off_cpu - 1:+.1%} CPU per request (target for memory: under 5%)"
            )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip Redis")
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    micro(args.redis or None)
    if not args.skip_throughput:
        throughput(args.redis or None, args.duration, args.rounds, args.connections)


if __name__ == "__main__":
    main()
