"""Rate limits as a client sees them: statuses, OpenAI's headers and errors, what remains.

Every test that touches the limit storage runs on memory:// and on the real Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import openai
import pytest
from pydantic import ValidationError

from gate_middleware import (
    ConfigurationError,
    GateError,
    GateSettings,
    Gateway,
    Level,
    Principal,
    ProviderSettings,
    RequestRecord,
)
from gate_middleware.testing import FakeUpstream, Fault
from gate_middleware.tokens import estimate_prompt_tokens

from .conftest import (
    KEY,
    client_for,
    free_port,
    fund,
    make_billing_gateway,
    make_gateway,
    mounted,
    sdk,
)

MESSAGES = [{"role": "user", "content": "Say hello."}]
CHAT = {"model": "openai/gpt-4.1", "messages": MESSAGES}


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[dict[str, str]]:
    """Redis storage settings with keys of this test's own, deleted afterwards."""
    prefix = f"gate-test-{uuid.uuid4().hex[:12]}"
    yield {"storage_uri": redis_url, "key_prefix": prefix}
    import redis

    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> dict[str, str]:
    """The storage settings, in memory or on Redis."""
    if request.param == "memory":
        return {"storage_uri": "memory://"}
    settings: dict[str, str] = request.getfixturevalue("redis_store")
    return settings


@asynccontextmanager
async def limited(
    upstream: FakeUpstream, records: list[RequestRecord] | None = None, **limits: Any
) -> AsyncIterator[tuple[Gateway, httpx2.AsyncClient]]:
    gateway = make_gateway(upstream, records, rate_limits=limits)
    async with gateway, client_for(gateway) as client:
        yield gateway, client


async def remaining(client: httpx2.AsyncClient, scope: str, kind: str, name: str = "") -> int:
    response = await client.get("/v1/ratelimits")
    assert response.status_code == 200, response.text
    for entry in response.json()["data"]:
        if (
            entry["scope"] == scope
            and entry["type"] == kind
            and (not name or entry["name"] == name)
        ):
            return int(entry["remaining"])
    raise AssertionError(f"no {scope} {kind} limit in {response.json()}")


# Requests ----------------------------------------------------------------------------


async def test_requests_per_minute_through_the_sdk(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    gateway = make_gateway(upstream, rate_limits={**store, "key": {"requests": "3/minute"}})
    async with gateway:
        client = sdk(mounted(gateway))
        seen = []
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(**CHAT)
            seen.append(raw.headers["x-ratelimit-remaining-requests"])
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        assert seen == ["2", "1", "0"]
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(**CHAT)
    error = refused.value
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    assert "requests per minute (RPM)" in error.message and "Limit 3, Used 3" in error.message
    assert "sk-test-" in error.message and KEY not in error.message
    headers = error.response.headers
    assert 55 <= int(headers["retry-after"]) <= 60
    assert "x-should-retry" not in headers  # a minute's wait: the SDK's retry is right
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert len(upstream.requests) == 3


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
async def test_exactly_n_admitted_under_a_burst(
    store: dict[str, str], upstream: FakeUpstream, strategy: str
) -> None:
    limits = {**store, "strategy": strategy, "key": {"requests": "5/minute"}}
    async with limited(upstream, **limits) as (_, client):
        answers = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=CHAT) for _ in range(12))
        )
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] * 5 + [429] * 7
        assert await remaining(client, "key", "requests") == 0
    assert len(upstream.requests) == 5


async def test_a_day_limit_tells_the_sdk_not_to_retry(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    async with limited(upstream, **store, key={"requests": "10/minute;1/day"}) as (_, client):
        first = await client.post("/v1/chat/completions", json=CHAT)
        # The tightest limit speaks in the headers: one a day, none left.
        assert first.headers["x-ratelimit-limit-requests"] == "1"
        assert first.headers["x-ratelimit-remaining-requests"] == "0"
        assert first.headers["x-ratelimit-reset-requests"].startswith(("23h59m", "24h0m0s"))
        refused = await client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 429
    assert "requests per day (RPD)" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) > 86000
    assert refused.headers["x-should-retry"] == "false"


# Tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
async def test_tokens_estimated_up_front_and_corrected_after(
    store: dict[str, str], upstream: FakeUpstream, strategy: str
) -> None:
    limits = {**store, "strategy": strategy, "completion_estimate": 300}
    async with limited(upstream, **limits, key={"tokens": "10000/minute"}) as (_, client):
        answer = await client.post("/v1/chat/completions", json=CHAT)
        used = answer.json()["usage"]["total_tokens"]
        estimate = 10000 - int(answer.headers["x-ratelimit-remaining-tokens"])
        assert estimate > 300 > used  # prompt estimate + completion_estimate, then 16 words
        left = await remaining(client, "key", "tokens")
        if strategy == "fixed-window":
            assert left == 10000 - used  # the over-estimate came back
        else:
            assert left == 10000 - estimate  # these windows keep what they counted


async def test_tokens_given_back_ride_on_the_next_charge(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    limits = {**store, "completion_estimate": 300}
    async with limited(upstream, **limits, key={"tokens": "10000/minute"}) as (_, client):
        first = await client.post("/v1/chat/completions", json=CHAT)
        second = await client.post("/v1/chat/completions", json=CHAT)
        used = first.json()["usage"]["total_tokens"]
        estimate = 10000 - int(first.headers["x-ratelimit-remaining-tokens"])
        # The second answer's headers count the first request at what it used.
        assert int(second.headers["x-ratelimit-remaining-tokens"]) == 10000 - used - estimate
        assert await remaining(client, "key", "tokens") == 10000 - 2 * used


async def test_tokens_given_back_reach_other_workers(
    redis_store: dict[str, str], upstream: FakeUpstream
) -> None:
    """Two gateways on one Redis: one's give-back reaches the other within moments,
    and a gateway that stops sends what still waits."""
    limits = {**redis_store, "completion_estimate": 300, "key": {"tokens": "10000/minute"}}
    async with limited(upstream, **limits) as (_, other):
        async with limited(upstream, **limits) as (_, client):
            used = (await client.post("/v1/chat/completions", json=CHAT)).json()["usage"]
            await asyncio.sleep(0.3)
            assert await remaining(other, "key", "tokens") == 10000 - used["total_tokens"]
            await client.post("/v1/chat/completions", json=CHAT)
        # Stopped at once, before its give-back was due: it went on the way out.
        assert await remaining(other, "key", "tokens") == 10000 - 2 * used["total_tokens"]


async def test_a_request_charged_in_an_ended_window_gives_the_next_one_nothing(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    """Charged in a window's last second, done after the next window began: what it
    gives back belongs to a window that is gone, not to the one that never counted it."""
    limits = {**store, "completion_estimate": 300, "key": {"tokens": "10000 per 4 seconds"}}
    async with limited(upstream, **limits) as (_, client):
        await client.post("/v1/chat/completions", json=CHAT)  # opens a window
        ends = time.time() + 4  # within milliseconds
        # Margins of most of a second on each side, for a busy machine.
        await asyncio.sleep(ends - 0.8 - time.time())
        slow = {**CHAT, "fake_fault": {"latency": 1.6}}
        late = asyncio.create_task(client.post("/v1/chat/completions", json=slow))
        await asyncio.sleep(ends + 0.1 - time.time())
        fresh = await client.post("/v1/chat/completions", json=CHAT)  # opens the next
        assert (await late).status_code == 200
        used = fresh.json()["usage"]["total_tokens"]
        assert await remaining(client, "key", "tokens") == 10000 - used


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
async def test_tokens_used_beyond_the_estimate_are_charged(
    store: dict[str, str], upstream: FakeUpstream, strategy: str
) -> None:
    limits = {**store, "strategy": strategy, "completion_estimate": 0}
    async with limited(upstream, **limits, key={"tokens": "10000/minute"}) as (_, client):
        answer = await client.post("/v1/chat/completions", json=CHAT)
        estimate = 10000 - int(answer.headers["x-ratelimit-remaining-tokens"])
        used = answer.json()["usage"]["total_tokens"]
        assert used > estimate
        assert await remaining(client, "key", "tokens") == 10000 - used


async def test_a_stream_is_corrected_when_it_ends(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    async with limited(upstream, **store, key={"tokens": "5000/minute"}) as (_, client):
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-ratelimit-limit-tokens"] == "5000"
        charged = 5000 - int(response.headers["x-ratelimit-remaining-tokens"])
        assert charged == estimate_prompt_tokens(body) + 512  # no max_tokens: the default
        last = [e for e in response.text.split("\n\n") if e.startswith("data: {")][-1]
        used = json.loads(last.removeprefix("data: "))["usage"]["total_tokens"]
        assert used < charged
        assert await remaining(client, "key", "tokens") == 5000 - used


async def test_a_request_larger_than_the_token_limit_is_refused_for_good(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    async with limited(upstream, **store, key={"tokens": "1000/minute"}) as (_, client):
        refused = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5000})
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
        assert "Request too large" in error["message"] and "Limit 1000" in error["message"]
        assert refused.headers["x-should-retry"] == "false"
        assert "retry-after" not in refused.headers
        assert refused.headers["x-ratelimit-remaining-tokens"] == "1000"
        assert await remaining(client, "key", "tokens") == 1000
    assert len(upstream.requests) == 0


async def test_tokens_refused_when_the_window_cannot_hold_the_estimate(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    async with limited(
        upstream, **store, key={"requests": "100/minute", "tokens": "600/minute"}
    ) as (_, client):
        assert (
            await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 300})
        ).status_code == 200
        before = await remaining(client, "key", "requests")
        refused = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 580})
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "tokens"
        assert "tokens per minute (TPM)" in refused.json()["error"]["message"]
        # Both kinds of header on the refusal; the request it did not make is not counted.
        assert refused.headers["x-ratelimit-remaining-requests"] == str(before)
        assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 580
        assert await remaining(client, "key", "requests") == before


async def test_an_upstream_failure_gives_the_tokens_back(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    async with limited(
        upstream, **store, key={"requests": "10/minute", "tokens": "5000/minute"}
    ) as (_, client):
        upstream.schedule(Fault(status=500))
        failed = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"x-gate-max-retries": "0"}
        )
        assert failed.status_code == 500
        assert failed.headers["x-ratelimit-remaining-requests"] == "9"
        assert await remaining(client, "key", "tokens") == 5000
        assert await remaining(client, "key", "requests") == 9  # the request was made


async def test_embeddings_are_charged_their_input_only(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    async with limited(upstream, **store, key={"tokens": "1000/minute"}) as (_, client):
        response = await client.post(
            "/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": "a" * 40}
        )
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - 10)


# Concurrency -------------------------------------------------------------------------


async def test_requests_in_flight_per_key(store: dict[str, str], upstream: FakeUpstream) -> None:
    limits = {"concurrency": 2, "requests": "1000/minute"}
    async with limited(upstream, **store, key=limits) as (_, client):
        slow = {**CHAT, "fake_fault": {"latency": 0.5}}
        first = [
            asyncio.create_task(client.post("/v1/chat/completions", json=slow)) for _ in range(2)
        ]
        while len(upstream.requests) < 2:
            await asyncio.sleep(0.01)
        status = (await client.get("/v1/ratelimits")).json()["concurrency"]
        assert status == {"limit": 2, "in_flight": 2}
        refused = await client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.headers["x-ratelimit-limit-requests"] == "1000"
        assert "in flight" in refused.json()["error"]["message"]
        assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await client.get("/v1/ratelimits")).json()["concurrency"]["in_flight"] == 0
        # The request refused for want of a slot counted against no window.
        assert await remaining(client, "key", "requests") == 1000 - 3


async def test_a_slot_whose_freeing_met_an_outage_is_freed_once_redis_answers(
    redis_store: dict[str, str], upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis blinks while a request ends: its slot's freeing fails, and it was held for
    the lease's 15 minutes, so a key allowed one request in flight got 429 for all that
    time. It is freed with the first storage call that succeeds."""
    from limits.errors import StorageError

    key = {"requests": "100/minute", "concurrency": 1}
    async with limited(upstream, **redis_store, key=key) as (gateway, client):
        store_ = gateway.rate_limiter._store_()
        real = store_.apply
        upstream.latency = 0.2
        call = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        while not upstream.requests:  # admitted, its slot taken
            await asyncio.sleep(0.01)

        async def blinks(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.undo()
            raise StorageError(ConnectionError("Connection reset by peer"))

        monkeypatch.setattr(store_, "apply", blinks)
        assert (await call).status_code == 200
        upstream.latency = 0.0
        assert store_.apply == real  # the blink happened, at the slot's freeing
        await asyncio.sleep(1.1)  # the guard waits a second before it asks Redis again
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        status = (await client.get("/v1/ratelimits")).json()["concurrency"]
        assert status == {"limit": 1, "in_flight": 0}


@pytest.mark.parametrize(
    ("strategy", "fails"),
    [
        ("fixed-window", "expiry"),  # the store's own reading of a window's end
        ("moving-window", "acquire_entry"),
        ("sliding-window-counter", "acquire_sliding_window_entry"),
    ],
)
async def test_a_storage_failure_after_the_slot_is_taken_frees_it(
    store: dict[str, str],
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    strategy: str,
    fails: str,
) -> None:
    """The storage times out once, between taking a request's slot and charging its
    windows: the request is admitted unchecked (fail open), and its slot is not held
    for the lease's 15 minutes."""
    from limits.errors import StorageError

    key = {"requests": "100/minute", "concurrency": 1}
    async with limited(upstream, **store, strategy=strategy, key=key) as (gateway, client):
        store_ = gateway.rate_limiter._store_()
        storage = store_ if fails == "expiry" else store_.storage

        async def times_out(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.undo()
            raise StorageError(TimeoutError("Timeout reading from socket"))

        monkeypatch.setattr(storage, fails, times_out)
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        status = (await client.get("/v1/ratelimits")).json()["concurrency"]
        assert status == {"limit": 1, "in_flight": 0}
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize(
    ("strategy", "hangs"),
    [
        ("fixed-window", "expiry"),  # the store's own reading of a window's end
        ("moving-window", "acquire_entry"),
        ("sliding-window-counter", "acquire_sliding_window_entry"),
    ],
)
async def test_a_request_cancelled_after_its_slot_is_taken_frees_it(
    store: dict[str, str],
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    strategy: str,
    hangs: str,
) -> None:
    """The storage hangs between taking a request's slot and charging its windows, and
    the host gives up on the request (a timeout of its own, a shutdown): the slot goes
    back at once, not when its lease ends (in memory: never)."""
    key = {"requests": "100/minute", "concurrency": 1}
    async with limited(upstream, **store, strategy=strategy, key=key) as (gateway, client):
        store_ = gateway.rate_limiter._store_()
        storage = store_ if hangs == "expiry" else store_.storage
        reached = asyncio.Event()

        async def hangs_once(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.undo()
            reached.set()
            await asyncio.Event().wait()

        monkeypatch.setattr(storage, hangs, hangs_once)
        call = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.wait_for(reached.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        status = (await client.get("/v1/ratelimits")).json()["concurrency"]
        assert status == {"limit": 1, "in_flight": 0}
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_redis_forgetting_its_scripts_loses_no_count(
    redis_store: dict[str, str], upstream: FakeUpstream
) -> None:
    key = {"requests": "5/minute", "concurrency": 3}
    import redis

    async with limited(upstream, **redis_store, key=key) as (_, client):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        with redis.Redis.from_url(redis_store["storage_uri"]) as admin:
            admin.script_flush()  # as a restarted Redis would have
        answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(5)]
        assert [r.status_code for r in answers] == [200] * 4 + [429]
        assert answers[-2].headers["x-ratelimit-remaining-requests"] == "0"
        status = (await client.get("/v1/ratelimits")).json()["concurrency"]
        assert status == {"limit": 3, "in_flight": 0}


async def test_a_stream_holds_its_slot_until_it_ends(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    upstream.chunk_latency = 0.02
    async with limited(upstream, **store, key={"concurrency": 1}) as (_, client):
        body = {**CHAT, "stream": True, "max_tokens": 20}
        stream = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        while not upstream.open_streams:
            await asyncio.sleep(0.01)
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 429
        assert (await stream).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


# Who is limited ----------------------------------------------------------------------


class Keys:
    """An account system in miniature: keys whose principals carry their own limits."""

    def __init__(self, principals: dict[str, Principal]) -> None:
        self.principals = principals

    async def authenticate(self, key: str) -> Principal | None:
        return self.principals.get(key)


async def test_key_and_account_limits_from_the_principal(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    # What an account system hands over: the key's tightest rpm, and its chain (root
    # first), each account with its own limits.
    parent = Level("acct-parent", rpm=3)
    child = Level("acct-child", rpm=10)
    keys = {
        "sk-alice-000000": Principal("alice", "sk-alice...", rpm=2, chain=(parent, child)),
        "sk-bob-00000000": Principal("bob", "sk-bob-0...", rpm=2, chain=(parent,)),
    }
    gateway = Gateway(
        GateSettings(
            providers={"openai": ProviderSettings(base_url="http://upstream/v1")},
            rate_limits={**store, "key": {"requests": "100/minute"}},
        ),
        authenticator=Keys(keys),
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream)),
    )
    async with (
        gateway,
        client_for(gateway, "sk-alice-000000") as alice,
        client_for(gateway, "sk-bob-00000000") as bob,
    ):
        statuses = [
            (await alice.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        # The key's own rpm replaced the settings' 100.
        assert (await alice.get("/v1/ratelimits")).json()["data"][0]["limit"] == 2
        assert (await bob.post("/v1/chat/completions", json=CHAT)).status_code == 200
        refused = await bob.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 429
        assert "account acct-parent" in refused.json()["error"]["message"]
        # Refused by the parent, bob's own count got the request back.
        assert await remaining(bob, "key", "requests") == 1
        assert await remaining(bob, "account", "requests", "acct-parent") == 0
        assert await remaining(alice, "account", "requests", "acct-child") == 8


async def test_model_limits_per_key_and_deployment_limits_for_all(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    keys = {
        "sk-alice-000000": Principal("alice", "sk-alice..."),
        "sk-bob-00000000": Principal("bob", "sk-bob-0..."),
    }
    gateway = Gateway(
        GateSettings(
            providers={"openai": ProviderSettings(base_url="http://upstream/v1")},
            rate_limits={
                **store,
                "models": {"gpt-4.1": {"requests": "1/minute"}},  # an alias works too
                "deployments": {"openai/gpt-4o": {"requests": "3/minute"}},
            },
        ),
        authenticator=Keys(keys),
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream)),
    )
    async with (
        gateway,
        client_for(gateway, "sk-alice-000000") as alice,
        client_for(gateway, "sk-bob-00000000") as bob,
    ):
        assert (await alice.post("/v1/chat/completions", json=CHAT)).status_code == 200
        refused = await alice.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 429
        assert "model openai/gpt-4.1" in refused.json()["error"]["message"]
        assert (await bob.post("/v1/chat/completions", json=CHAT)).status_code == 200

        other = {**CHAT, "model": "openai/gpt-4o"}
        statuses = [
            (await c.post("/v1/chat/completions", json=other)).status_code
            for c in (alice, bob, alice, bob)
        ]
        assert statuses == [200, 200, 200, 429]
        refused = await alice.post("/v1/chat/completions", json=other)
        assert "upstream openai/gpt-4o" in refused.json()["error"]["message"]
        snapshot = (await bob.get("/v1/ratelimits")).json()["data"]
        assert {(e["scope"], e["name"], e["remaining"]) for e in snapshot} == {
            ("model", "openai/gpt-4.1", 0),
            ("deployment", "openai/gpt-4o", 0),
        }


async def test_a_fallback_named_in_the_request_meets_its_model_limit(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    """A key limited to 1 request a minute on gpt-4.1 cannot get more of it by asking
    for another model with gpt-4.1 as its fallback (OpenRouter's `models`): each attempt
    at gpt-4.1 is charged gpt-4.1's limit for the key."""
    limits = {**store, "models": {"openai/gpt-4.1": {"requests": "1/minute"}}}
    # One failure cools a deployment down: gpt-4.1-nano is then skipped.
    gateway = make_gateway(upstream, rate_limits=limits, health_failures=1, health_cooldown=60)
    async with gateway, client_for(gateway) as client:
        detour = {
            "model": "openai/gpt-4.1-nano",
            "models": ["openai/gpt-4.1"],
            "messages": MESSAGES,
        }
        upstream.schedule(Fault(status=500))
        first = await client.post("/v1/chat/completions", json=detour)
        assert first.status_code == 200 and first.json()["model"] == "openai/gpt-4.1"
        second = await client.post("/v1/chat/completions", json=detour)
        assert second.status_code == 429
        assert "model openai/gpt-4.1" in second.json()["error"]["message"]


async def test_accounts_from_the_database_share_their_limits(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    gateway = make_billing_gateway(upstream, "memory://", rate_limits=store)
    async with gateway:
        parent, parent_key = await fund(gateway, "10", rpm=3)
        _, child_key = await fund(gateway, "10", parent=parent, rpm=3, key={"rpm": 2})
        async with client_for(gateway, child_key) as child, client_for(gateway, parent_key) as top:
            # The child's key: the tightest of its own 2 and its accounts' 3.
            statuses = [
                (await child.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(3)
            ]
            assert statuses == [200, 200, 429]
            # The parent's own key shares the parent's 3 with every key below it.
            assert (await top.post("/v1/chat/completions", json=CHAT)).status_code == 200
            refused = await top.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 429
            assert f"account {parent}" in refused.json()["error"]["message"]


async def test_requests_refused_by_their_key_leave_a_per_second_limit_alone(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    """A request refused by its key's limit gives back what it took of the others. A
    window ending within a second took nothing back (Redis's TTL is in whole seconds,
    and that slack applied in memory too): one key's refused retries filled the
    gateway's per-second limit, and the next key was refused by it."""
    other = "sk-other-0123456789abcdef"
    gateway = make_gateway(
        upstream,
        api_keys=[KEY, other],
        rate_limits={**store, "key": {"requests": "1/minute"}, "gateway": {"requests": "5/second"}},
    )
    async with gateway, client_for(gateway) as eager, client_for(gateway, other) as patient:
        while time.time() % 1 > 0.3:  # early in a second, so that all fit in it
            await asyncio.sleep(0.01)
        statuses = [(await eager.post("/v1/chat/completions", json=CHAT)).status_code]
        for _ in range(8):
            statuses.append((await eager.post("/v1/chat/completions", json=CHAT)).status_code)
        answer = await patient.post("/v1/chat/completions", json=CHAT)
    assert statuses == [200] + [429] * 8
    assert answer.status_code == 200, answer.text


def two_upstreams(upstream: FakeUpstream, **settings: Any) -> Gateway:
    """openai/gpt-4.1 served by "openai", then "backup" (the same fake upstream)."""
    return make_gateway(
        upstream,
        providers={
            "openai": ProviderSettings(base_url="http://upstream/v1"),
            "backup": ProviderSettings(base_url="http://upstream/v1"),
        },
        models={
            "openai/gpt-4.1": {
                "deployments": [{"provider": "openai"}, {"provider": "backup"}],
            }
        },
        **settings,
    )


async def test_a_full_upstream_is_skipped_for_the_next_candidate(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    gateway = two_upstreams(
        upstream,
        health_failures=1,
        rate_limits={**store, "deployments": {"openai": {"requests": "1/minute"}}},
    )
    body = {**CHAT, "provider": {"order": ["openai", "backup"]}}
    async with gateway, client_for(gateway) as client:
        first = await client.post("/v1/chat/completions", json=body)
        assert first.headers["x-gate-provider"] == "openai"
        for _ in range(2):
            second = await client.post("/v1/chat/completions", json=body)
            assert second.status_code == 200 and second.headers["x-gate-provider"] == "backup"
        # Full by our own count, not failing: the upstream is not cooled down.
        assert gateway.health.cooling_until("openai:gpt-4.1") == 0
        only = {**CHAT, "provider": {"order": ["openai"], "allow_fallbacks": False}}
        refused = await client.post("/v1/chat/completions", json=only)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        assert "upstream openai" in error["message"]
        assert int(refused.headers["retry-after"]) > 50


async def test_an_attempt_that_failed_gets_its_tokens_back_when_another_answers(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    """The first upstream (token-limited) fails, a second one without limits answers:
    the answer's tokens were not the first one's, so its window gets the estimate back.
    It was charged them: the last attempt with limits of its own was taken for the one
    that answered."""
    gateway = two_upstreams(
        upstream, rate_limits={**store, "deployments": {"openai": {"tokens": "100000/minute"}}}
    )
    body = {**CHAT, "provider": {"order": ["openai", "backup"]}}
    upstream.schedule(Fault(status=503))
    async with gateway, client_for(gateway) as client:
        answer = await client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200 and answer.headers["x-gate-provider"] == "backup"
        assert answer.headers["x-gate-attempts"] == "2"
        assert answer.json()["usage"]["total_tokens"] > 0
        assert await remaining(client, "deployment", "tokens") == 100000


class Refuses:
    """A later guard (a quota, say) that refuses every request."""

    async def admit(self, record: RequestRecord) -> None:
        raise GateError(
            "No credit left.", status=402, type="insufficient_quota", code="insufficient_quota"
        )

    async def settle(self, record: RequestRecord) -> None:
        pass


async def test_a_refusal_by_a_later_guard_gives_everything_back(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    gateway = Gateway(
        GateSettings(
            api_keys=[KEY],
            providers={"openai": ProviderSettings(base_url="http://upstream/v1")},
            rate_limits={
                **store,
                "key": {"requests": "5/minute", "tokens": "9000/minute", "concurrency": 1},
            },
        ),
        guards=[Refuses()],
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream)),
    )
    async with gateway, client_for(gateway) as client:
        for _ in range(3):
            refused = await client.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 402
            assert refused.headers["x-ratelimit-remaining-requests"] == "4"
        assert await remaining(client, "key", "requests") == 5
        assert await remaining(client, "key", "tokens") == 9000
        assert (await client.get("/v1/ratelimits")).json()["concurrency"]["in_flight"] == 0


class Tells:
    """A later guard that adds a header of its own, named as people write them."""

    async def admit(self, record: RequestRecord) -> None:
        record.headers["X-Team-Budget-Left"] = "12.50"

    async def settle(self, record: RequestRecord) -> None:
        pass


@pytest.mark.parametrize("endpoint", ["chat/completions", "embeddings"])
async def test_a_guards_headers_go_out_in_lower_case_beside_the_limits(
    upstream: FakeUpstream, endpoint: str
) -> None:
    """ASGI sends header names in lower case: Starlette's and the host's middleware
    look them up, and set them, by those names."""
    gateway = Gateway(
        GateSettings(
            api_keys=[KEY],
            providers={"openai": ProviderSettings(base_url="http://upstream/v1")},
            rate_limits={"key": {"requests": "5/minute"}},
        ),
        guards=[Tells()],
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream)),
    )
    embedding = {"model": "openai/text-embedding-3-small", "input": "hi"}
    body = CHAT if endpoint.startswith("chat") else embedding
    async with gateway, client_for(gateway) as client:
        answer = await client.post(f"/v1/{endpoint}", json=body)
        assert answer.status_code == 200
        names = [name for name, _ in answer.headers.raw]
        assert names == [name.lower() for name in names]
        assert answer.headers["x-team-budget-left"] == "12.50"
        assert answer.headers["x-ratelimit-remaining-requests"] == "4"


async def test_a_request_refused_before_its_limits_still_tells_them(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    """A bad body or an unknown model is refused before any limit is charged; the answer
    still carries OpenAI's headers, with nothing taken."""
    async with limited(upstream, **store, key={"requests": "5/minute"}) as (_, client):
        bad = await client.post("/v1/chat/completions", json={"model": "openai/gpt-4.1"})
        unknown = await client.post("/v1/chat/completions", json={**CHAT, "model": "no/such"})
        assert (bad.status_code, unknown.status_code) == (400, 404)
        for response in (bad, unknown):
            assert response.headers["x-ratelimit-limit-requests"] == "5"
            assert response.headers["x-ratelimit-remaining-requests"] == "5"
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert await remaining(client, "key", "requests") == 4


async def test_embeddings_token_limits_ignore_chat_fields(
    store: dict[str, str], upstream: FakeUpstream
) -> None:
    """`max_tokens` and `n` mean nothing to embeddings: sent anyway, huge, they must not
    inflate the token charge (on Redis past its integers: the limits were then taken
    for down, and everyone went unchecked)."""
    limits = {**store, "deployments": {"openai": {"tokens": "1000000/minute"}}}
    async with limited(upstream, **limits) as (_, client):
        body = {"model": "openai/text-embedding-3-small", "input": "hello"}
        huge = {**body, "max_tokens": 9 * 10**18, "n": 4}
        assert (await client.post("/v1/embeddings", json=huge)).status_code == 200
        left = await remaining(client, "deployment", "tokens")
        assert left >= 1000000 - 10


async def test_no_limits_no_headers(upstream: FakeUpstream) -> None:
    async with limited(upstream) as (_, client):
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert not [h for h in response.headers if h.startswith("x-ratelimit")]
        assert (await client.get("/v1/ratelimits")).json()["data"] == []


async def test_the_query_endpoint_needs_a_key(upstream: FakeUpstream) -> None:
    gateway = make_gateway(upstream, rate_limits={"key": {"requests": "3/minute"}})
    async with gateway, client_for(gateway, "sk-wrong-000000") as stranger:
        response = await stranger.get("/v1/ratelimits")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


async def test_the_query_endpoint_describes_each_limit(upstream: FakeUpstream) -> None:
    async with limited(
        upstream, key={"requests": "3/minute;100/day", "tokens": "9000/minute", "concurrency": 4}
    ) as (_, client):
        await client.post("/v1/chat/completions", json=CHAT)
        response = await client.get("/v1/ratelimits")
        body = response.json()
    assert body["object"] == "rate_limits" and body["key"] == "sk-test-..."
    assert body["strategy"] == "fixed-window"
    rpm, rpd, tpm = body["data"]
    assert (rpm["type"], rpm["limit"], rpm["remaining"], rpm["window"]) == (
        "requests",
        3,
        2,
        "minute",
    )
    assert rpm["window_seconds"] == 60 and 0 < rpm["reset_seconds"] <= 60
    assert (rpd["limit"], rpd["remaining"], rpd["window"]) == (100, 99, "day")
    assert tpm["type"] == "tokens" and 8900 < tpm["remaining"] < 9000
    assert body["concurrency"] == {"limit": 4, "in_flight": 0}
    assert response.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.998, "59.998s"),
        (60, "1m0s"),
        (86.4, "1m26.4s"),
        (360, "6m0s"),
        (3723.25, "1h2m3.25s"),
    ],
)
def test_resets_are_written_as_openai_writes_them(seconds: float, shown: str) -> None:
    from gate_middleware._limittext import duration

    assert duration(seconds) == shown


# Configuration -----------------------------------------------------------------------


def test_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATE_RATE_LIMITS__STORAGE_URI", "redis://127.0.0.1:6379/2")
    monkeypatch.setenv("GATE_RATE_LIMITS__KEY__REQUESTS", "60/minute;1000/day")
    monkeypatch.setenv("GATE_RATE_LIMITS__KEY__CONCURRENCY", "4")
    monkeypatch.setenv("GATE_RATE_LIMITS__MODELS", '{"openai/gpt-4.1": {"tokens": "30000/minute"}}')
    limits = GateSettings().rate_limits
    assert limits.storage_uri == "redis://127.0.0.1:6379/2"
    assert limits.key.requests == "60/minute;1000/day" and limits.key.concurrency == 4
    assert limits.models["openai/gpt-4.1"].tokens == "30000/minute"


def test_a_typo_in_a_limit_fails_at_start_up() -> None:
    with pytest.raises(ValidationError, match="60/fortnight"):
        GateSettings(rate_limits={"key": {"requests": "60/fortnight"}})


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"storage_uri": "memcached://127.0.0.1"}, "Unsupported rate-limit storage"),
        ({"models": {"acme/nothing": {"requests": "1/minute"}}}, "unknown model 'acme/nothing'"),
        ({"deployments": {"anthropic": {"requests": "1/minute"}}}, "provider is not configured"),
    ],
)
def test_configuration_mistakes_fail_when_the_gateway_is_built(
    upstream: FakeUpstream, limits: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make_gateway(upstream, rate_limits=limits)


# The storage going away --------------------------------------------------------------


class Proxy:
    """A TCP relay to Redis on loopback that can be cut and restored: an outage on demand."""

    def __init__(self, target: str) -> None:
        parts = httpx.URL(target)
        self.target = (parts.host, parts.port or 6379)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()
        self.writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[Proxy]:
    proxy = Proxy(redis_url)
    await proxy.start()
    yield proxy
    if proxy.server is not None and proxy.server.is_serving():
        await proxy.stop()


async def test_fail_open_admits_and_logs_once_per_incident(
    proxy: Proxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"redis://127.0.0.1:{proxy.port}/0"
    limits = {"storage_uri": uri, "key_prefix": f"gate-test-{uuid.uuid4().hex[:12]}"}
    async with limited(upstream, **limits, key={"requests": "100/minute"}) as (_, client):
        caplog.set_level(logging.WARNING, "gate_middleware.ratelimit")
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await proxy.stop()
        for _ in range(2):
            response = await client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200
            assert "x-ratelimit-limit-requests" not in response.headers
            await asyncio.sleep(1.05)  # past the pause between attempts: it tries again
        down = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(down) == 1 and "admitting requests unchecked" in down[0].getMessage()
        assert KEY not in caplog.text

        await proxy.start()
        await asyncio.sleep(1.1)
        back = await client.post("/v1/chat/completions", json=CHAT)
        assert back.headers["x-ratelimit-remaining-requests"] == "98"
        assert any("answers again" in r.getMessage() for r in caplog.records)
        await proxy.stop()
        await client.post("/v1/chat/completions", json=CHAT)
        assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 2


async def test_fail_closed_answers_503(upstream: FakeUpstream) -> None:
    limits = {"storage_uri": "redis://127.0.0.1:1/0", "on_storage_error": "closed"}
    async with limited(upstream, **limits, key={"requests": "100/minute"}) as (gateway, client):
        for _ in range(2):
            response = await client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "service_unavailable"
            assert "Rate limits cannot be checked" in error["message"]
        assert (await client.get("/v1/ratelimits")).status_code == 503
        with pytest.raises(openai.InternalServerError):
            await sdk(mounted(gateway)).chat.completions.create(**CHAT)
    assert len(upstream.requests) == 0


# Several processes, one Redis --------------------------------------------------------


async def test_two_server_processes_share_a_limit_on_redis(redis_url: str) -> None:
    """`gate-middleware serve` twice on one Redis: 7 a minute means 7, across both."""
    limit, burst = 7, 30
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATE_")}
    env |= {
        "GATE_API_KEYS": KEY,
        "GATE_RATE_LIMITS__STORAGE_URI": redis_url,
        "GATE_RATE_LIMITS__KEY_PREFIX": f"gate-test-{uuid.uuid4().hex[:12]}",
        "GATE_RATE_LIMITS__KEY__REQUESTS": f"{limit}/minute",
    }
    ports = [free_port(), free_port()]
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "gate_middleware", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        async with httpx2.AsyncClient(headers={"authorization": f"Bearer {KEY}"}) as http:
            for port in ports:
                await _until_up(http, f"http://127.0.0.1:{port}/healthz")
            # One each: the second process sees the first one's request.
            for n, port in enumerate(ports, 1):
                answer = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT)
                assert answer.headers["x-ratelimit-remaining-requests"] == str(limit - n)
            answers = await asyncio.gather(
                *(
                    http.post(f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions", json=CHAT)
                    for i in range(burst)
                )
            )
            statuses = sorted(a.status_code for a in answers)
            assert statuses == [200] * (limit - 2) + [429] * (burst - limit + 2)
            for port in ports:
                snapshot = (await http.get(f"http://127.0.0.1:{port}/v1/ratelimits")).json()
                assert snapshot["data"][0]["remaining"] == 0
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(10)


async def _until_up(http: httpx2.AsyncClient, url: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            if (await http.get(url)).json().get("status") == "ok":
                return
        except httpx2.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not come up")
        await asyncio.sleep(0.05)


async def test_get_key_reports_the_limits_that_apply(upstream: FakeUpstream) -> None:
    from .conftest import fund, make_billing_gateway

    gateway = make_billing_gateway(
        upstream,
        "memory://",
        rate_limits={"key": {"requests": "2/minute;50/day", "tokens": "9000/minute"}},
    )
    async with gateway:
        _, key = await fund(gateway, "1", rpm=1)  # the account is stricter than settings
        async with httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=mounted(gateway)),
            base_url="http://t",
            headers={"authorization": f"Bearer {key}"},
        ) as http:
            info = (await http.get("/v1/key")).json()["data"]["rate_limit"]
    assert info == {"requests": 1, "interval": "1m", "tokens": 9000, "requests_per_day": 50}
