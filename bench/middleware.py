"""What GateMiddleware costs a host app.

The same Starlette host app twice, without and with GateMiddleware (guarding `/ai/*`),
each under one uvicorn worker, driven by wrk: a plain route outside the guarded paths
(the cost every other route of the host pays), and a trivial route inside them (the
guard's own work: key check, admission and settlement, no model call).
Usage: python bench/middleware.py [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse

from _servers import KEY, ensure_wrk, free_port, run_wrk, serve, stop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two apps")
    args = parser.parse_args()
    wrk = ensure_wrk()
    env = {"GATE_API_KEYS": KEY}
    ports = {"without": free_port(), "with": free_port()}
    processes = {
        "without": serve("host_plain", ports["without"], env),
        "with": serve("host_guarded", ports["with"], env),
    }
    try:
        runs: dict[tuple[str, str], list[dict]] = {}
        cases = [("without", "/plain"), ("with", "/plain"), ("with", "/ai/ping")]
        for name, path in cases:  # warm-up
            run_wrk(
                wrk,
                f"http://127.0.0.1:{ports[name]}{path}",
                None,
                2,
                args.connections,
                processes[name].pid,
            )
        for _ in range(args.rounds):
            for name, path in cases:
                result = run_wrk(
                    wrk,
                    f"http://127.0.0.1:{ports[name]}{path}",
                    None,
                    args.duration,
                    args.connections,
                    processes[name].pid,
                )
                runs.setdefault((name, path), []).append(result)
        print(f"wrk: {args.connections} connections, {args.rounds} x {args.duration}s each")
        print(f"{'app':<28}{'req/s':>10}{'p50':>10}{'p99':>10}{'cpu ms/req':>12}{'non-2xx':>9}")
        means = {}
        for (name, path), results in runs.items():
            rps = sum(r["rps"] for r in results) / len(results)
            cpu = sum(r["cpu_ms"] for r in results) / len(results)
            means[(name, path)] = (rps, cpu)
            last = results[-1]
            print(
                f"{name + ' middleware, ' + path:<28}{rps:>10.0f}{last['p50']:>10}"
                f"{last['p99']:>10}{cpu:>12.3f}{sum(r['errors'] for r in results):>9}"
            )
        base, plain = means[("without", "/plain")], means[("with", "/plain")]
        print(
            f"plain route with the middleware installed: {plain[0] / base[0] - 1:+.1%} req/s, "
            f"{plain[1] / base[1] - 1:+.1%} CPU per request (target: under 5% slower)"
        )
        guarded = means[("with", "/ai/ping")]
        print(
            f"a trivial guarded route: {guarded[0] / base[0] - 1:+.1%} req/s, "
            f"{(guarded[1] - base[1]) * 1000:+.0f} us CPU per request"
        )
    finally:
        stop(list(processes.values()))


if __name__ == "__main__":
    main()
