from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from gate_middleware import GateSettings, Gateway, ProviderSettings, RequestRecord
from gate_middleware.testing import FakeUpstream

KEY = "sk-test-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """A real uvicorn server on loopback, in a thread of its own."""

    def __init__(self, app: ASGIApp, **config: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config.setdefault("log_level", "warning")
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, **config)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def records() -> list[RequestRecord]:
    return []


def make_gateway(
    upstream: ASGIApp, records: list[RequestRecord] | None = None, **settings: Any
) -> Gateway:
    settings.setdefault("api_keys", [KEY])
    settings.setdefault(
        "providers", {"openai": ProviderSettings(base_url="http://upstream/v1", api_key="up-key")}
    )
    return Gateway(
        GateSettings(**settings),
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream)),
        record_hooks=[records.append] if records is not None else (),
    )


def mounted(gateway: Gateway) -> Starlette:
    return Starlette(routes=[Mount("/v1", gateway)])


@pytest.fixture
async def gateway(upstream: FakeUpstream, records: list[RequestRecord]) -> AsyncIterator[Gateway]:
    gateway = make_gateway(upstream, records)
    async with gateway:
        yield gateway


def sdk(app: ASGIApp, key: str = KEY, **options: Any) -> openai.AsyncOpenAI:
    transport = httpx2.ASGITransport(app=app)
    return openai.AsyncOpenAI(
        base_url="http://gate.test/v1",
        api_key=key,
        http_client=httpx2.AsyncClient(transport=transport),
        max_retries=options.pop("max_retries", 0),
        **options,
    )


@pytest.fixture
def client(gateway: Gateway) -> openai.AsyncOpenAI:
    return sdk(mounted(gateway))


def chat_scope(key: str = KEY, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """The ASGI scope of a chat completion sent straight to the gateway (no client), for
    tests that need their own `receive` and `send`."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/chat/completions",
        "raw_path": b"/chat/completions",
        "query_string": b"",
        "root_path": "",
        "server": ("t", 80),
        "client": ("c", 1),
        "headers": [(b"authorization", f"Bearer {key}".encode()), *headers],
    }


def client_for(gateway: Gateway, key: str = KEY) -> httpx2.AsyncClient:
    """A raw HTTP client of the mounted gateway (base URL without /v1), with a key."""
    return httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=mounted(gateway)),
        base_url="http://gate.test",
        headers={"authorization": f"Bearer {key}"},
    )


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx2.AsyncClient]:
    async with client_for(gateway) as client:
        yield client


@pytest.fixture
def live_upstream() -> Iterator[tuple[FakeUpstream, str]]:
    upstream = FakeUpstream()
    with LiveServer(upstream) as server:
        yield upstream, server.url + "/v1"


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def _service_or_skip(name: str, url: str, probe: Any) -> str:
    """The service's URL, or a skip (a failure under CI=true) when it is not reachable."""
    try:
        probe()
    except Exception as exc:
        message = f"{name} is not reachable at {url}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: services are required)")
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("GATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

    def probe() -> None:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()

    return _service_or_skip("Redis", url, probe)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = os.environ.get("GATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

    def probe() -> None:
        import asyncpg

        async def connect() -> None:
            connection = await asyncpg.connect(url, timeout=2)
            await connection.close()

        asyncio.run(connect())

    return _service_or_skip("PostgreSQL", url, probe)


def hosts(apps: dict[str, ASGIApp]) -> ASGIApp:
    """One ASGI app that sends each request to the app named by its host."""

    async def dispatch(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        host = dict(scope["headers"]).get(b"host", b"").decode().split(":")[0]
        await apps[host](scope, receive, send)

    return dispatch


async def drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A fresh, empty database URL for the backend named by `request.param`."""
    kind = getattr(request, "param", "sqlite")
    if kind == "memory":
        yield "memory://"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'gate.db'}"
    elif kind == "sqlite-thread":  # the ledger written from a thread, not a process
        yield f"sqlite:///{tmp_path / 'gate.db'}?writer=thread"
    else:
        base = request.getfixturevalue("postgres_url")
        schema = f"gate_test_{uuid.uuid4().hex[:12]}"
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}schema={schema}"
        asyncio.run(drop_schema(base, schema))


BACKENDS = [
    "memory",
    "sqlite",
    "sqlite-thread",
    pytest.param("postgres", marks=pytest.mark.postgres),
]


ADMIN_KEY = "sk-admin-test-0123456789"


def make_billing_gateway(
    upstream: ASGIApp,
    database_url: str,
    records: list[RequestRecord] | None = None,
    **settings: Any,
) -> Gateway:
    """A gateway on a database: keys from accounts, the admin key, metering and quotas."""
    settings.setdefault("api_keys", [])
    settings.setdefault("admin_key", ADMIN_KEY)
    settings.setdefault("ledger_flush_seconds", 0.02)
    return make_gateway(upstream, records, database_url=database_url, **settings)


async def fund(
    gateway: Gateway,
    usd: str | None,
    *,
    parent: str | None = None,
    key: dict | None = None,
    **fields: Any,
) -> tuple[str, str]:
    """A new account (topped up with `usd`) and a key for it: (account id, secret)."""
    from gate_middleware.auth import Principal

    admin = Principal(id="admin", key_hint="admin", admin=True)
    assert gateway.accounting is not None
    accounts = gateway.accounting.accounts
    fields.setdefault("name", "test")
    account = await accounts.create_account(admin, {"parent_id": parent, **fields})
    if usd:
        await accounts.credit(admin, account.id, {"amount_usd": usd}, kind="topup")
    _, secret = await accounts.create_key(admin, account.id, {"name": "k", **(key or {})})
    return account.id, secret
