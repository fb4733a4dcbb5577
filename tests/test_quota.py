"""No overspend under concurrency: one process on SQLite, two processes on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx2
import pytest

from gate_middleware.accounts import Accounts
from gate_middleware.auth import Principal
from gate_middleware.storage import LedgerQuery
from gate_middleware.storage.postgres import PostgresStorage
from gate_middleware.testing import FakeUpstream, Fault
from gate_middleware.tokens import estimate_prompt_tokens

from .conftest import (
    LiveServer,
    client_for,
    drop_schema,
    free_port,
    fund,
    make_billing_gateway,
)

MESSAGES = [{"role": "user", "content": "How much may I spend?"}]
MAX_TOKENS = 20
# openai/gpt-4.1 at 2000 / 8000 nanodollars per prompt / completion token.
COST = estimate_prompt_tokens({"messages": MESSAGES}) * 2000 + MAX_TOKENS * 8000
BODY = {"model": "openai/gpt-4.1", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
ADMIN = Principal(id="admin", key_hint="admin", admin=True)


def usd(nanos: int) -> str:
    return str(Decimal(nanos) / 10**9)


async def test_200_concurrent_requests_against_50_on_sqlite(tmp_path: Path) -> None:
    upstream = FakeUpstream(latency=0.01)
    gateway = make_billing_gateway(
        upstream,
        f"sqlite:///{tmp_path / 'quota.db'}",
        quota_lease_usd=usd(COST * 7),  # small slices: many leases while requests run
    )
    async with gateway:
        account, secret = await fund(gateway, usd(COST * 50))
        async with client_for(gateway, secret) as http:
            responses = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=BODY) for _ in range(200))
            )
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: 50, 402: 150}
        assert all(
            r.json()["error"]["code"] == "insufficient_quota"
            for r in responses
            if r.status_code == 402
        )
        assert gateway.accounting is not None
        await gateway.accounting.writer.flush()
        state = await gateway.accounting.storage.account(account)
        assert state is not None
        assert state.spent == 50 * COST == state.credits
    # After shutdown every lease is back.
    again = make_billing_gateway(upstream, f"sqlite:///{tmp_path / 'quota.db'}")
    async with again:
        assert again.accounting is not None
        state = await again.accounting.storage.account(account)
        assert state is not None and state.leased == 0 and state.available == 0
        rows = await again.accounting.storage.rows(
            LedgerQuery(account_id=account, kind="request", limit=1000)
        )
        assert len(rows) == 200 and sum(r.amount for r in rows) == 50 * COST


async def test_used_up_leases_go_back_under_steady_load(tmp_path: Path) -> None:
    """A purse that never idles must not keep every lease it ever took: each one would
    lengthen every later request's spend, and stay leased in the database."""
    upstream = FakeUpstream()
    url = f"sqlite:///{tmp_path / 'leases.db'}"
    gateway = make_billing_gateway(upstream, url, quota_lease_usd=usd(COST * 3))
    async with gateway:
        account, secret = await fund(gateway, usd(COST * 100))
        async with client_for(gateway, secret) as http:
            for _ in range(30):  # about ten leases' worth
                assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200
        assert gateway.accounting is not None and gateway.accounting.book is not None
        book = gateway.accounting.book
        purse = book.purse("account", account)
        assert len(purse.leases) <= 1
        await book.tidy()
        state = await gateway.accounting.storage.account(account)
        assert state is not None
        assert state.spent == 30 * COST
        # Only what the live lease still holds is leased in the database.
        assert state.leased == sum(lease.amount for lease in purse.leases)
        assert state.available == (100 - 30) * COST - state.leased


async def test_a_refused_hold_gives_back_what_the_levels_above_held(tmp_path: Path) -> None:
    """Holds go root first: when a sub-account cannot pay, its parent's hold (already
    taken) must come back, or the parent's lease stays held and never returns."""
    upstream = FakeUpstream()
    url = f"sqlite:///{tmp_path / 'refused.db'}"
    gateway = make_billing_gateway(upstream, url)
    async with gateway:
        parent, _ = await fund(gateway, usd(COST * 100))
        child, secret = await fund(gateway, usd(COST // 2), parent=parent)
        async with client_for(gateway, secret) as http:
            refused = await http.post("/v1/chat/completions", json=BODY)
            assert refused.status_code == 402 and child in refused.json()["error"]["message"]
            assert gateway.accounting is not None and gateway.accounting.book is not None
            above = gateway.accounting.book.purse("account", parent)
            assert above.held == 0 and above.free == sum(lease.amount for lease in above.leases)
    # After shutdown the parent's lease is back: nothing stayed held.
    again = make_billing_gateway(upstream, url)
    async with again:
        assert again.accounting is not None
        for account in (parent, child):
            state = await again.accounting.storage.account(account)
            assert state is not None and state.leased == 0 and state.spent == 0


def _start_gateway(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gate_middleware",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
    )


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway at {url} exited with {process.returncode}")
        try:
            if httpx2.get(url + "/healthz").json()["status"] == "ok":
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the gateway at {url} did not start")


@pytest.mark.postgres
async def test_two_gateway_processes_share_a_postgres_balance(postgres_url: str) -> None:
    schema = f"gate_test_{uuid.uuid4().hex[:12]}"
    database_url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}schema={schema}"
    storage = PostgresStorage(database_url)
    await storage.open()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        accounts = Accounts(storage, max_credit=10**18)
        account = await accounts.create_account(ADMIN, {"name": "shared"})
        await accounts.credit(ADMIN, account.id, {"amount_usd": usd(COST * 50)}, kind="topup")
        _, secret = await accounts.create_key(ADMIN, account.id, {"name": "k"})

        upstream = FakeUpstream(latency=0.02)
        with LiveServer(upstream) as upstream_server:
            env = {
                "GATE_DATABASE_URL": database_url,
                "GATE_PROVIDERS": json.dumps({"openai": {"base_url": upstream_server.url + "/v1"}}),
                "GATE_QUOTA_LEASE_USD": usd(COST * 6),
                "GATE_ADMIN_KEY": "sk-admin-two-processes",
            }
            ports = [free_port(), free_port()]
            processes = [_start_gateway(port, env) for port in ports]
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            for url, process in zip(urls, processes):
                await asyncio.to_thread(_wait_healthy, url, process)
            async with httpx2.AsyncClient(
                headers={"authorization": f"Bearer {secret}"},
                limits=httpx2.Limits(max_connections=400),
                timeout=30,
            ) as http:
                responses = await asyncio.gather(
                    *(
                        http.post(f"{urls[i % 2]}/v1/chat/completions", json=BODY)
                        for i in range(200)
                    )
                )
            # A graceful stop: ledger rows and spends are written, leases go back.
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                # uvicorn shuts down gracefully, then re-raises the signal it caught.
                assert await asyncio.to_thread(process.wait, 20) in (0, -signal.SIGTERM)

        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) <= {200, 402} and statuses[200] >= 1
        assert statuses[200] <= 50
        served_by = Counter(r.url.port for r in responses if r.status_code == 200)
        state = await storage.account(account.id)
        assert state is not None
        assert state.spent == statuses[200] * COST <= state.credits
        assert state.leased == 0
        rows = await storage.rows(LedgerQuery(account_id=account.id, kind="request", limit=1000))
        assert len(rows) == 200
        assert Counter(r.status for r in rows) == statuses
        assert sum(r.amount for r in rows) == state.spent
        print(f"served {dict(statuses)} by port {dict(served_by)}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        await storage.close()
        await drop_schema(postgres_url, schema)


NANO = "openai/gpt-4.1-nano"  # 100 / 400 nanodollars per prompt / completion token


async def test_the_requests_own_fallbacks_are_held_for_and_must_be_allowed() -> None:
    """OpenRouter's `models` list names fallbacks per request: the hold covers the
    dearest of them, and a fallback the key may not use is never tried."""
    upstream = FakeUpstream()
    gateway = make_billing_gateway(upstream, "memory://", retry_backoff=0.001)
    async with gateway:
        # Enough for gpt-4.1-nano's most (~0.4 m nanodollars), not gpt-4.1's (~8 m).
        _, secret = await fund(gateway, "0.002")
        body = {
            "model": NANO,
            "models": ["openai/gpt-4.1"],
            "messages": MESSAGES,
            "max_tokens": 1000,
        }
        async with client_for(gateway, secret) as http:
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 402
            assert response.json()["error"]["code"] == "insufficient_quota"
            alone = await http.post("/v1/chat/completions", json={**body, "models": []})
            assert alone.status_code == 200
        account, secret = await fund(gateway, "10", key={"allowed_models": [NANO]})
        async with client_for(gateway, secret) as http:
            upstream.schedule(Fault(status=500))  # nano fails once: the next candidate is tried
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200
            assert response.json()["model"] == NANO
            only = {**body, "model": "openai/gpt-4.1", "models": []}
            assert (await http.post("/v1/chat/completions", json=only)).status_code == 403
        assert gateway.accounting is not None
        await gateway.accounting.writer.flush()
        rows = await gateway.accounting.storage.rows(LedgerQuery(account_id=account))
        assert {row.model_id for row in rows if row.kind == "request"} == {NANO, None}


async def test_a_hold_covers_every_choice_asked_for() -> None:
    """`n` choices can each use `max_tokens`, and the upstream bills them all."""
    gateway = make_billing_gateway(
        FakeUpstream(), "memory://", rate_limits={"key": {"tokens": "20000/minute"}}
    )
    async with gateway:
        _, secret = await fund(gateway, "0.01")  # 10 m nanodollars
        body = {"model": NANO, "messages": MESSAGES, "max_tokens": 1000}
        async with client_for(gateway, secret) as http:
            # 16 choices: a hold of 6.4 m nanodollars fits; 32: 12.8 m does not.
            assert (
                await http.post("/v1/chat/completions", json={**body, "n": 16})
            ).status_code == 200
            refused = await http.post("/v1/chat/completions", json={**body, "n": 32})
            assert refused.status_code == 429  # 32,000 tokens: past the key's 20,000 a minute
            assert "too large" in refused.json()["error"]["message"]
            too_many = await http.post("/v1/chat/completions", json={**body, "n": 129})
            assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
            huge = await http.post("/v1/chat/completions", json={**body, "max_tokens": 2**62})
            assert huge.status_code == 400 and huge.json()["error"]["param"] == "max_tokens"


def test_a_prompts_estimate_counts_images_tools_and_schemas() -> None:
    text = {"messages": [{"role": "user", "content": "What is in this picture?"}]}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}}
    pictured = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "What is in this picture?"}, image],
            }
        ]
    }
    tool = {"type": "function", "function": {"name": "f", "parameters": {"x": "y" * 4000}}}
    base = estimate_prompt_tokens(text)
    assert estimate_prompt_tokens(pictured) >= base + 1000
    assert estimate_prompt_tokens({**text, "tools": [tool] * 10}) >= base + 10_000
    assert (
        estimate_prompt_tokens({**text, "response_format": {"schema": "z" * 4000}}) >= base + 1000
    )
    # Who spoke is read too; an embedding input mixing token ids and text counts each.
    named = {"messages": [{**text["messages"][0], "name": "n" * 4000}]}
    assert estimate_prompt_tokens(named) >= base + 1000
    assert estimate_prompt_tokens({"input": [1, "x" * 4000]}) >= 1000
    assert estimate_prompt_tokens({"input": [[1, 2], [3]]}) == 3


async def test_a_process_cut_off_from_its_leases_stops_spending_them(tmp_path: Path) -> None:
    """Gateway A cannot renew its lease (its upkeep is cut off from the database): past
    the lease's expiry B reclaims it and spends the money. A must not go on spending the
    same money from memory: it renews before holding again, finds the lease gone, and
    the account has nothing left for it."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    seconds = 0.3
    a, b = (
        make_billing_gateway(FakeUpstream(), url, quota_lease_seconds=seconds, quota_lease_usd="1")
        for _ in range(2)
    )
    async with a, b:
        account, secret = await fund(a, usd(COST * 3))  # every lease takes all of it
        async with client_for(a, secret) as to_a, client_for(b, secret) as to_b:
            assert (await to_a.post("/v1/chat/completions", json=BODY)).status_code == 200
            assert a.accounting is not None and a.accounting.book is not None
            assert b.accounting is not None and b.accounting.book is not None
            a.accounting.book._task.cancel()  # type: ignore[union-attr]  # A: cut off
            await asyncio.sleep(2 * seconds + 0.1)
            await b.accounting.book.tidy()  # B reclaims A's lease: A seems dead
            for _ in range(2):
                assert (await to_b.post("/v1/chat/completions", json=BODY)).status_code == 200
            late = await to_a.post("/v1/chat/completions", json=BODY)
            assert late.status_code == 402
        await a.accounting.writer.flush()
        await b.accounting.writer.flush()
        found = await a.accounting.storage.account(account)
        assert found is not None and found.spent <= found.credits


async def test_the_larger_token_limit_sent_is_held_and_an_unreachable_database_is_503() -> None:
    gateway = make_billing_gateway(FakeUpstream(), "memory://")
    async with gateway:
        _, secret = await fund(gateway, "0.001")  # 1 m nanodollars
        body = {"model": NANO, "messages": MESSAGES, "max_completion_tokens": 10}
        async with client_for(gateway, secret) as http:
            # 100,000 tokens of gpt-4.1-nano: 40 m nanodollars, whichever field says it.
            both = await http.post("/v1/chat/completions", json={**body, "max_tokens": 100_000})
            assert both.status_code == 402
            assert gateway.accounting is not None

            async def unreachable(*args: object, **kwargs: object) -> None:
                raise ConnectionRefusedError("the database is down")

            gateway.accounting.storage.lease = unreachable  # type: ignore[method-assign,assignment]
            down = await http.post("/v1/chat/completions", json=body)
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "service_unavailable"


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (ConnectionRefusedError("the database is down"), 503, "service_unavailable"),
        (TypeError("'int' object is not iterable"), 500, "internal_error"),
    ],
)
async def test_a_key_lookup_that_fails_says_whose_fault_it_is(
    failure: Exception, status: int, code: str
) -> None:
    """A key not yet cached whose lookup cannot reach the database is a 503, as a hold
    is (it was a 500). A lookup that fails for anything else (a stored row the code
    cannot read, the database answering) is a 500 with its traceback in the log: as a
    503 it sent clients and SDKs to retry for good."""
    gateway = make_billing_gateway(FakeUpstream(), "memory://")
    async with gateway:
        _, secret = await fund(gateway, "1")
        assert gateway.accounting is not None

        async def failing(*args: object, **kwargs: object) -> None:
            raise failure

        gateway.accounting.storage.key_by_digest = failing  # type: ignore[method-assign,assignment]
        async with client_for(gateway, secret) as http:
            answer = await http.post(
                "/v1/chat/completions", json={"model": NANO, "messages": MESSAGES}
            )
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code


async def test_a_stop_while_the_database_is_out_of_reach_leaves_no_writer_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The leases could not go back, so the stop raised before it stopped the ledger
    writer: its task went on failing on a closed storage, logging every 0.2 s for good."""
    gateway = make_billing_gateway(FakeUpstream(), "memory://")
    await gateway.__aenter__()
    _, secret = await fund(gateway, "1")
    async with client_for(gateway, secret) as http:
        ok = await http.post("/v1/chat/completions", json={"model": NANO, "messages": MESSAGES})
    assert ok.status_code == 200
    assert gateway.accounting is not None
    storage = gateway.accounting.storage

    async def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError("the database is down")

    storage.write = storage.release = unreachable  # type: ignore[method-assign,assignment]
    with pytest.raises(ConnectionRefusedError):
        await gateway.__aexit__(None, None, None)
    caplog.clear()
    await asyncio.sleep(0.1)  # the writer's interval is 0.02 s here
    assert "ledger rows failed" not in caplog.text


async def test_a_legacy_function_call_is_held_as_prompt() -> None:
    """A message's `function_call` (the older `tool_calls`) was left out of the prompt
    estimate: 100,000 tokens of arguments were held as 7, so a request far dearer than
    the balance went through."""
    gateway = make_billing_gateway(FakeUpstream(), "memory://")
    call = {"name": "f", "arguments": "x" * 400_000}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "function_call": call}]
    async with gateway:
        _, secret = await fund(gateway, "0.001")
        async with client_for(gateway, secret) as http:
            response = await http.post(
                "/v1/chat/completions", json={"model": NANO, "messages": messages, "max_tokens": 1}
            )
    assert response.status_code == 402
