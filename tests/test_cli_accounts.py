"""`gate-middleware keys create | topup | usage` against the same database a gateway uses."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from gate_middleware.cli import main
from gate_middleware.testing import FakeUpstream

from .conftest import make_billing_gateway, mounted, sdk


def test_keys_topup_and_usage_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], upstream: FakeUpstream
) -> None:
    url = f"sqlite:///{tmp_path / 'gate.db'}"
    assert main(["keys", "create", "--new-account", "Acme", "--name", "ci", "--database", url]) == 0
    out = capsys.readouterr().out
    account = out.split("account: ")[1].split()[0]
    secret = out.split("api key: ")[1].split()[0]
    assert secret.startswith("sk-gate-") and "not shown again" in out

    assert main(["topup", account, "2", "--note", "first", "--database", url]) == 0
    assert "credits 2.000000" in capsys.readouterr().out
    assert main(["topup", account, "-1", "--database", url]) == 1
    assert "positive" in capsys.readouterr().out
    assert main(["topup", "acct_nobody", "1", "--database", url]) == 1

    async def serve_three_requests() -> None:
        gateway = make_billing_gateway(upstream, url)
        async with gateway:
            client = sdk(mounted(gateway), key=secret)
            for model in ("openai/gpt-4.1", "openai/gpt-4.1", "openai/gpt-4o"):
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
                )

    asyncio.run(serve_three_requests())

    assert main(["usage", "--account", account, "--group-by", "model", "--database", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["openai/gpt-4.1"][1] == "2" and rows["openai/gpt-4o"][1] == "1"
    assert rows["total"][1] == "3" and float(rows["total"][-1]) > 0
    assert main(["keys", "list", "--account", account, "--database", url]) == 0
    listing = capsys.readouterr().out
    assert "ci" in listing and secret not in listing and secret[:14] in listing
    assert main(["usage", "--database", url]) == 0
    assert account in capsys.readouterr().out


def test_a_key_refused_makes_no_new_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys create --new-account` with a bad limit said "error" after it had made the
    account, left behind without a key."""
    url = f"sqlite:///{tmp_path / 'gate.db'}"
    new = ["keys", "create", "--new-account", "Acme", "--database", url]
    assert main([*new, "--spend-limit", "abc"]) == 1
    assert "spend_limit_usd" in capsys.readouterr().out
    assert main(["usage", "--database", url]) == 0
    assert "Acme" not in capsys.readouterr().out


def test_a_database_out_of_reach_is_an_error_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://gate:secret@127.0.0.1:{port}/test"
    assert main(["usage", "--database", url]) == 1
    out = capsys.readouterr().out
    assert (
        out.startswith("error: the database at postgresql://127.0.0.1:") and "out of reach" in out
    )
    assert "secret" not in out and "Traceback" not in out
