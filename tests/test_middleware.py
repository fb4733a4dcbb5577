from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from types import ModuleType

import httpx2
import pytest
from fastapi import BackgroundTasks, FastAPI, Request
from starlette.testclient import TestClient

from gate_middleware import (
    GateError,
    GateMiddleware,
    GateSettings,
    Gateway,
    RequestRecord,
    gate_exception_handler,
)
from gate_middleware.testing import FakeUpstream

from .conftest import KEY, LiveServer
from .test_examples import load

AUTH = {"authorization": f"Bearer {KEY}"}


class Budget:
    """A guard that admits `left` requests, then refuses with 402 (like a spent quota)."""

    def __init__(self, left: int) -> None:
        self.left = left
        self.settled: list[RequestRecord] = []

    async def admit(self, record: RequestRecord) -> None:
        if self.left <= 0:
            raise GateError(
                "Out of credit.", status=402, type="insufficient_quota", code="insufficient_quota"
            )
        self.left -= 1

    async def settle(self, record: RequestRecord) -> None:
        self.settled.append(record)


@pytest.fixture
def example(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[ModuleType, str, list[RequestRecord]]]:
    monkeypatch.setenv("GATE_FAKE_LATENCY", "0.02")
    module = load("examples.host_routes", monkeypatch)
    records: list[RequestRecord] = []
    module.gateway.record_hooks.append(records.append)
    with LiveServer(module.app) as server:
        yield module, server.url, records


def hello_app(gateway: Gateway) -> FastAPI:
    """A host app whose guarded routes `/ai/{name}` each make one chat call."""
    app = FastAPI()
    app.add_middleware(GateMiddleware, gateway=gateway, paths=["/ai/*"])

    @app.post("/ai/{name}")
    async def hello(name: str, request: Request) -> dict[str, str]:
        answer = await request.state.gate.chat(
            model="openai/gpt-4.1", messages=[{"role": "user", "content": "hello"}]
        )
        return {"text": answer["choices"][0]["message"]["content"]}

    return app


def plain_app(gateway: Gateway) -> FastAPI:
    """A host app whose guarded route `/ai/plain` calls no model."""
    app = FastAPI()
    app.add_middleware(GateMiddleware, gateway=gateway, paths=["/ai/*"])

    @app.post("/ai/plain")
    async def plain() -> dict[str, bool]:
        return {"ok": True}

    return app


async def post_routes(app: FastAPI, key: str, path: str, times: int) -> list[httpx2.Response]:
    """`times` POSTs to a host route, one after another, with `key`."""
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx2.AsyncClient(transport=transport, base_url="http://host") as http:
        headers = {"authorization": f"Bearer {key}"}
        return [await http.post(path, headers=headers) for _ in range(times)]


async def test_unauthenticated_calls_are_refused(
    example: tuple[ModuleType, str, list[RequestRecord]],
) -> None:
    _, url, records = example
    async with httpx2.AsyncClient() as http:
        missing = await http.post(url + "/summarize", json={"text": "hello"})
        wrong = await http.post(
            url + "/summarize",
            json={"text": "hello"},
            headers={"authorization": "Bearer sk-nope-12345"},
        )
    for response in (missing, wrong):
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.headers["x-request-id"]
    assert all(r.endpoint != "chat.completions" for r in records)


async def test_a_host_route_is_metered_as_its_caller(
    example: tuple[ModuleType, str, list[RequestRecord]],
) -> None:
    _, url, records = example
    async with httpx2.AsyncClient() as http:
        response = await http.post(url + "/summarize", json={"text": "A long text."}, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["summary"] and body["usage"]["completion_tokens"] == 16
    route = next(r for r in records if r.endpoint == "route")
    call = next(r for r in records if r.endpoint == "chat.completions")
    assert call.route == "/summarize" and call.parent_id == route.request_id
    assert call.principal == route.principal and call.key_hint == KEY[:8] + "..."
    assert call.completion_tokens == 16 and call.model_id == "openai/gpt-4.1-mini"
    assert route.status == 200 and route.request_id == response.headers["x-request-id"]


async def test_streaming_through_a_host_route(
    example: tuple[ModuleType, str, list[RequestRecord]],
) -> None:
    _, url, records = example
    arrivals, text = [], ""
    async with (
        httpx2.AsyncClient(timeout=10) as http,
        http.stream(
            "POST", url + "/summarize/stream", json={"text": "Stream it."}, headers=AUTH
        ) as response,
    ):
        async for piece in response.aiter_text():
            arrivals.append(time.monotonic())
            text += piece
    assert response.status_code == 200
    assert len(text.split()) == 16
    assert arrivals[-1] - arrivals[0] > 0.15  # 16 words 20 ms apart: not buffered
    call = next(r for r in records if r.endpoint == "chat.completions")
    assert call.stream and call.route == "/summarize/stream" and call.completion_tokens == 16


async def test_the_dependency_and_the_sdk_inside_a_handler(
    example: tuple[ModuleType, str, list[RequestRecord]],
) -> None:
    _, url, records = example
    async with httpx2.AsyncClient() as http:
        response = await http.post(url + "/translate", json={"text": "cat"}, headers=AUTH)
        refused = await http.post(url + "/translate", json={"text": "cat"})
    assert response.status_code == 200 and response.json()["translation"]
    assert next(r for r in records if r.endpoint == "chat.completions").route == "/translate"
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"


async def test_routes_outside_the_patterns_and_websockets_are_untouched(
    example: tuple[ModuleType, str, list[RequestRecord]], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, url, records = example
    async with httpx2.AsyncClient() as http:
        health = await http.get(url + "/health")
        models = await http.get(url + "/v1/models", headers=AUTH)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert "x-request-id" not in health.headers
    assert models.status_code == 200
    assert records == []
    with TestClient(module.app) as client, client.websocket_connect("/ws") as socket:
        socket.send_text("ping")
        assert socket.receive_text() == "ping"


def test_limits_and_quota_on_a_host_route() -> None:
    budget = Budget(left=3)
    gateway = Gateway(GateSettings(api_keys=[KEY]), guards=[budget])
    app = FastAPI(lifespan=gateway.lifespan)
    app.add_middleware(GateMiddleware, gateway=gateway, paths=["/ai/*"])
    app.add_exception_handler(GateError, gate_exception_handler)
    ran: list[str] = []

    @app.post("/ai/twice")
    async def twice(request: Request, tasks: BackgroundTasks) -> dict[str, int]:
        gate = request.state.gate
        for _ in range(2):
            await gate.chat(model="openai/gpt-4.1", messages=[{"role": "user", "content": "x"}])
        tasks.add_task(ran.append, "background")
        return {"calls": 2}

    with TestClient(app) as client:
        first = client.post("/ai/twice", headers=AUTH)  # route + 2 calls: 3 admitted
        assert first.status_code == 200 and ran == ["background"]
        second = client.post("/ai/twice", headers=AUTH)  # the route itself is refused
    assert second.status_code == 402
    assert second.json()["error"]["code"] == "insufficient_quota"
    # Every admitted request was settled exactly once: the route and its two calls.
    assert sorted(r.endpoint for r in budget.settled) == [
        "chat.completions",
        "chat.completions",
        "route",
    ]


def test_a_refused_model_call_inside_a_handler_renders_openai_shaped() -> None:
    budget = Budget(left=2)
    gateway = Gateway(GateSettings(api_keys=[KEY]), guards=[budget])
    app = FastAPI(lifespan=gateway.lifespan)
    app.add_middleware(GateMiddleware, gateway=gateway, paths=["/ai/*"])

    @app.post("/ai/twice")
    async def twice(request: Request) -> dict[str, int]:
        for _ in range(2):
            await request.state.gate.chat(
                model="openai/gpt-4.1", messages=[{"role": "user", "content": "x"}]
            )
        return {"calls": 2}

    with TestClient(app) as client:
        response = client.post("/ai/twice", headers=AUTH)
    assert response.status_code == 402
    assert response.json()["error"]["type"] == "insufficient_quota"
    assert response.headers["x-request-id"]


async def test_host_route_calls_are_charged_to_the_callers_account(
    upstream: FakeUpstream,
) -> None:
    from gate_middleware.storage import LedgerQuery

    from .conftest import fund, make_billing_gateway

    gateway = make_billing_gateway(upstream, "memory://", quota_max_tokens=16)
    app = hello_app(gateway)

    async with gateway:
        # Enough for a couple of calls of 16 completion tokens at 8 USD per million.
        account, key = await fund(gateway, "0.0004")
        *answered, refused = await post_routes(app, key, "/ai/hello", 7)
        statuses = [response.status_code for response in answered]
        assert gateway.accounting is not None
        await gateway.accounting.writer.flush()
        rows = await gateway.accounting.storage.rows(LedgerQuery(account_id=account))
        stored = await gateway.accounting.storage.account(account)
    assert statuses[0] == 200 and 402 in statuses
    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "insufficient_quota"
    charged = [r for r in rows if r.amount and r.route == "/ai/hello"]
    assert charged and all(r.model == "openai/gpt-4.1" for r in charged)
    # Only model calls are on the ledger, each naming the route request that made it.
    requests = [r for r in rows if r.kind == "request"]
    assert requests and all(
        r.route == "/ai/hello" and r.parent_id and r.parent_id != r.id for r in requests
    )
    assert stored is not None and 0 < stored.spent <= stored.credits


async def test_a_host_routes_own_hold_goes_back_when_it_ends(upstream: FakeUpstream) -> None:
    """A guarded route holds the least amount of its caller's balance while it runs
    and gives it back at its end: with 3 nanodollars, any number of routes that call
    no model pass one after another, and nothing stays held."""
    from .conftest import fund, make_billing_gateway

    gateway = make_billing_gateway(upstream, "memory://")
    app = plain_app(gateway)

    async with gateway:
        account, key = await fund(gateway, "0.000000003")
        statuses = [r.status_code for r in await post_routes(app, key, "/ai/plain", 10)]
        assert gateway.accounting is not None and gateway.accounting.book is not None
        purse = gateway.accounting.book.purse("account", account)
    assert statuses == [200] * 10
    assert purse.held == 0


async def test_a_host_route_path_with_a_nul_is_400(upstream: FakeUpstream) -> None:
    """A path with "%00" (servers decode it) named the route on every ledger row of the
    request's model calls: PostgreSQL refused those rows, so they were charged but never
    on the ledger. Refused at the door instead."""
    from .conftest import fund, make_billing_gateway

    gateway = make_billing_gateway(upstream, "memory://")
    app = hello_app(gateway)

    async with gateway:
        _, key = await fund(gateway, "1")
        async with httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=app), base_url="http://host"
        ) as http:
            ok = await http.post("/ai/hello", headers={"authorization": f"Bearer {key}"})
            nul = await http.post("/ai/he%00llo", headers={"authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    assert nul.status_code == 400 and nul.json()["error"]["type"] == "invalid_request_error"
    assert len(upstream.requests) == 1


def _refusing_app(budget: Budget) -> tuple[Gateway, FastAPI]:
    from fastapi import Depends
    from fastapi.responses import StreamingResponse

    from gate_middleware import GateContext, GateDependency

    gateway = Gateway(GateSettings(api_keys=[KEY]), guards=[budget])
    app = FastAPI(lifespan=gateway.lifespan)
    app.add_middleware(GateMiddleware, gateway=gateway, paths=["/ai/*"])
    app.add_exception_handler(GateError, gate_exception_handler)
    messages = [{"role": "user", "content": "x"}]

    @app.post("/ai/sdk")
    async def sdk_route(request: Request) -> dict[str, str]:
        answer = await request.state.gate.openai().chat.completions.create(
            model="openai/gpt-4.1", messages=messages
        )
        return {"text": answer.choices[0].message.content}

    @app.post("/dep/sdk")
    async def dep_route(gate: GateContext = Depends(GateDependency(gateway))) -> dict[str, str]:
        client = gate.openai()
        answer = await client.chat.completions.create(model="openai/gpt-4.1", messages=messages)
        return {"text": answer.choices[0].message.content}

    @app.post("/ai/stream")
    async def stream_route(request: Request) -> StreamingResponse:
        chunks = await request.state.gate.chat(
            model="openai/gpt-4.1", messages=messages, stream=True
        )

        async def text():  # type: ignore[no-untyped-def]
            async for chunk in chunks:
                for choice in chunk["choices"]:
                    yield choice["delta"].get("content") or ""

        return StreamingResponse(text(), media_type="text/plain")

    return gateway, app


@pytest.mark.parametrize("path", ["/ai/sdk", "/dep/sdk", "/ai/stream"])
def test_refusals_of_sdk_and_stream_calls_keep_their_status(path: str) -> None:
    budget = Budget(left=1)  # the route's own admission passes; its model call does not
    _, app = _refusing_app(budget)
    with TestClient(app) as client:
        response = client.post(path, headers=AUTH)
    assert response.status_code == 402, response.text
    assert response.json()["error"]["code"] == "insufficient_quota"


def test_sdk_and_stream_calls_work_when_admitted() -> None:
    _, app = _refusing_app(Budget(left=100))
    with TestClient(app) as client:
        for path in ("/ai/sdk", "/dep/sdk"):
            response = client.post(path, headers=AUTH)
            assert response.status_code == 200 and response.json()["text"]
        streamed = client.post("/ai/stream", headers=AUTH)
    assert streamed.status_code == 200 and len(streamed.text.split()) == 16


async def test_a_guarded_routes_calls_ride_on_its_own_slot(upstream: FakeUpstream) -> None:
    """With one request in flight allowed, a guarded route's own model call found the
    slot taken by the route's request: every such route answered 429."""
    from .conftest import make_gateway

    gateway = make_gateway(upstream, rate_limits={"key": {"concurrency": 1}})
    app = hello_app(gateway)
    async with (
        gateway,
        httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=app),
            base_url="http://host",
            headers={"authorization": f"Bearer {KEY}"},
        ) as http,
    ):
        assert (await http.post("/ai/hello")).status_code == 200
        upstream.latency = 0.2
        both = await asyncio.gather(http.post("/ai/one"), http.post("/ai/two"))
        # The second route request waits for no slot: it is refused, as any would be.
        assert sorted(r.status_code for r in both) == [200, 429]
        upstream.latency = 0.0
        assert (await http.post("/ai/again")).status_code == 200  # nothing left taken


async def test_a_host_routes_hold_goes_back_when_a_later_guard_fails(
    upstream: FakeUpstream,
) -> None:
    """A guard after the quota's that fails with no `GateError` (its backend out of
    reach, a bug): the route answers 500 and never reaches its end, so its hold goes
    back when the guards' admission is undone. With 3 nanodollars, three such failures
    left the account unable to pass a route (402) with nothing spent."""
    from .conftest import fund, make_billing_gateway

    class Flaky:
        def __init__(self) -> None:
            self.failures = 3

        async def admit(self, record: RequestRecord) -> None:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("the team budget service is out of reach")

        async def settle(self, record: RequestRecord) -> None:
            pass

    gateway = make_billing_gateway(upstream, "memory://")
    gateway.guards.append(Flaky())
    app = plain_app(gateway)

    async with gateway:
        account, key = await fund(gateway, "0.000000003")
        statuses = [r.status_code for r in await post_routes(app, key, "/ai/plain", 5)]
        assert gateway.accounting is not None and gateway.accounting.book is not None
        purse = gateway.accounting.book.purse("account", account)
    assert statuses == [500, 500, 500, 200, 200]
    assert purse.held == 0
