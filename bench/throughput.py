"""Throughput of the gateway against two pass-through floors, on loopback.

Starts the fake upstream, an httpx pass-through, an aiohttp pass-through and the
gateway, each a uvicorn process (uvloop, httptools, one worker), then drives each
with wrk at fixed concurrency, non-streaming and streaming. Prints requests/s,
p50/p99 latency and the server's own CPU time per request (the steadiest figure on a
shared machine). Usage: python bench/throughput.py [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _servers import free_port, serve, stop

KEY = "sk-bench-0123456789"
TICKS = os.sysconf("SC_CLK_TCK")


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk from Debian's packages...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, capture_output=True)
    return shutil.which("wrk") or sys.exit("wrk is not available")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_wrk(wrk: str, url: str, body: dict, seconds: int, connections: int, pid: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
        )
    before = cpu_seconds(pid)
    out = subprocess.run(
        [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url],
        capture_output=True, text=True, check=True,
    ).stdout
    cpu = cpu_seconds(pid) - before
    os.unlink(script.name)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1),
        "p99": re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1),
        "cpu_ms": 1000 * cpu / max(total, 1),
        "errors": int(errors.group(1)) if errors else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stream-tokens", type=int, default=16)
    parser.add_argument(
        "--servers", default="httpx_floor,aiohttp_floor,gateway", help="comma-separated"
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
            port = free_port()
            processes.append(serve(name, port, env))
            targets[name] = (f"http://127.0.0.1:{port}/v1/chat/completions", processes[-1].pid)
        messages = [{"role": "user", "content": "Benchmark me."}]
        cases = {
            "non-streaming": {"model": "openai/gpt-4.1", "messages": messages},
            "streaming": {
                "model": "openai/gpt-4.1", "messages": messages, "stream": True,
                "max_tokens": args.stream_tokens,
            },
        }
        print(f"wrk: {args.connections} connections, {args.duration}s each, one uvicorn worker")
        for case, body in cases.items():
            print(f"\n{case}")
            print(f"{'server':<15}{'req/s':>10}{'p50':>10}{'p99':>10}{'cpu ms/req':>12}{'non-2xx':>9}")
            results = {}
            for name, (url, pid) in targets.items():
                run_wrk(wrk, url, body, 2, args.connections, pid)  # warm-up
                results[name] = r = run_wrk(wrk, url, body, args.duration, args.connections, pid)
                print(f"{name:<15}{r['rps']:>10.0f}{r['p50']:>10}{r['p99']:>10}"
                      f"{r['cpu_ms']:>12.3f}{r['errors']:>9}")
            if {"gateway", "aiohttp_floor"} <= results.keys():
                floor, gate = results["aiohttp_floor"], results["gateway"]
                print(
                    f"gateway / aiohttp floor: {gate['rps'] / floor['rps']:.0%} of requests/s "
                    f"(target >= 70%), {gate['cpu_ms'] / floor['cpu_ms']:.2f}x the CPU per request"
                )
    finally:
        stop(processes)


if __name__ == "__main__":
    main()
