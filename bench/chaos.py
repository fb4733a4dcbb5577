"""Chaos: what a client sees when upstreams fail 30% of requests at random.

Two deployments (two fake upstreams) behind one model; faults struck at random:
429 with retry-after, 503, a connection reset before the answer, a stream dropped in
the middle. The same requests run first against fault-free upstreams (the reference
answers and latency), then against faulty ones, at fixed concurrency, half of them
streaming. Every answer is checked against its reference, byte for byte.

Usage: python bench/chaos.py [--requests 2000] [--concurrency 32] [--fault-rate 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx
from _servers import free_port, serve, stop

KEY = "sk-bench-0123456789"
DONE = b"data: [DONE]\n\n"


@dataclass
class Result:
    stream: bool
    status: int
    body: bytes
    seconds: float
    attempts: int


@dataclass
class Tally:
    whole_ok: int = 0  # identical to the reference answer
    whole_failed: int = 0  # an OpenAI-shaped error with a status
    stream_cut_clean: int = 0  # a prefix of the reference, an error event, then [DONE]
    corrupted: list[str] = field(default_factory=list)


def start_stack(fault_rate: float, seed: int, max_retries: int) -> tuple[list, str]:
    ports = [free_port() for _ in range(3)]
    env_up = {
        "BENCH_FAULT_RATE": str(fault_rate),
        "BENCH_CHUNK_LATENCY": "0.002",
    }
    processes = [
        serve("upstream", ports[0], {**env_up, "BENCH_SEED": str(seed)}, quiet=True),
        serve("upstream", ports[1], {**env_up, "BENCH_SEED": str(seed + 1)}, quiet=True),
    ]
    providers = {
        name: {"base_url": f"http://127.0.0.1:{port}/v1"}
        for name, port in (("a", ports[0]), ("b", ports[1]))
    }
    models = {
        "house/chaos": {
            "deployments": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"}]
        }
    }
    env = {
        "GATE_API_KEYS": KEY,
        "GATE_PROVIDERS": json.dumps(providers),
        "GATE_MODELS": json.dumps(models),
        "GATE_MAX_RETRIES": str(max_retries),
        # Faults at random, not a dead upstream: no deployment should be cooled down.
        "GATE_HEALTH_FAILURES": "1000",
    }
    processes.append(serve("gateway", ports[2], env))
    return processes, f"http://127.0.0.1:{ports[2]}/v1/chat/completions"


def body_for(index: int) -> dict:
    return {
        "model": "house/chaos",
        "messages": [{"role": "user", "content": f"Question number {index % 97}?"}],
        "max_tokens": 20 + index % 13,
        "stream": index % 2 == 1,
    }


async def drive(url: str, requests: int, concurrency: int) -> list[Result]:
    results: list[Result | None] = [None] * requests
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                body = body_for(index)
                started = time.monotonic()
                response = await client.post(
                    url, json=body, headers={"authorization": f"Bearer {KEY}"}
                )
                results[index] = Result(
                    body["stream"],
                    response.status_code,
                    response.content,
                    time.monotonic() - started,
                    int(response.headers.get("x-gate-attempts", "0")),
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


def is_openai_error(raw: bytes) -> bool:
    try:
        error = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


def classify(result: Result, reference: Result, tally: Tally, index: int) -> None:
    if result.body == reference.body and result.status == 200:
        tally.whole_ok += 1
        return
    if result.status != 200:
        if is_openai_error(result.body):
            tally.whole_failed += 1
        else:
            tally.corrupted.append(f"#{index}: status {result.status}, non-JSON error body")
        return
    if not result.stream:
        tally.corrupted.append(f"#{index}: a 200 answer that differs from the reference")
        return
    # A stream cut after its first chunk: events of the reference, one error event, [DONE].
    if not result.body.endswith(DONE):
        tally.corrupted.append(f"#{index}: a stream that does not end with [DONE]")
        return
    events = result.body[: -len(DONE)].split(b"\n\n")[:-1]
    *content, last = events
    prefix = b"".join(event + b"\n\n" for event in content)
    if (
        content
        and reference.body.startswith(prefix)
        and last.startswith(b"data: ")
        and is_openai_error(last[6:])
    ):
        tally.stream_cut_clean += 1
    else:
        tally.corrupted.append(f"#{index}: a stream that is not a clean prefix of the reference")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--max-retries",
        type=int,
        default=6,
        help="GATE_MAX_RETRIES; with 30%% faults, 0.3**7 = 0.02%% of requests exhaust 7 attempts",
    )
    args = parser.parse_args()

    runs = {}
    for name, rate in (("fault-free", 0.0), ("chaos", args.fault_rate)):
        processes, url = start_stack(rate, args.seed, args.max_retries)
        try:
            runs[name] = asyncio.run(drive(url, args.requests, args.concurrency))
        finally:
            stop(processes)
    reference, chaos = runs["fault-free"], runs["chaos"]
    assert all(r.status == 200 for r in reference), "the fault-free run must not fail"

    tally = Tally()
    for index, (result, expected) in enumerate(zip(chaos, reference)):
        classify(result, expected, tally, index)
    cut = tally.stream_cut_clean
    before_first_byte = len(chaos) - cut  # every whole answer, and streams not cut mid-way
    success = tally.whole_ok / before_first_byte
    print(
        f"{args.requests} requests, concurrency {args.concurrency}, half streaming, "
        f"upstream fault rate {args.fault_rate:.0%} on each of 2 deployments, "
        f"GATE_MAX_RETRIES={args.max_retries}"
    )
    print(
        f"faults before the first byte reached the client: {tally.whole_ok}/{before_first_byte} "
        f"answered identically to the fault-free run = {success:.3%} (target >= 99.9%)"
    )
    print(f"  failed with an OpenAI-shaped error: {tally.whole_failed}")
    streams = sum(r.stream for r in chaos)
    print(
        f"streams cut after their first chunk, ending with an error event and [DONE]: "
        f"{cut}/{streams} streams"
    )
    print(f"corrupted answers (wrong, spliced, no [DONE], non-JSON error): {len(tally.corrupted)}")
    for line in tally.corrupted[:10]:
        print("  " + line)
    attempts = [r.attempts for r in chaos if r.status == 200]
    print(
        f"attempts per answered request: mean {statistics.mean(attempts):.2f}, max {max(attempts)}"
    )
    for label, key in (("p50", 0.5), ("p99", 0.99)):
        base = percentile([r.seconds for r in reference], key) * 1000
        hit = percentile([r.seconds for r in chaos], key) * 1000
        print(
            f"latency {label}: fault-free {base:.1f} ms, chaos {hit:.1f} ms, "
            f"added {hit - base:+.1f} ms"
        )


if __name__ == "__main__":
    main()
