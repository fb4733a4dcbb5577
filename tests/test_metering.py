"""Keys from the database, prices, the ledger and quotas, as a caller sees them."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import httpx2
import openai
import pytest

from gate_middleware import GateSettings, Gateway, ProviderSettings
from gate_middleware.storage import LedgerQuery, LedgerRow
from gate_middleware.testing import FakeUpstream
from gate_middleware.tokens import estimate_prompt_tokens

from .conftest import (
    ADMIN_KEY,
    BACKENDS,
    chat_scope,
    client_for,
    fund,
    make_billing_gateway,
    mounted,
    sdk,
)

MESSAGES = [{"role": "user", "content": "Say hello to the ledger."}]
PROMPT = estimate_prompt_tokens({"messages": MESSAGES})
# openai/gpt-4.1: 2 USD / 8 USD per million tokens = 2000 / 8000 nanodollars per token.
IN, OUT = 2000, 8000


async def ledger(gateway: Gateway, account_id: str, **filters: object) -> list[LedgerRow]:
    assert gateway.accounting is not None
    await gateway.accounting.writer.flush()
    return await gateway.accounting.storage.rows(LedgerQuery(account_id=account_id, **filters))  # type: ignore[arg-type]


async def balance(gateway: Gateway, account_id: str) -> tuple[int, int]:
    assert gateway.accounting is not None
    await gateway.accounting.writer.flush()
    account = await gateway.accounting.storage.account(account_id)
    assert account is not None
    return account.credits, account.spent


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
async def test_a_request_is_charged_exactly_and_ledgered(
    upstream: FakeUpstream, database_url: str
) -> None:
    gateway = make_billing_gateway(upstream, database_url)
    async with gateway:
        account, secret = await fund(gateway, "10")
        assert secret.startswith("sk-gate-") and len(secret) > 40
        client = sdk(mounted(gateway), key=secret)
        answer = await client.chat.completions.create(
            model="openai/gpt-4.1",
            messages=MESSAGES,
            max_tokens=7,
            extra_headers={"x-title": "Ledger Test"},
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 7
        rows = await ledger(gateway, account, kind="request")
        assert len(rows) == 1
        row = rows[0]
        assert row.amount == PROMPT * IN + 7 * OUT
        assert (row.prompt_tokens, row.completion_tokens) == (PROMPT, 7)
        assert row.status == 200 and row.model_id == "openai/gpt-4.1" and row.provider == "openai"
        assert row.upstream_model == "gpt-4.1" and row.app == "Ledger Test"
        assert row.key_prefix and secret.startswith(row.key_prefix) and len(row.key_prefix) < 20
        assert row.latency_ms is not None and not row.estimated and row.attempts >= 0
        assert await balance(gateway, account) == (10 * 10**9, row.amount)


async def test_sub_accounts_pay_their_parents_price_at_every_level(
    upstream: FakeUpstream, tmp_path: object
) -> None:
    gateway = make_billing_gateway(upstream, "memory://")
    async with gateway:
        parent, _ = await fund(gateway, "10", multiplier="1.5")
        child, secret = await fund(gateway, "2", parent=parent, multiplier="2")
        grandchild, leaf = await fund(gateway, "1", parent=child, multiplier="1.1")
        await sdk(mounted(gateway), key=leaf).chat.completions.create(
            model="openai/gpt-4.1", messages=MESSAGES, max_tokens=3
        )
        base = PROMPT * IN + 3 * OUT
        charged = {
            acct: (await ledger(gateway, acct, kind="request"))[0].amount
            for acct in (parent, child, grandchild)
        }
        assert charged == {
            parent: round(base * Decimal("1.5")),
            child: round(base * Decimal("3")),
            grandchild: round(base * Decimal("3.3")),
        }
        for acct, cost in charged.items():
            assert (await balance(gateway, acct))[1] == cost
        row = (await ledger(gateway, parent, kind="request"))[0]
        assert row.source_account_id == grandchild


async def test_short_balance_is_402_insufficient_quota_and_still_ledgered(
    upstream: FakeUpstream,
) -> None:
    gateway = make_billing_gateway(upstream, "memory://")
    async with gateway:
        # Enough for the prompt, not for 1000 completion tokens.
        account, secret = await fund(gateway, "0.001")
        client = sdk(mounted(gateway), key=secret)
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model="openai/gpt-4.1", messages=MESSAGES, max_tokens=1000
            )
        assert refused.value.status_code == 402
        assert refused.value.code == "insufficient_quota"
        assert refused.value.body["type"] == "insufficient_quota"  # type: ignore[index]
        assert len(upstream.requests) == 0
        ok = await client.chat.completions.create(
            model="openai/gpt-4.1", messages=MESSAGES, max_tokens=10
        )
        assert ok.choices
        rows = await ledger(gateway, account, kind="request")
        assert [(r.status, r.error_code) for r in rows] == [
            (200, None),
            (402, "insufficient_quota"),
        ]
        assert rows[1].amount == 0


async def test_parent_balance_bounds_a_child(upstream: FakeUpstream) -> None:
    gateway = make_billing_gateway(upstream, "memory://")
    async with gateway:
        parent, _ = await fund(gateway, "0.0001")
        child, secret = await fund(gateway, None, parent=parent)
        assert gateway.accounting is not None
        # The child has money of its own, but its parent cannot pay for the request.
        storage = gateway.accounting.storage
        await storage.credit(
            LedgerRow(id="gift", account_id=child, kind="adjustment", amount=10**9)
        )
        with pytest.raises(openai.APIStatusError) as refused:
            await sdk(mounted(gateway), key=secret).chat.completions.create(
                model="openai/gpt-4.1", messages=MESSAGES, max_tokens=100
            )
        assert refused.value.status_code == 402 and parent in refused.value.message


async def test_disabled_expired_and_restricted_keys(upstream: FakeUpstream) -> None:
    gateway = make_billing_gateway(upstream, "memory://")
    async with gateway:
        account, secret = await fund(gateway, "1", key={"allowed_models": ["openai/gpt-4o*"]})
        client = sdk(mounted(gateway), key=secret)
        await client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.chat.completions.create(model="openai/gpt-4.1", messages=MESSAGES)
        assert denied.value.code == "model_not_allowed"
        # The model list shows what the key may use, and nothing else.
        listed = [model.id async for model in client.models.list()]
        assert listed and all(name.startswith("openai/gpt-4o") for name in listed)
        with pytest.raises(openai.PermissionDeniedError):
            await client.models.retrieve("openai/gpt-4.1")

        assert gateway.accounting is not None
        accounts = gateway.accounting.accounts
        from gate_middleware.auth import Principal

        admin = Principal(id="admin", key_hint="admin", admin=True)
        [key] = await gateway.accounting.storage.keys(account)
        await accounts.update_key(admin, key.id, {"enabled": False})
        with pytest.raises(openai.AuthenticationError) as disabled:
            await client.models.list()
        assert disabled.value.code == "key_disabled"
        assert secret not in str(disabled.value.body)
        await accounts.update_key(admin, key.id, {"enabled": True, "expires_at": 1.0})
        with pytest.raises(openai.AuthenticationError) as expired:
            await client.models.list()
        assert expired.value.code == "key_expired"
        await accounts.update_key(admin, key.id, {"expires_at": None})
        await accounts.update_account(admin, account, {"enabled": False})
        with pytest.raises(openai.AuthenticationError) as account_off:
            await client.models.list()
        assert account_off.value.code == "account_disabled"
        rows = await ledger(gateway, account, kind="request")
        assert [r.status for r in rows] == [403, 200]


async def test_disabling_a_key_elsewhere_takes_effect_within_the_cache_bound(
    upstream: FakeUpstream, tmp_path: object
) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    one = make_billing_gateway(upstream, url, key_cache_seconds=0.3)
    two = make_billing_gateway(upstream, url, key_cache_seconds=0.3)
    async with one, two:
        _, secret = await fund(one, "1")
        client = sdk(mounted(two), key=secret)
        await client.models.list()
        assert one.accounting is not None
        [key] = await one.accounting.storage.keys(_)
        await one.accounting.storage.update_key(key.id, {"enabled": False})
        await client.models.list()  # still cached in the other process
        await asyncio.sleep(0.35)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_a_key_is_looked_up_once_however_many_requests_wait(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Times from the first lookup, with margins of a quarter second or more: a busy
    # machine (the suite on two cores) made relative sleeps cross a window's edge.
    gateway = make_billing_gateway(upstream, "memory://", key_cache_seconds=3.0)
    async with gateway:
        _, secret = await fund(gateway, "1")
        assert gateway.accounting is not None
        storage = gateway.accounting.storage
        lookups = 0
        original = storage.key_by_digest

        async def counted(digest: str) -> object:
            nonlocal lookups
            lookups += 1
            await asyncio.sleep(0.05)  # a database busy with the ledger
            return await original(digest)

        async def until(moment: float) -> None:
            await asyncio.sleep(max(moment - time.monotonic(), 0))

        monkeypatch.setattr(storage, "key_by_digest", counted)
        client = sdk(mounted(gateway), key=secret)
        start = time.monotonic()
        await asyncio.gather(*(client.models.list() for _ in range(32)))
        assert lookups == 1
        # Its entry ends about 3 s after `start`; in its last 0.6 s a key in use is
        # looked up again, in the background.
        await until(start + 2.7)
        await client.models.list()
        await asyncio.sleep(0.2)
        assert lookups == 2
        await until(start + 3.5)  # past the first entry's end: the refreshed one serves
        await asyncio.gather(*(client.models.list() for _ in range(8)))
        assert lookups == 2


async def test_the_admin_key_manages_but_does_not_chat(upstream: FakeUpstream) -> None:
    from .conftest import ADMIN_KEY

    gateway = make_billing_gateway(upstream, "memory://")
    async with gateway:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await sdk(mounted(gateway), key=ADMIN_KEY).chat.completions.create(
                model="openai/gpt-4.1", messages=MESSAGES
            )
        assert denied.value.code == "admin_key"


async def test_streams_are_metered_with_and_without_upstream_usage(upstream: FakeUpstream) -> None:
    from gate_middleware import ProviderSettings

    gateway = make_billing_gateway(
        upstream,
        "memory://",
        providers={
            "openai": ProviderSettings(base_url="http://upstream/v1"),
            # An upstream that is never asked for usage: the gateway must estimate.
            "deepseek": ProviderSettings(base_url="http://upstream/v1", stream_usage=False),
        },
    )
    async with gateway:
        account, secret = await fund(gateway, "1")
        async with httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=mounted(gateway)),
            base_url="http://gate.test",
            headers={"authorization": f"Bearer {secret}"},
        ) as http:
            for model in ("openai/gpt-4.1", "deepseek/deepseek-chat"):
                response = await http.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": MESSAGES, "stream": True, "max_tokens": 6},
                )
                assert response.status_code == 200
                assert '"usage":{' not in response.text  # the client did not ask
        reported, estimated = await ledger(gateway, account, kind="request")
        assert reported.model_id == "deepseek/deepseek-chat"
        reported, estimated = estimated, reported
        assert not reported.estimated and reported.completion_tokens == 6
        assert estimated.estimated and estimated.prompt_tokens == PROMPT
        # One token a chunk: role, 6 words, finish.
        assert estimated.completion_tokens == 8 and estimated.amount > 0


async def test_unpriced_models_are_refused_or_free(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    for policy, status in (("reject", 400), ("free", 200)):
        gateway = make_billing_gateway(upstream, "memory://", unpriced_models=policy)
        async with gateway:
            account, secret = await fund(gateway, "1")
            async with httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=mounted(gateway)),
                base_url="http://gate.test",
                headers={"authorization": f"Bearer {secret}"},
            ) as http:
                response = await http.post(
                    "/v1/chat/completions",
                    json={"model": "openai/some-new-model", "messages": MESSAGES},
                )
            assert response.status_code == status
            [row] = await ledger(gateway, account, kind="request")
            assert row.status == status and row.amount == 0
    # Served free, and said so in the log, once.
    warned = [r for r in caplog.records if "openai/some-new-model" in r.getMessage()]
    assert len(warned) == 1 and "zero cost" in warned[0].getMessage()


async def test_shutdown_writes_every_row(upstream: FakeUpstream, tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/flush.db"
    gateway = make_billing_gateway(upstream, url, ledger_flush_seconds=60, ledger_batch_size=10**6)
    async with gateway:
        account, secret = await fund(gateway, "5")
        client = sdk(mounted(gateway), key=secret)
        await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="openai/gpt-4.1", messages=MESSAGES, max_tokens=2
                )
                for _ in range(120)
            )
        )
        assert gateway.accounting is not None and gateway.accounting.writer.pending == 120
    # A new gateway on the same file sees all of them, and the money matches.
    again = make_billing_gateway(upstream, url)
    async with again:
        rows = await ledger(again, account, kind="request", limit=1000)
        assert len(rows) == 120 and len({r.id for r in rows}) == 120
        credits, spent = await balance(again, account)
        assert spent == sum(r.amount for r in rows) == 120 * (PROMPT * IN + 2 * OUT)
        assert again.accounting is not None
        state = await again.accounting.storage.account(account)
        assert state is not None and state.leased == 0


async def test_a_fallback_is_charged_at_the_price_of_the_model_that_answered(
    upstream: FakeUpstream,
) -> None:
    from gate_middleware import ModelSettings
    from gate_middleware.testing import Fault

    gateway = make_billing_gateway(
        upstream,
        "memory://",
        models={"openai/gpt-4.1-mini": ModelSettings(fallbacks=["openai/gpt-4.1"])},
    )
    async with gateway:
        account, secret = await fund(gateway, "1")
        upstream.schedule(Fault(status=503))
        answer = await sdk(mounted(gateway), key=secret).chat.completions.create(
            model="openai/gpt-4.1-mini",
            messages=MESSAGES,
            max_tokens=5,
            extra_headers={"x-gate-max-retries": "1"},
        )
        assert answer.model == "openai/gpt-4.1"
        [row] = await ledger(gateway, account, kind="request")
        assert row.model == "openai/gpt-4.1-mini" and row.model_id == "openai/gpt-4.1"
        assert row.amount == PROMPT * IN + 5 * OUT and row.attempts == 2


def test_ledger_rows_fill_every_field_from_the_record() -> None:
    """`ledger_rows` builds rows positionally, for speed: each field must land in its
    own column, checked against the same row built by name."""
    from gate_middleware import Principal, RequestRecord
    from gate_middleware.auth import Level
    from gate_middleware.metering import ledger_rows

    principal = Principal(
        id="key-7",
        key_hint="sk-gate-abc...",
        account_id="acct_child",
        key_id="key_7",
        chain=(Level("acct_root"), Level("acct_child", Decimal("1.5"))),
    )
    record = RequestRecord(
        request_id="req_1",
        principal=principal,
        endpoint="chat.completions",
        model="gpt-4o",
        stream=True,
        model_id="openai/gpt-4o",
        provider="openai",
        upstream_model="gpt-4o-2024",
        status=499,
        error_code="client_disconnected",
        prompt_tokens=11,
        completion_tokens=22,
        cached_tokens=3,
        reasoning_tokens=4,
        latency_ms=55.5,
        ttft_ms=6.5,
        app="my-app",
        route="/summarize",
        parent_id="req_0",
        attempts=2,
    )
    rows = ledger_rows(record, [100, 150], 1234.5)
    expected = [
        LedgerRow(
            id="req_1",
            account_id=account,
            kind="request",
            created=1234.5,
            amount=amount,
            source_account_id="acct_child",
            key_id="key_7",
            key_prefix="sk-gate-abc",
            model="gpt-4o",
            model_id="openai/gpt-4o",
            provider="openai",
            upstream_model="gpt-4o-2024",
            prompt_tokens=11,
            completion_tokens=22,
            cached_tokens=3,
            reasoning_tokens=4,
            latency_ms=55.5,
            ttft_ms=6.5,
            status=499,
            error_code="client_disconnected",
            attempts=2,
            app="my-app",
            stream=True,
            estimated=True,  # no usage reported, and the client left mid-way
            route="/summarize",
            parent_id="req_0",
        )
        for account, amount in (("acct_root", 100), ("acct_child", 150))
    ]
    assert rows == expected


@pytest.mark.parametrize("ending", ["a bug", "cancelled"])
async def test_a_request_ended_by_a_bug_or_a_cancel_settles_and_is_ledgered(
    upstream: FakeUpstream, ending: str
) -> None:
    """Anything but a gateway error between admission and the answer (a host provider's
    bug, the request cancelled by the host) still gives back the quota hold and the
    slot in flight, and leaves a ledger row; not a hold locked until a restart."""
    gateway = make_billing_gateway(upstream, "memory://", rate_limits={"key": {"concurrency": 1}})
    reached = asyncio.Event()

    async def broken(body: dict) -> None:
        reached.set()
        if ending == "a bug":
            raise RuntimeError("bug in a host provider")
        await asyncio.Event().wait()

    gateway.providers["openai"].chat = broken  # type: ignore[method-assign,assignment]
    async with gateway:
        account, secret = await fund(gateway, "1")
        async with httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=mounted(gateway), raise_app_exceptions=False),
            base_url="http://t",
            headers={"authorization": f"Bearer {secret}"},
        ) as http:
            call = asyncio.create_task(
                http.post(
                    "/v1/chat/completions", json={"model": "openai/gpt-4.1", "messages": MESSAGES}
                )
            )
            await asyncio.wait_for(reached.wait(), 5)
            if ending == "cancelled":
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            else:
                response = await call
                assert response.status_code == 500
                assert response.json()["error"]["code"] == "internal_error"
            limits = (await http.get("/v1/ratelimits")).json()
            assert limits["concurrency"] == {"limit": 1, "in_flight": 0}
        [row] = await ledger(gateway, account, kind="request")
        assert (row.status, row.error_code) == (
            (500, "internal_error") if ending == "a bug" else (499, "cancelled")
        )
        assert gateway.accounting is not None and gateway.accounting.book is not None
        assert gateway.accounting.book.purse("account", account).held == 0


async def test_a_stream_the_upstream_cuts_after_content_is_billed_its_estimate(
    live_upstream: tuple[FakeUpstream, str],
) -> None:
    """Content reached the client before the upstream dropped the stream: the vendor bills
    what it produced, so the caller is billed the relay's estimate, not nothing. (A real
    upstream on loopback: through an ASGI transport the whole body comes at once.)"""
    _, url = live_upstream
    gateway = Gateway(
        GateSettings(
            admin_key=ADMIN_KEY,
            database_url="memory://",
            ledger_flush_seconds=0.02,
            providers={"openai": ProviderSettings(base_url=url)},
        )
    )
    async with gateway:
        account, secret = await fund(gateway, "1")
        async with client_for(gateway, secret) as http:
            response = await http.post(
                "/v1/chat/completions",
                json={
                    "model": "openai/gpt-4.1",
                    "messages": MESSAGES,
                    "stream": True,
                    "fake_fault": {"drop": "mid", "after_chunks": 4},
                },
            )
        assert response.status_code == 200
        assert '"content"' in response.text and '"error"' in response.text
        [row] = await ledger(gateway, account, kind="request")
        assert row.status >= 500 and row.estimated
        assert row.prompt_tokens == PROMPT and row.completion_tokens > 0
        assert row.amount == row.prompt_tokens * IN + row.completion_tokens * OUT


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -(10**9), "completion_tokens": 5},
        {"prompt_tokens": 10, "completion_tokens": 10**16},
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": -7},
        },
        {},
        {"prompt_tokens": 10.0, "completion_tokens": 5.0},
    ],
)
async def test_usage_no_request_can_have_is_not_believed(
    upstream: FakeUpstream, usage: dict
) -> None:
    """A negative count would credit the caller; one past any integer the ledger holds
    stopped every account's rows from being written. Either way: billed on the estimate."""
    from gate_middleware.providers.base import Reply

    gateway = make_billing_gateway(upstream, "sqlite:///:memory:")

    async def lying(body: dict) -> Reply:
        message = {"role": "assistant", "content": "Hi there, ledger."}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return Reply({"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage})

    gateway.providers["openai"].chat = lying  # type: ignore[method-assign,assignment]
    async with gateway:
        account, secret = await fund(gateway, "1")
        async with client_for(gateway, secret) as http:
            for _ in range(2):
                response = await http.post(
                    "/v1/chat/completions", json={"model": "openai/gpt-4.1", "messages": MESSAGES}
                )
                assert response.status_code == 200
        rows = await ledger(gateway, account, kind="request")
        assert len(rows) == 2
        for row in rows:
            assert row.estimated and row.prompt_tokens == PROMPT and row.cached_tokens == 0
            assert 0 < row.amount == PROMPT * IN + row.completion_tokens * OUT
        credits, spent = await balance(gateway, account)
        assert spent == sum(row.amount for row in rows)


async def test_a_graceful_stop_under_load_loses_no_row(tmp_path: object) -> None:
    """uvicorn is told to stop while requests wait on the upstream: they finish, then
    the lifespan writes every row and spend before the process would exit."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from .conftest import LiveServer

    url = f"sqlite:///{tmp_path}/stop.db"
    setup = make_billing_gateway(FakeUpstream(), url)
    async with setup:
        account, secret = await fund(setup, "5")
    gateway = make_billing_gateway(
        FakeUpstream(latency=0.3), url, ledger_flush_seconds=60, ledger_batch_size=10**6
    )
    app = Starlette(routes=[Mount("/v1", gateway)], lifespan=gateway.lifespan)
    body = {"model": "openai/gpt-4.1", "messages": MESSAGES, "max_tokens": 2}
    server = LiveServer(app)
    with server:
        async with httpx2.AsyncClient(
            base_url=server.url, headers={"authorization": f"Bearer {secret}"}, timeout=10
        ) as http:
            calls = [
                asyncio.create_task(http.post("/v1/chat/completions", json=body)) for _ in range(40)
            ]
            await asyncio.sleep(0.15)  # all of them at the upstream
            server.server.should_exit = True  # what SIGTERM does
            responses = await asyncio.gather(*calls)
        await asyncio.to_thread(server.thread.join, 10)
    assert [r.status_code for r in responses] == [200] * 40
    again = make_billing_gateway(FakeUpstream(), url)
    async with again:
        rows = await ledger(again, account, kind="request", limit=1000)
        assert len(rows) == 40 and {r.status for r in rows} == {200}
        credits, spent = await balance(again, account)
        assert spent == sum(r.amount for r in rows) == 40 * (PROMPT * IN + 2 * OUT)


async def test_a_batchs_balance_changes_travel_with_its_rows(upstream: FakeUpstream) -> None:
    """A guard of the host's that awaits while the request settles lets a flush run
    between the quota's settlement and the ledger row: the spends must not leave alone
    (a failed batch of spends alone could not tell whether it was committed)."""
    from gate_middleware.storage import Spend

    class Awaiting:
        async def admit(self, record: object) -> None:
            pass

        async def settle(self, record: object) -> None:
            assert gateway.accounting is not None
            await gateway.accounting.writer.flush()

    gateway = make_billing_gateway(upstream, "memory://")
    gateway.guards.append(Awaiting())
    async with gateway:
        assert gateway.accounting is not None
        storage = gateway.accounting.storage
        real = storage.write
        batches: list[tuple[int, int]] = []

        async def spy(rows: list[LedgerRow], spends: list[Spend], **kw: bool) -> None:
            batches.append((len(rows), len(spends)))
            await real(rows, spends, **kw)

        storage.write = spy  # type: ignore[method-assign]
        account, secret = await fund(gateway, "1")
        async with client_for(gateway, secret) as http:
            response = await http.post(
                "/v1/chat/completions", json={"model": "openai/gpt-4.1", "messages": MESSAGES}
            )
            assert response.status_code == 200
        [row] = await ledger(gateway, account, kind="request")
        assert await balance(gateway, account) == (10**9, row.amount)
        assert batches and all(rows for rows, spends in batches if spends)


async def test_a_stream_gone_before_its_first_byte_still_settles(upstream: FakeUpstream) -> None:
    """The client leaves while the stream's headers are being sent (a server whose send
    waits): the stream's body never starts, and yet its hold goes back and its row is
    written, billed the estimate of what the upstream was asked."""
    gateway = make_billing_gateway(upstream, "memory://")
    async with gateway:
        account, secret = await fund(gateway, "1")
        body = {"model": "openai/gpt-4.1", "messages": MESSAGES, "stream": True}
        messages = [{"type": "http.request", "body": json.dumps(body).encode()}]
        gone = asyncio.Event()

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                gone.set()  # the client hangs up while the headers are on their way
                await asyncio.sleep(1)

        scope = chat_scope(secret)
        await asyncio.wait_for(gateway(scope, receive, send), 5)
        [row] = await ledger(gateway, account, kind="request")
        assert row.status == 499
        assert gateway.accounting is not None and gateway.accounting.book is not None
        assert gateway.accounting.book.purse("account", account).held == 0
