"""Throughput of the gateway against two pass-through floors, on loopback.

Starts the fake upstream, an httpx pass-through, an aiohttp pass-through and the
gateway, each a uvicorn process (uvloop, httptools, one worker), then drives each
with wrk at fixed concurrency, non-streaming and streaming. Prints requests/s,
p50/p99 latency and the server's own CPU time per request (the steadiest figure on a
shared machine), in interleaved rounds: the machine drifts during a run.
Usage: python bench/throughput.py [--duration 5] [--rounds 3] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile

from _servers import KEY, ensure_wrk, free_port, run_wrk, serve, stop
from metering import funded_key


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stream-tokens", type=int, default=16)
    parser.add_argument(
        "--servers",
        default="httpx_floor,aiohttp_floor,gateway_bare,gateway",
        help="comma-separated; gateway_bare: keys from settings, nothing else; gateway: "
        "every feature on (accounts, quota holds and the ledger on SQLite, rate limits in "
        "memory, retries and health)",
    )
    args = parser.parse_args()
    wrk = ensure_wrk()

    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}/v1"
    env = {
        "BENCH_UPSTREAM": upstream_url,
        "GATE_API_KEYS": KEY,
        "GATE_PROVIDERS": json.dumps({"openai": {"base_url": upstream_url, "api_key": "up"}}),
    }
    processes = [serve("upstream", up_port, env)]
    targets = {}
    try:
        for name in args.servers.split(","):
            port, key, extra = free_port(), KEY, {}
            if name == "gateway":
                database = f"sqlite:///{tempfile.mkdtemp()}/bench.db"
                key = asyncio.run(funded_key(database))
                extra = {
                    "GATE_API_KEYS": "",
                    "GATE_DATABASE_URL": database,
                    # Limits high enough never to refuse: their checks still run.
                    "GATE_RATE_LIMITS": json.dumps(
                        {
                            "key": {
                                "requests": "10000000/minute",
                                "tokens": "10000000000/minute",
                                "concurrency": 100000,
                            }
                        }
                    ),
                }
            target = "gateway" if name.startswith("gateway") else name
            processes.append(serve(target, port, {**env, **extra}))
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            targets[name] = (url, processes[-1].pid, key)
        messages = [{"role": "user", "content": "Benchmark me."}]
        cases = {
            "non-streaming": {
                "model": "openai/gpt-4.1",
                "messages": messages,
                "max_tokens": args.stream_tokens,
            },
            "streaming": {
                "model": "openai/gpt-4.1",
                "messages": messages,
                "stream": True,
                "max_tokens": args.stream_tokens,
            },
        }
        print(
            f"wrk: {args.connections} connections, {args.rounds} rounds of {args.duration}s "
            "interleaved, one uvicorn worker; medians (CPU: the server's process and children)"
        )
        for case, body in cases.items():
            print(f"\n{case}")
            print(
                f"{'server':<15}{'req/s':>10}{'p50':>10}{'p99':>10}{'cpu ms/req':>12}"
                f"{'non-2xx':>9}   req/s by round"
            )
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            for url, pid, key in targets.values():
                run_wrk(wrk, url, body, 2, args.connections, pid, key)  # warm-up
            for _ in range(args.rounds):
                for name, (url, pid, key) in targets.items():
                    runs[name].append(
                        run_wrk(wrk, url, body, args.duration, args.connections, pid, key)
                    )
            results = {}
            for name, rounds in runs.items():
                middle = sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]
                results[name] = r = {
                    **middle,
                    "cpu_ms": statistics.median(x["cpu_ms"] for x in rounds),
                    "errors": sum(x["errors"] for x in rounds),
                }
                by_round = ", ".join(f"{x['rps']:.0f}" for x in rounds)
                print(
                    f"{name:<15}{r['rps']:>10.0f}{r['p50']:>10}{r['p99']:>10}"
                    f"{r['cpu_ms']:>12.3f}{r['errors']:>9}   {by_round}"
                )
            if {"gateway", "aiohttp_floor"} <= results.keys():
                floor, gate = results["aiohttp_floor"], results["gateway"]
                ratios = ", ".join(
                    f"{g['rps'] / f['rps']:.0%}"
                    for g, f in zip(runs["gateway"], runs["aiohttp_floor"])
                )
                print(
                    f"gateway / aiohttp floor: {gate['rps'] / floor['rps']:.0%} of requests/s "
                    f"(target >= 70%; by round {ratios}), "
                    f"{gate['cpu_ms'] / floor['cpu_ms']:.2f}x the CPU per request"
                )
    finally:
        stop(processes)


if __name__ == "__main__":
    main()
