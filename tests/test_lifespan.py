from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from gate_middleware import ConfigurationError, GateSettings, Gateway
from gate_middleware.testing import FakeUpstream

from .conftest import KEY, make_gateway, mounted, sdk


async def test_a_forgotten_lifespan_fails_loudly(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = make_gateway(upstream)  # never started
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk(mounted(gateway)).chat.completions.create(
            model="openai/gpt-4.1", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "gateway_not_started"
    assert "lifespan=gateway.lifespan" in caught.value.body["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "before its lifespan" in caplog.text
    assert len(upstream.requests) == 0


def test_fastapi_lifespan_starts_and_stops_the_gateway(upstream: FakeUpstream) -> None:
    gateway = make_gateway(upstream)
    app = FastAPI(lifespan=gateway.lifespan)
    app.mount("/v1", gateway)
    with TestClient(app) as client:
        assert gateway.started
        response = client.post(
            "/v1/chat/completions",
            json={"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert response.status_code == 200
    assert not gateway.started


async def test_context_manager_nests_and_closes_pools_once() -> None:
    closed = []

    class Tracked:
        async def startup(self) -> None: ...
        async def aclose(self) -> None:
            closed.append(True)

    gateway = Gateway(GateSettings(api_keys=[KEY]), providers={"acme": Tracked()})  # type: ignore[dict-item]
    async with gateway:
        async with gateway:
            assert gateway.started
        assert gateway.started and closed == []
    assert not gateway.started and closed == [True]


async def test_a_resource_that_fails_to_close_leaves_the_others_closed() -> None:
    """One resource's failure to close (a database out of reach when leases go back)
    left every resource after it open: pools, the limit storage."""
    closed = []

    class Tracked:
        def __init__(self, name: str, fails: bool = False) -> None:
            self.name, self.fails = name, fails

        async def startup(self) -> None: ...
        async def aclose(self) -> None:
            closed.append(self.name)
            if self.fails:
                raise ConnectionResetError("the database went away")

    providers = {"first": Tracked("first"), "second": Tracked("second", fails=True)}
    gateway = Gateway(GateSettings(api_keys=[KEY]), providers=providers)  # type: ignore[arg-type]
    with pytest.raises(ConnectionResetError):
        async with gateway:
            pass
    assert closed == ["second", "first"] and not gateway.started


async def test_the_gateway_as_the_root_app_runs_its_own_lifespan(upstream: FakeUpstream) -> None:
    gateway = make_gateway(upstream)
    host = Starlette(routes=[Mount("/v1", gateway)], lifespan=gateway.lifespan)
    with TestClient(host) as client:
        models = client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
    assert models.status_code == 200
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=host)) as http:
        after = await http.get("http://t/v1/models", headers={"authorization": f"Bearer {KEY}"})
    assert after.status_code == 500  # stopped again


def test_configuration_mistakes_fail_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="GATE_API_KEYS"):
        Gateway(GateSettings())
    with pytest.raises(ConfigurationError, match="not configured"):
        Gateway(
            GateSettings(
                api_keys=[KEY],
                providers={"openai": {"base_url": "http://x/v1"}},
                models={"acme/m": {"deployments": [{"provider": "nowhere"}]}},
            )
        )
    with pytest.raises(ConfigurationError, match="base_url"):
        Gateway(GateSettings(api_keys=[KEY], providers={"mycorp": {}}))
    with pytest.raises(ConfigurationError, match="Alias"):
        Gateway(GateSettings(api_keys=[KEY], aliases={"fast": "acme/none"}))


@pytest.mark.parametrize("database", ["memory://", "sqlite"])
def test_started_again_on_another_event_loop_bills_every_request(
    upstream: FakeUpstream, database: str, tmp_path: object
) -> None:
    """A test suite's TestClient per test: each lifespan runs on an event loop of its own."""
    url = f"sqlite:///{tmp_path}/gate.db" if database == "sqlite" else database
    admin = {"authorization": "Bearer sk-admin-0123456789abcdef"}
    # A lease a request: each one's hold waits on its purse's lock.
    gateway = make_gateway(
        upstream, database_url=url, admin_key=admin["authorization"][7:], quota_lease_usd=1e-9
    )
    app = FastAPI(lifespan=gateway.lifespan)
    app.mount("/v1", gateway)
    chat = {"model": "openai/gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}
    statuses = []
    for run in range(2):
        with TestClient(app) as client:
            if run == 0:
                account = client.post("/v1/accounts", headers=admin, json={"name": "a"}).json()
                client.post(
                    f"/v1/accounts/{account['id']}/topups", headers=admin, json={"amount_usd": "5"}
                )
                key = client.post(
                    f"/v1/accounts/{account['id']}/keys", headers=admin, json={"name": "k"}
                ).json()["key"]

            headers = {"authorization": f"Bearer {key}"}

            def call(n: int, client: TestClient = client, headers: dict = headers) -> int:
                body = {**chat, "max_tokens": 5, "stream": n % 2 == 0}
                return client.post("/v1/chat/completions", headers=headers, json=body).status_code

            with ThreadPoolExecutor(8) as pool:
                statuses += pool.map(call, range(16))
    assert statuses == [200] * 32
    with TestClient(app) as client:
        rows = client.get(
            "/v1/ledger",
            headers=admin,
            params={"account_id": account["id"], "kind": "request", "limit": 100},
        ).json()["data"]
        balance = client.get(f"/v1/accounts/{account['id']}", headers=admin).json()
    assert len(rows) == 32
    assert balance["spent_usd"] * 10**9 == pytest.approx(sum(r["amount_nanos"] for r in rows))
