from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import openai
import pytest

from gate_middleware import GateSettings, Gateway, RequestRecord
from gate_middleware.health import RedisHealth
from gate_middleware.testing import FakeUpstream, Fault

from .conftest import KEY, LiveServer, hosts, mounted

MESSAGES = [{"role": "user", "content": "hi"}]


def build(
    a: FakeUpstream,
    b: FakeUpstream,
    records: list[RequestRecord] | None = None,
    health: Any = None,
    **overrides: Any,
) -> Gateway:
    settings: dict[str, Any] = {
        "api_keys": [KEY],
        "providers": {"a": {"base_url": "http://a/v1"}, "b": {"base_url": "http://b/v1"}},
        "models": {
            "house/duo": {
                "deployments": [
                    {"provider": "a", "model": "duo-a"},
                    {"provider": "b", "model": "duo-b"},
                ]
            },
            "house/solo": {"deployments": [{"provider": "a", "model": "solo"}]},
            "house/backup": {"deployments": [{"provider": "b", "model": "backup"}]},
        },
        "retry_backoff": 0.01,
        "health_failures": 100,
    }
    settings.update(overrides)
    return Gateway(
        GateSettings(**settings),
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=hosts({"a": a, "b": b}))),
        record_hooks=[records.append] if records is not None else (),
        health=health,
    )


@pytest.fixture
def a() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def b() -> FakeUpstream:
    return FakeUpstream()


async def post(
    gateway: Gateway, body: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx2.Response:
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=mounted(gateway)),
        base_url="http://gate.test",
        headers={"authorization": f"Bearer {KEY}", **(headers or {})},
    ) as http:
        return await http.post("/v1/chat/completions", json={"messages": MESSAGES, **body})


@pytest.fixture
async def gateway(a: FakeUpstream, b: FakeUpstream) -> AsyncIterator[Gateway]:
    gateway = build(a, b)
    async with gateway:
        yield gateway


RETRYABLE = [
    Fault(status=408),
    Fault(status=409),
    Fault(status=429),
    Fault(status=500),
    Fault(status=502),
    Fault(status=503),
    Fault(status=504),
    Fault(status=529),
    Fault(drop="before"),
    Fault(malformed=True),
]


@pytest.mark.parametrize(
    "fault", RETRYABLE, ids=lambda f: f"{f.status or ''}{f.drop or ''}{f.malformed or ''}"
)
@pytest.mark.parametrize("stream", [False, True])
async def test_retryable_failures_are_retried_transparently(
    gateway: Gateway, a: FakeUpstream, fault: Fault, stream: bool
) -> None:
    a.schedule(fault)
    response = await post(gateway, {"model": "house/solo", "stream": stream})
    assert response.status_code == 200
    assert response.headers["x-gate-attempts"] == "2"
    assert len(a.requests) == 2
    if stream:
        assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text


NOT_RETRYABLE = [
    (Fault(status=400), 400),
    (Fault(status=401), 403),  # the vendor refused the gateway's key
    (Fault(status=403), 403),
    (Fault(status=404), 404),
    (Fault(status=413), 413),
    (Fault(status=422), 422),
    (Fault(status=400, message="This model's maximum context length is 8192 tokens."), 400),
]


@pytest.mark.parametrize(("fault", "status"), NOT_RETRYABLE, ids=lambda x: str(x))
async def test_errors_no_retry_can_fix_go_straight_back(
    gateway: Gateway, a: FakeUpstream, b: FakeUpstream, fault: Fault, status: int
) -> None:
    a.schedule(fault)
    response = await post(gateway, {"model": "house/duo", "provider": {"order": ["a"]}})
    assert response.status_code == status
    assert response.headers["x-should-retry"] == "false"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert len(a.requests) == 1 and len(b.requests) == 0


async def test_retry_after_is_honoured(gateway: Gateway, a: FakeUpstream) -> None:
    a.schedule(Fault(status=429, retry_after=0.4), Fault(status=503, retry_after_ms=300))
    started = time.monotonic()
    response = await post(gateway, {"model": "house/solo"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.headers["x-gate-attempts"] == "3"
    assert 0.7 <= elapsed < 3


async def test_a_long_retry_after_goes_elsewhere_at_once(
    gateway: Gateway, a: FakeUpstream, b: FakeUpstream
) -> None:
    a.schedule(Fault(status=429, retry_after=3600))
    started = time.monotonic()
    response = await post(gateway, {"model": "house/duo", "provider": {"order": ["a", "b"]}})
    assert time.monotonic() - started < 1
    assert response.status_code == 200 and response.headers["x-gate-provider"] == "b"


async def test_a_long_retry_after_with_nowhere_to_go_is_returned(
    gateway: Gateway, a: FakeUpstream
) -> None:
    a.schedule(Fault(status=429, retry_after=3600))
    started = time.monotonic()
    response = await post(gateway, {"model": "house/solo"})
    assert time.monotonic() - started < 1
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3600"
    assert len(a.requests) == 1


async def test_each_deployment_waits_its_own_retry_after(
    gateway: Gateway, a: FakeUpstream, b: FakeUpstream
) -> None:
    duo = {"model": "house/duo", "provider": {"order": ["a", "b"]}}
    # a asks for 0.5 s, b fails without a wait: a is tried again after its 0.5 s.
    a.schedule(Fault(status=429, retry_after=0.5))
    b.schedule(Fault(status=500))
    started = time.monotonic()
    response = await post(gateway, duo)
    assert response.status_code == 200 and response.headers["x-gate-provider"] == "a"
    assert time.monotonic() - started >= 0.5
    # a fails without a wait, b asks for an hour: a is tried again, not given up on.
    a.schedule(Fault(status=500))
    b.schedule(Fault(status=429, retry_after=3600))
    response = await post(gateway, duo)
    assert response.status_code == 200 and response.headers["x-gate-provider"] == "a"


async def test_the_deadline_is_respected(a: FakeUpstream, b: FakeUpstream) -> None:
    gateway = build(a, b, max_retries=50, retry_backoff=0.2, retry_backoff_max=0.2)
    a.schedule(*[Fault(status=503)] * 50)
    async with gateway:
        started = time.monotonic()
        response = await post(gateway, {"model": "house/solo"}, {"x-gate-deadline": "0.7"})
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert elapsed < 1.2
    assert 2 <= len(a.requests) <= 8


async def test_max_retries_per_request_and_per_model(a: FakeUpstream, b: FakeUpstream) -> None:
    gateway = build(
        a, b, models={"house/solo": {"deployments": [{"provider": "a"}], "max_retries": 0}}
    )
    async with gateway:
        a.schedule(Fault(status=503))
        assert (await post(gateway, {"model": "house/solo"})).status_code == 503
        a.schedule(*[Fault(status=503)] * 3)
        capped = await post(gateway, {"model": "house/solo"}, {"x-gate-max-retries": "3"})
        assert capped.status_code == 200 and capped.headers["x-gate-attempts"] == "4"
        bad = await post(gateway, {"model": "house/solo"}, {"x-gate-max-retries": "lots"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-gate-max-retries"


async def test_a_stream_with_nothing_but_its_end_is_tried_again(
    a: FakeUpstream, b: FakeUpstream
) -> None:
    """An upstream answering 200 with only `data: [DONE]`: nothing reached the client,
    so another attempt answers; with none left, a 502 the client can tell apart."""
    gateway = build(
        a, b, models={"house/solo": {"deployments": [{"provider": "a"}], "max_retries": 0}}
    )
    async with gateway:
        a.schedule(Fault(empty=True))
        retried = await post(
            gateway, {"model": "house/solo", "stream": True}, {"x-gate-max-retries": "1"}
        )
        a.schedule(Fault(empty=True))
        alone = await post(gateway, {"model": "house/solo", "stream": True})
    assert retried.status_code == 200 and retried.headers["x-gate-attempts"] == "2"
    assert '"content"' in retried.text and retried.text.endswith("data: [DONE]\n\n")
    assert alone.status_code == 502
    assert alone.json()["error"]["code"] == "upstream_empty_stream"


async def test_deployments_fall_back_in_provider_order(
    gateway: Gateway, a: FakeUpstream, b: FakeUpstream
) -> None:
    a.schedule(Fault(status=503))
    response = await post(gateway, {"model": "house/duo", "provider": {"order": ["a", "b"]}})
    assert response.headers["x-gate-provider"] == "b"
    assert response.headers["x-gate-attempts"] == "2"
    assert response.json()["model"] == "house/duo"
    assert b.requests[-1]["body"]["model"] == "duo-b"
    # Routing fields are the gateway's own: the upstream never sees them.
    assert "provider" not in b.requests[-1]["body"]


async def test_allow_fallbacks_false_uses_only_the_listed_providers(
    gateway: Gateway, a: FakeUpstream, b: FakeUpstream
) -> None:
    a.schedule(*[Fault(status=503)] * 3)
    response = await post(
        gateway,
        {"model": "house/duo", "provider": {"order": ["a"], "allow_fallbacks": False}},
        {"x-gate-max-retries": "2"},
    )
    assert response.status_code == 503
    assert len(a.requests) == 3 and len(b.requests) == 0


async def test_cross_model_fallbacks_configured_and_per_request(
    a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = build(
        a,
        b,
        models={
            "house/solo": {"deployments": [{"provider": "a"}], "fallbacks": ["house/backup"]},
            "house/backup": {"deployments": [{"provider": "b", "model": "backup"}]},
            "house/other": {"deployments": [{"provider": "b", "model": "other"}]},
        },
    )
    async with gateway:
        a.schedule(Fault(status=529))
        configured = await post(gateway, {"model": "house/solo"})
        assert configured.json()["model"] == "house/backup"
        assert configured.headers["x-gate-provider"] == "b"
        a.schedule(Fault(status=500))
        asked = await post(gateway, {"model": "house/solo", "models": ["house/other"]})
        assert asked.json()["model"] == "house/other"
        a.schedule(Fault(status=500))
        only_models = await post(gateway, {"model": None, "models": ["house/solo", "house/other"]})
        assert only_models.status_code == 200 and only_models.json()["model"] == "house/other"
        bad = await post(gateway, {"model": "house/solo", "models": "house/other"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "models"


async def test_a_fallback_model_not_in_the_catalogue_is_tried(
    gateway: Gateway, a: FakeUpstream, b: FakeUpstream
) -> None:
    """`b/finetune-x` is served by the provider named `b` without a catalogue entry."""
    a.schedule(Fault(status=503), Fault(status=503))
    answer = await post(gateway, {"model": "house/solo", "models": ["b/finetune-x"]})
    assert answer.status_code == 200 and answer.json()["model"] == "b/finetune-x"
    assert [r["body"]["model"] for r in b.requests] == ["finetune-x"]
    # And the other way round: a model outside the catalogue falls back to one in it.
    a.schedule(Fault(status=503), Fault(status=503))
    answer = await post(gateway, {"model": "a/finetune-y", "models": ["house/backup"]})
    assert answer.status_code == 200 and answer.json()["model"] == "house/backup"
    assert len(a.requests) == 2  # each tried once: the fallback came next


async def test_context_length_errors_go_to_the_context_fallback(
    a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = build(
        a,
        b,
        models={
            "house/solo": {"deployments": [{"provider": "a"}], "context_fallback": "house/long"},
            "house/long": {"deployments": [{"provider": "b", "model": "long"}]},
        },
    )
    async with gateway:
        a.schedule(Fault(status=400, message="This model's maximum context length is 8192."))
        response = await post(gateway, {"model": "house/solo"})
    assert response.status_code == 200 and response.json()["model"] == "house/long"


async def test_a_failing_deployment_cools_down_and_recovers(
    a: FakeUpstream, b: FakeUpstream
) -> None:
    gateway = build(a, b, health_failures=2, health_cooldown=0.5, max_retries=0)
    order = {"model": "house/duo", "provider": {"order": ["a", "b"]}}
    async with gateway:
        a.schedule(Fault(status=503), Fault(status=503))
        for _ in range(2):
            assert (await post(gateway, order)).status_code == 503
        # Cooled down: requests skip a entirely.
        for _ in range(5):
            response = await post(gateway, order)
            assert response.headers["x-gate-provider"] == "b"
        assert len(a.requests) == 2
        await asyncio.sleep(0.6)
        # Half-open: one trial; it fails, so a is cooled again at once.
        a.schedule(Fault(status=503))
        assert (await post(gateway, order)).status_code == 503
        assert (await post(gateway, order)).headers["x-gate-provider"] == "b"
        assert len(a.requests) == 3
        await asyncio.sleep(0.6)
        # The trial succeeds: a is healthy again.
        assert (await post(gateway, order)).headers["x-gate-provider"] == "a"
        assert (await post(gateway, order)).headers["x-gate-provider"] == "a"
        # Cooled again; its trial is refused for the caller's own fault (a 400): a
        # answered, so it is healthy (it was skipped for one more cooldown).
        a.schedule(Fault(status=503), Fault(status=503))
        for _ in range(2):
            assert (await post(gateway, order)).status_code == 503
        await asyncio.sleep(0.6)
        a.schedule(Fault(status=400))
        assert (await post(gateway, order)).status_code == 400
        assert (await post(gateway, order)).headers["x-gate-provider"] == "a"


@pytest.mark.parametrize("storage", ["memory", "redis"])
async def test_half_open_sends_one_trial_not_every_request(
    a: FakeUpstream, b: FakeUpstream, storage: str, request: pytest.FixtureRequest
) -> None:
    health = None
    if storage == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = f"gate-test:{uuid.uuid4().hex}:"
        health = RedisHealth(url, failures=1, cooldown=0.5, prefix=prefix, refresh=0.05)
    gateway = build(a, b, health=health, health_failures=1, health_cooldown=0.5)
    order = {"model": "house/duo", "provider": {"order": ["a", "b"]}}
    async with gateway:
        a.schedule(Fault(status=503))
        assert (await post(gateway, order)).headers["x-gate-provider"] == "b"
        await asyncio.sleep(0.6)
        # Still dead, and slow to say so: one request's trial, the others go to b.
        a.schedule(*[Fault(status=503, latency=0.3)] * 10)
        answers = await asyncio.gather(*(post(gateway, order) for _ in range(10)))
    assert [r.status_code for r in answers] == [200] * 10
    assert len(a.requests) == 2


async def test_all_cooling_is_a_503_with_retry_after(a: FakeUpstream, b: FakeUpstream) -> None:
    gateway = build(a, b, health_failures=1, health_cooldown=30, max_retries=0)
    async with gateway:
        a.schedule(Fault(status=500))
        assert (await post(gateway, {"model": "house/solo"})).status_code == 500
        response = await post(gateway, {"model": "house/solo"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_healthy_deployment"
    assert 25 <= int(response.headers["retry-after"]) <= 30
    assert len(a.requests) == 1


async def test_redis_health_out_of_reach_at_start_does_not_stop_the_gateway(
    a: FakeUpstream, b: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    health = RedisHealth("redis://127.0.0.1:1/0", refresh=0.05)
    gateway = build(a, b, health=health)
    async with gateway:
        assert (await post(gateway, {"model": "house/solo"})).status_code == 200
    assert "Redis health storage is unreachable" in caplog.text


async def test_health_is_shared_through_redis(
    a: FakeUpstream, b: FakeUpstream, redis_url: str
) -> None:
    prefix = f"gate-test:{uuid.uuid4().hex}:"

    def shared() -> RedisHealth:
        return RedisHealth(redis_url, failures=2, cooldown=30, prefix=prefix, refresh=0.05)

    first, second = build(a, b, health=shared(), max_retries=0), build(a, b, health=shared())
    order = {"model": "house/duo", "provider": {"order": ["a", "b"]}}
    async with first, second:
        a.schedule(Fault(status=503), Fault(status=503))
        for _ in range(2):
            assert (await post(first, order)).status_code == 503
        await asyncio.sleep(0.3)  # the other process's snapshot refreshes
        response = await post(second, order)
        assert response.headers["x-gate-provider"] == "b"
        assert len(a.requests) == 2


async def test_timeouts_are_retried(records: list[RequestRecord]) -> None:
    slow = FakeUpstream()
    with LiveServer(slow) as server:
        gateway = Gateway(
            GateSettings(
                api_keys=[KEY],
                providers={"openai": {"base_url": server.url + "/v1", "read_timeout": 0.3}},
                retry_backoff=0.01,
            ),
            record_hooks=[records.append],
        )
        slow.schedule(Fault(latency=2))
        async with gateway:
            client = openai.AsyncOpenAI(
                base_url="http://gate.test/v1",
                api_key=KEY,
                max_retries=0,
                http_client=httpx2.AsyncClient(
                    transport=httpx2.ASGITransport(app=mounted(gateway))
                ),
            )
            raw = await client.chat.completions.with_raw_response.create(
                model="openai/gpt-4.1", messages=MESSAGES
            )
    assert raw.headers["x-gate-attempts"] == "2"
    assert records[-1].attempts == 2 and records[-1].status == 200


async def test_a_context_fallback_the_key_may_not_use_is_never_tried(
    a: FakeUpstream, b: FakeUpstream
) -> None:
    """A key allowed only house/solo: a prompt too long for it is not handed to the
    longer-context house/long, which the key may not use; the upstream's error stands."""
    from .conftest import fund

    gateway = build(
        a,
        b,
        api_keys=[],
        admin_key="sk-admin-context",
        database_url="memory://",
        unpriced_models="free",
        models={
            "house/solo": {"deployments": [{"provider": "a"}], "context_fallback": "house/long"},
            "house/long": {"deployments": [{"provider": "b", "model": "long"}]},
        },
    )
    async with gateway:
        _, secret = await fund(gateway, "1", key={"allowed_models": ["house/solo"]})
        a.schedule(Fault(status=400, message="This model's maximum context length is 8192."))
        async with httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=mounted(gateway)),
            base_url="http://gate.test",
            headers={"authorization": f"Bearer {secret}"},
        ) as http:
            body = {"model": "house/solo", "messages": MESSAGES}
            response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and "context length" in response.json()["error"]["message"]
    assert len(b.requests) == 0
