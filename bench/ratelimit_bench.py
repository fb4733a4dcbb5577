"""What rate limits cost: per request in microseconds, and in gateway throughput.

1. The guard alone: `admit` + `settle` of one request, on memory:// and on Redis, for
   each strategy, one request at a time and 32 at once (CPU time of this process).
2. The whole gateway app in this process (ASGI calls, the built-in fake provider, no
   sockets): CPU per request with limits off and on, rounds interleaved. The steadiest
   figure for what limits add to a request on a shared machine.
3. The gateway under wrk (bench/_servers.py's servers: uvicorn, fake upstream, all on
   loopback), limits off, on memory://, on Redis: requests/s and the gateway process's
   CPU per request, rounds interleaved, medians and every round shown. And "6 headers":
   limits off, answering with the six x-ratelimit-* headers all the same (a guard that
   writes them), for what OpenAI's headers cost on their own.

Limits: requests and tokens a minute and a cap on requests in flight, on one key (the
shape of OpenAI's limits), set high enough never to refuse.

Usage: python bench/ratelimit_bench.py [--redis redis://127.0.0.1:6379/0] [--duration 8]
       [--rounds 3] [--connections 32] [--skip-guard] [--skip-app] [--skip-throughput]
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

from _servers import KEY, ensure_wrk, free_port, run_wrk, serve, stop  # noqa: E402

from gate_middleware import GateSettings, Gateway, Principal, RequestRecord  # noqa: E402
from gate_middleware.demo import create_app  # noqa: E402
from gate_middleware.retry import Candidate  # noqa: E402

LIMITS: dict[str, Any] = {
    "key": {"requests": "10000000/minute", "tokens": "1000000000/minute", "concurrency": 10000}
}
# Everything at once: a day limit too, the model's and the upstream's limits.
HEAVY: dict[str, Any] = {
    "key": {**LIMITS["key"], "requests": "10000000/minute;100000000/day"},
    "models": {"openai/gpt-4.1": {"requests": "10000000/minute"}},
    "deployments": {"fake": {"requests": "10000000/minute", "tokens": "1000000000/minute"}},
}
BODY = {"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "Hi."}]}


def _prefix() -> str:
    return f"gate-bench-{uuid.uuid4().hex[:8]}"


def _forget(redis_url: str | None, prefixes: list[str]) -> None:
    if not redis_url:
        return
    import redis

    with redis.Redis.from_url(redis_url) as client:
        for prefix in prefixes:
            stale = list(client.scan_iter(f"{prefix}:*"))
            if stale:
                client.delete(*stale)


# 1. The guard alone -------------------------------------------------------------------


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
    )


async def guard_cost(limits: dict[str, Any], requests: int, parallel: int, keys: int = 1) -> float:
    """CPU microseconds of admit + settle per request, in this process."""
    gateway = Gateway(GateSettings(api_keys=[KEY], rate_limits=limits))
    guard = gateway.rate_limiter
    entry = gateway.catalogue.resolve("openai/gpt-4.1")
    candidate = Candidate(entry, entry.deployments[0])
    principals = [Principal(f"key-{n}", "sk-bench...") for n in range(keys)]

    async def one(n: int, principal: Principal = principals[0]) -> None:
        record = _record(principal, n)
        await guard.admit(record)
        await guard.reach(record, candidate)  # the one attempt at the upstream
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


def guard(redis_url: str | None) -> None:
    print("1. the guard alone: CPU per request for admit + settle")
    print(f"{'storage':<10}{'strategy / case':<34}{'one at a time':>15}{'32 at once':>13}")
    base = asyncio.run(guard_cost({}, 20000, 1))
    print(f"{'-':<10}{'no limits configured':<34}{base:>13.1f}us")
    stores: list[tuple[str, dict[str, Any], int]] = [("memory", {}, 20000)]
    if redis_url:
        stores.append(("redis", {"storage_uri": redis_url}, 2000))
    prefixes = []
    for name, store, requests in stores:
        cases: list[tuple[str, dict[str, Any], int]] = [
            (strategy, {**LIMITS, "strategy": strategy}, 1)
            for strategy in ("fixed-window", "sliding-window-counter", "moving-window")
        ]
        cases.append(("fixed-window, rpd + model + upstream", HEAVY, 1))
        if name == "memory":
            cases.append(("fixed-window, 10,000 keys in use", LIMITS, 10000))
        for label, limits, keys in cases:
            prefixes.append(_prefix())
            limits = {**limits, **store, "key_prefix": prefixes[-1]}
            serial = asyncio.run(guard_cost(limits, requests, 1, keys))
            burst = asyncio.run(guard_cost(limits, requests, 32, keys))
            print(f"{name:<10}{label:<34}{serial:>13.1f}us{burst:>11.1f}us")
    _forget(redis_url, prefixes)


# 2. The whole app, in process -----------------------------------------------------------


async def _call(app: Any, body: bytes) -> None:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {KEY}".encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    if statuses != [200]:
        raise SystemExit(f"the gateway answered {statuses}")


async def app_cost(configs: dict[str, dict[str, Any]], rounds: int, requests: int) -> None:
    apps = {
        name: create_app(GateSettings(api_keys=[KEY], rate_limits=c)) for name, c in configs.items()
    }
    body = json.dumps(BODY).encode()
    costs: dict[str, list[float]] = {name: [] for name in apps}
    for app in apps.values():
        await app.state.gateway.__aenter__()
    try:
        for app in apps.values():
            for _ in range(requests // 5):  # warm-up
                await _call(app, body)
        for _ in range(rounds):
            for name, app in apps.items():
                n = requests if name != "redis://" else requests // 10
                started = time.process_time()
                for _ in range(n):
                    await _call(app, body)
                costs[name].append((time.process_time() - started) / n * 1e6)
    finally:
        for app in apps.values():
            await app.state.gateway.__aexit__(None, None, None)
    print(
        f"\n2. the gateway app in process (no sockets), CPU per request, {rounds} rounds, medians"
    )
    base = statistics.median(costs["limits off"])
    for name, runs in costs.items():
        cost = statistics.median(runs)
        rounds_text = ", ".join(f"{r:.0f}" for r in runs)
        added = f"  (+{cost - base:.1f}us)" if name != "limits off" else ""
        print(f"{name:<12}{cost:>8.1f}us{added:<14}  by round: {rounds_text}")


def app(redis_url: str | None, rounds: int) -> None:
    configs: dict[str, dict[str, Any]] = {"limits off": {}, "memory://": LIMITS}
    prefixes = [_prefix()]
    if redis_url:
        configs["redis://"] = {**LIMITS, "storage_uri": redis_url, "key_prefix": prefixes[0]}
    asyncio.run(app_cost(configs, rounds, 3000))
    _forget(redis_url, prefixes)


# 3. The gateway under wrk ---------------------------------------------------------------


def throughput(redis_url: str | None, duration: int, rounds: int, connections: int) -> None:
    wrk = ensure_wrk()
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}/v1"
    env = {
        "BENCH_UPSTREAM": upstream_url,
        "GATE_API_KEYS": KEY,
        "GATE_PROVIDERS": json.dumps({"openai": {"base_url": upstream_url, "api_key": "up"}}),
    }
    key = LIMITS["key"]
    limits_env = {
        "GATE_RATE_LIMITS__KEY__REQUESTS": key["requests"],
        "GATE_RATE_LIMITS__KEY__TOKENS": key["tokens"],
        "GATE_RATE_LIMITS__KEY__CONCURRENCY": str(key["concurrency"]),
    }
    configs = {"limits off": env, "memory://": {**env, **limits_env}, "6 headers": env}
    prefixes = [_prefix()]
    if redis_url:
        configs["redis://"] = {
            **env,
            **limits_env,
            "GATE_RATE_LIMITS__STORAGE_URI": redis_url,
            "GATE_RATE_LIMITS__KEY_PREFIX": prefixes[0],
        }
    processes = [serve("upstream", up_port, env)]
    targets = {}
    try:
        for name, config in configs.items():
            port = free_port()
            app = "gateway_six_headers" if name == "6 headers" else "gateway"
            processes.append(serve(app, port, config))
            targets[name] = (f"http://127.0.0.1:{port}/v1/chat/completions", processes[-1].pid)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for url, pid in targets.values():
            run_wrk(wrk, url, BODY, 2, connections, pid)  # warm-up
        for _ in range(rounds):
            for name, (url, pid) in targets.items():
                results[name].append(run_wrk(wrk, url, BODY, duration, connections, pid))
    finally:
        stop(processes)
        _forget(redis_url, prefixes)
    print(
        f"\n3. the gateway under wrk: non-streaming, {connections} connections, "
        f"{rounds} x {duration}s each, medians"
    )
    print(f"{'limits':<12}{'req/s':>8}{'cpu ms/req':>12}{'non-2xx':>9}   req/s by round")
    medians = {}
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        cpu = statistics.median(r["cpu_ms"] for r in runs)
        errors = sum(r["errors"] for r in runs)
        medians[name] = (rps, cpu)
        spread = ", ".join(f"{r['rps']:.0f}" for r in runs)
        print(f"{name:<12}{rps:>8.0f}{cpu:>12.3f}{errors:>9}   {spread}")
    off_rps, off_cpu = medians["limits off"]
    for name in list(medians)[1:]:
        rps, cpu = medians[name]
        print(
            f"{name:<12}{1 - rps / off_rps:+.1%} requests/s lost, "
            f"{cpu / off_cpu - 1:+.1%} CPU per request"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="'' to skip Redis")
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--skip-guard", action="store_true")
    parser.add_argument("--skip-app", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    redis_url = args.redis or None
    if not args.skip_guard:
        guard(redis_url)
    if not args.skip_app:
        app(redis_url, max(args.rounds, 5))
    if not args.skip_throughput:
        throughput(redis_url, args.duration, args.rounds, args.connections)


if __name__ == "__main__":
    main()
