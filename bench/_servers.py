"""Starting the bench's uvicorn servers (one process each) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(
    target: str, port: int, env: dict[str, str], *, quiet: bool = False
) -> subprocess.Popen[bytes]:
    """`module:attr` from bench/ under uvicorn (uvloop, httptools, one worker).

    `quiet` drops the server's log: a fake upstream told to drop connections logs a
    traceback for each one.
    """
    if ":" not in target:
        target = f"_apps:{target}"
    args = [
        sys.executable, "-m", "uvicorn", target, "--port", str(port), "--loop", "uvloop",
        "--http", "httptools", "--log-level", "warning", "--no-access-log",
    ]
    if target.endswith("gateway"):
        args.append("--factory")
    process = subprocess.Popen(
        args,
        cwd=HERE,
        env={**os.environ, **env},
        stderr=subprocess.DEVNULL if quiet else None,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    sys.exit(f"{target} did not start")


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(10)
