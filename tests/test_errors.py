from __future__ import annotations

import httpx2
import openai
import pytest
from starlette.types import Receive, Scope, Send

from gate_middleware import GateSettings, Gateway, ProviderSettings, RequestRecord
from gate_middleware.storage import LedgerQuery
from gate_middleware.testing import FakeUpstream, Fault

from .conftest import (
    KEY,
    LiveServer,
    chat_scope,
    client_for,
    fund,
    make_billing_gateway,
    make_gateway,
    mounted,
    sdk,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def assert_openai_error(body: dict, *, param: str | None = None, code: str | None = None) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": 5, "messages": MESSAGES}, "model"),
        ({"model": "openai/gpt-4.1\u0000", "messages": MESSAGES}, "model"),
        ({"model": "openai/gpt-4.1"}, "messages"),
        ({"model": "openai/gpt-4.1", "messages": "hi"}, "messages"),
        ({"model": "openai/gpt-4.1", "messages": []}, "messages"),
        ({"model": "openai/gpt-4.1", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "openai/gpt-4.1", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "openai/gpt-4.1", "messages": MESSAGES, "max_tokens": "9"}, "max_tokens"),
        ({"model": "openai/gpt-4.1", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": "openai/gpt-4.1", "messages": MESSAGES, "temperature": True}, "temperature"),
    ],
)
async def test_bad_chat_bodies_name_the_param(
    http: httpx2.AsyncClient, upstream: FakeUpstream, body: dict, param: str
) -> None:
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert_openai_error(response.json(), param=param)
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert len(upstream.requests) == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
async def test_malformed_json_is_400(http: httpx2.AsyncClient, raw: bytes) -> None:
    response = await http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert_openai_error(response.json())


@pytest.mark.parametrize("parser", ["stdlib", "orjson"])
async def test_json_nested_too_deep_is_400(
    http: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch, parser: str
) -> None:
    """Deeper than the interpreter's stack (the standard library raises RecursionError)
    or orjson's limit: bad input, not a gateway failure, whichever parser is installed."""
    from gate_middleware import _json

    if parser == "stdlib":
        monkeypatch.setattr(_json, "loads", _json.stdlib_loads)
    else:
        pytest.importorskip("orjson")
    deep = b'{"model": "openai/gpt-4.1", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = await http.post(
        "/v1/chat/completions", content=deep, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert_openai_error(response.json())
    # Shallow enough to decode, too deep to encode again (the surrogate check does): a
    # few depths around the interpreter's limit, wherever the stack stands.
    for depth in range(900, 1000, 3):
        deep = b'{"model": "openai/gpt-4.1", "messages": ' + b"[" * depth
        deep += b'"\\ud83d\\ude00"' + b"]" * depth + b"}"
        response = await http.post(
            "/v1/chat/completions", content=deep, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, depth


@pytest.mark.parametrize("parser", ["stdlib", "orjson"])
async def test_nan_and_infinity_are_400(
    http: httpx2.AsyncClient, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, parser: str
) -> None:
    """Not JSON: orjson refused them, the standard library's parser sent them upstream."""
    from gate_middleware import _json

    if parser == "stdlib":
        monkeypatch.setattr(_json, "loads", _json.stdlib_loads)
        monkeypatch.setattr(_json, "dumps", _json.stdlib_dumps)
    else:
        pytest.importorskip("orjson")
    raw = b'{"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "x"}], '
    for value in (b"NaN", b"Infinity", b"-Infinity"):
        response = await http.post(
            "/v1/chat/completions",
            content=raw + b'"temperature": ' + value + b"}",
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
    assert len(upstream.requests) == 0


@pytest.mark.parametrize("parser", ["stdlib", "orjson"])
@pytest.mark.parametrize(
    "raw",
    [
        rb'{"model": "openai/gpt-4.1\ud800", "messages": [{"role": "user", "content": "x"}]}',
        rb'{"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "x\uDFFF"}]}',
    ],
)
async def test_unpaired_surrogate_is_400(
    http: httpx2.AsyncClient,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    parser: str,
    raw: bytes,
) -> None:
    """An escaped lone surrogate is text no UTF-8 carries: with the standard library's
    parser it was a 500 when forwarded, and a model name with one made a ledger row no
    database stores. Refused up front, as orjson does."""
    from gate_middleware import _json

    if parser == "stdlib":
        monkeypatch.setattr(_json, "loads", _json.stdlib_loads)
        monkeypatch.setattr(_json, "dumps", _json.stdlib_dumps)
    else:
        pytest.importorskip("orjson")
    response = await http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert_openai_error(response.json())
    assert len(upstream.requests) == 0
    # A surrogate pair escaped (an emoji) is fine.
    emoji = rb'{"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": '
    emoji += rb'"\ud83d\ude00"}]}'
    ok = await http.post(
        "/v1/chat/completions", content=emoji, headers={"content-type": "application/json"}
    )
    assert ok.status_code == 200
    assert upstream.requests[-1]["body"]["messages"][0]["content"] == "\U0001f600"


@pytest.mark.parametrize(
    "extra",
    [
        {"models": ["openai/gpt-4.1\x00"]},  # `models` alone: its first is the model
        {"model": "openai/gpt-4.1", "models": ["openai/gpt-4.1-mini\x00"]},
    ],
)
async def test_nul_in_models_is_400(
    http: httpx2.AsyncClient, upstream: FakeUpstream, extra: dict[str, object]
) -> None:
    """A NUL in `model` was refused, not in OpenRouter's `models`: the model that
    answered then named a ledger row PostgreSQL refuses (unpriced models served free)."""
    response = await http.post("/v1/chat/completions", json={"messages": MESSAGES, **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == "models"
    assert len(upstream.requests) == 0


async def test_an_unknown_fallback_in_models_names_that_param(
    http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    body = {"model": "openai/gpt-4.1", "models": ["acme/nothing"], "messages": MESSAGES}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("models", "model_not_found")
    assert len(upstream.requests) == 0


@pytest.mark.parametrize("field", ["model", "models"])
async def test_a_model_name_too_long_is_400_and_no_ledger_bloat(
    upstream: FakeUpstream, field: str
) -> None:
    """A key with no money sent 4 MB model names: each refused request stored the name
    in its ledger row at every level (20 requests grew the database by 160 MB)."""
    gateway = make_billing_gateway(upstream, "memory://")
    name = "openai/" + "x" * 300
    body = {"model": name} if field == "model" else {"models": [name]}
    async with gateway:
        account, secret = await fund(gateway, None)
        async with client_for(gateway, secret) as http:
            response = await http.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
        assert gateway.accounting is not None
        await gateway.accounting.writer.flush()
        rows = await gateway.accounting.storage.rows(LedgerQuery(account_id=account))
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert name not in response.text
    assert all(row.model is None for row in rows)


async def test_sdk_raises_its_own_classes(client: openai.AsyncOpenAI, gateway: object) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="acme/nothing", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    assert "GET /models" in not_found.value.message
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="openai/gpt-4.1", messages=[])
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        await client.embeddings.create(model="openai/gpt-4.1", input="x")
    assert wrong_kind.value.param == "model"


async def test_wrong_or_missing_key_is_401_and_never_echoed(upstream: FakeUpstream) -> None:
    gateway = make_gateway(upstream)
    async with gateway:
        secret = "sk-wrongkey-0123456789-very-secret"
        with pytest.raises(openai.AuthenticationError) as wrong:
            await sdk(mounted(gateway), key=secret).models.list()
        assert wrong.value.code == "invalid_api_key"
        assert "sk-wrong" in wrong.value.message
        assert secret[:9] not in wrong.value.message
        async with httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=mounted(gateway)), base_url="http://t"
        ) as http:
            missing = await http.post("/v1/chat/completions", json={})
            assert missing.status_code == 401
            assert_openai_error(missing.json())
            # x-api-key is accepted too (Anthropic's SDKs send it).
            ok = await http.get("/v1/models", headers={"x-api-key": KEY})
            assert ok.status_code == 200


async def test_body_over_the_limit_is_413(upstream: FakeUpstream) -> None:
    gateway = make_gateway(upstream, max_body_bytes=1000)
    async with (
        gateway,
        httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=mounted(gateway)),
            base_url="http://t",
            headers={"authorization": f"Bearer {KEY}"},
        ) as http,
    ):
        big = {"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "x" * 2000}]}
        response = await http.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert_openai_error(response.json(), code="request_too_large")

        async def chunked():  # no content-length: the limit still holds
            yield b'{"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}]}'

        streamed = await http.post("/v1/chat/completions", content=chunked())
        assert streamed.status_code == 413
    assert len(upstream.requests) == 0


async def test_unknown_paths(http: httpx2.AsyncClient, gateway: object) -> None:
    doubled = await http.post("/v1/v1/chat/completions", json={})
    assert doubled.status_code == 404
    assert_openai_error(doubled.json(), code="unknown_url")
    assert "POST /v1/chat/completions" in doubled.json()["error"]["message"]
    assert "repeat" in doubled.json()["error"]["message"]
    # Outside the mount, the host's own 404 is left alone.
    root = await http.post("/chat/completions", json={})
    assert root.status_code == 404 and root.text == "Not Found"
    wrong_method = await http.get("/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert_openai_error(wrong_method.json())


@pytest.mark.parametrize(
    ("fault", "status", "error_class"),
    [
        (Fault(status=429, retry_after=7), 429, openai.RateLimitError),
        (Fault(status=500), 500, openai.InternalServerError),
        (Fault(status=503), 503, openai.InternalServerError),
        (Fault(status=529), 503, openai.InternalServerError),
        (Fault(status=400, message="context too long"), 400, openai.BadRequestError),
        (Fault(status=401), 403, openai.PermissionDeniedError),
        (Fault(malformed=True), 502, openai.InternalServerError),
        (Fault(drop="before"), 502, openai.InternalServerError),
    ],
)
async def test_upstream_errors_are_relayed_openai_shaped(
    gateway: Gateway,
    upstream: FakeUpstream,
    records: list[RequestRecord],
    fault: Fault,
    status: int,
    error_class: type[openai.APIStatusError],
) -> None:
    upstream.schedule(fault)
    client = sdk(mounted(gateway), default_headers={"x-gate-max-retries": "0"})
    with pytest.raises(error_class) as caught:
        await client.chat.completions.create(model="openai/gpt-4.1", messages=MESSAGES)
    error = caught.value
    assert error.status_code == status
    assert_openai_error({"error": error.body})
    if fault.retry_after:
        assert error.response.headers["retry-after"] == "7"
    if fault.status == 529:
        assert error.body["message"] == "Overloaded"
    if fault.status == 401:
        # The vendor refused the gateway's key: not the caller's fault, and no retry helps.
        assert error.code == "upstream_auth_error"
        assert error.response.headers["x-should-retry"] == "false"
    if fault.status == 400:
        assert error.body["message"] == "context too long"
    assert records[-1].status == status


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [201, 204, 302])
async def test_an_upstream_status_that_is_no_answer_is_a_502(status: int, stream: bool) -> None:
    """Relayed as it was, a 201 read as a success with an error body, and a 204 could
    not carry its body at all (the server failed mid-answer; the client got nothing)."""

    async def odd(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gateway = make_gateway(odd)
    async with gateway, client_for(gateway) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "openai/gpt-4.1", "messages": MESSAGES, "stream": stream},
        )
    assert response.status_code == 502
    assert_openai_error(response.json(), code="upstream_bad_response")


async def test_an_upstream_redirect_is_not_followed() -> None:
    """Followed, a 307 to another host sent it the caller's prompt and the provider's
    own headers (aiohttp drops only `Authorization` across origins)."""
    received: list[bytes] = []

    async def elsewhere(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            received.append((await receive()).get("body", b""))
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    with LiveServer(elsewhere) as other:
        target = other.url.replace("127.0.0.1", "localhost").encode()

        async def redirect(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                headers = [(b"location", target + b"/v1/chat/completions")]
                await send({"type": "http.response.start", "status": 307, "headers": headers})
                await send({"type": "http.response.body", "body": b""})

        with LiveServer(redirect) as upstream:
            provider = ProviderSettings(
                base_url=upstream.url + "/v1", api_key="up", headers={"x-api-key": "s3cr3t"}
            )
            gateway = Gateway(GateSettings(api_keys=[KEY], providers={"openai": provider}))
            async with gateway, client_for(gateway) as http:
                response = await http.post(
                    "/v1/chat/completions", json={"model": "openai/gpt-4.1", "messages": MESSAGES}
                )
    assert response.status_code == 502 and received == []


async def test_stream_refused_before_first_byte_keeps_its_status(
    http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.schedule(Fault(status=503), Fault(status=503), Fault(status=503))
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-4.1", "messages": MESSAGES, "stream": True},
    )
    assert response.status_code == 503
    assert_openai_error(response.json())


async def test_a_host_provider_failing_unexpectedly_is_a_clean_500(upstream: FakeUpstream) -> None:
    class Broken:
        async def startup(self) -> None: ...
        async def aclose(self) -> None: ...
        async def chat(self, body):  # type: ignore[no-untyped-def]
            raise RuntimeError("bug in a host provider")

    gateway = make_gateway(upstream)
    gateway.providers["openai"].chat = Broken().chat  # type: ignore[method-assign]
    async with (
        gateway,
        httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=mounted(gateway), raise_app_exceptions=False),
            base_url="http://t",
            headers={"authorization": f"Bearer {KEY}"},
        ) as http,
    ):
        response = await http.post(
            "/v1/chat/completions", json={"model": "openai/gpt-4.1", "messages": MESSAGES}
        )
    assert response.status_code == 500
    assert_openai_error(response.json())
    assert "Traceback" not in response.text and "bug in a host" not in response.text


@pytest.mark.parametrize(
    "header",
    [
        {"retry-after": "soon"},
        {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"},
        {"retry-after-ms": "x"},
    ],
)
async def test_odd_retry_after_headers_do_not_break_relaying(header: dict[str, str]) -> None:
    from gate_middleware.providers.openai import upstream_error

    error = upstream_error(429, b'{"error": {"message": "slow down"}}', header)
    assert error.status == 429 and error.message == "slow down"


async def test_cors_for_browser_front_ends(upstream: FakeUpstream) -> None:
    gateway = make_gateway(upstream, cors_origins=["https://chat.example"])
    async with (
        gateway,
        httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=mounted(gateway)), base_url="http://t"
        ) as http,
    ):
        preflight = await http.options(
            "/v1/chat/completions",
            headers={
                "origin": "https://chat.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://chat.example"
        answer = await http.post(
            "/v1/chat/completions",
            json={"model": "openai/gpt-4.1", "messages": MESSAGES},
            headers={"origin": "https://chat.example", "authorization": f"Bearer {KEY}"},
        )
        assert answer.headers["access-control-allow-origin"] == "https://chat.example"
        other = await http.get(
            "/v1/models",
            headers={"origin": "https://evil.example", "authorization": f"Bearer {KEY}"},
        )
        assert "access-control-allow-origin" not in other.headers


async def test_a_client_gone_mid_body_is_recorded_not_a_crash(
    gateway: Gateway, records: list[RequestRecord], caplog: pytest.LogCaptureFixture
) -> None:
    messages = [
        {"type": "http.request", "body": b'{"model": "openai/gpt-4.1", "mess', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict:
        return messages.pop(0)

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = chat_scope(KEY)
    await gateway(scope, receive, send)
    assert records[-1].status == 499 and records[-1].error_code == "client_disconnected"
    assert "Traceback" not in caplog.text and "Unexpected error" not in caplog.text


@pytest.mark.parametrize(
    "header",
    [
        {"retry-after": "inf"},
        {"retry-after": "nan"},
        {"retry-after-ms": "inf"},
        {"retry-after": "-5"},
    ],
)
async def test_a_retry_after_that_is_no_wait_is_ignored(header: dict[str, str]) -> None:
    """An upstream's `retry-after: inf` once crashed the error's own header (a 500 that
    leaked the request's hold): no wait is read from it."""
    from gate_middleware.providers.openai import upstream_error

    error = upstream_error(429, b'{"error": {"message": "slow down"}}', header)
    assert error.status == 429 and error.retry_after in (None, 0.0)
    assert error.headers.get("retry-after", "1") == "1"


async def test_header_digits_that_are_not_ascii_are_a_400(http: httpx2.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-4.1", "messages": MESSAGES},
        headers={"x-gate-max-retries": "\u00b2".encode("latin-1")},  # type: ignore[dict-item]
    )
    assert response.status_code == 400
    assert_openai_error(response.json(), param="x-gate-max-retries")


async def test_an_upstream_failing_never_shows_the_credentials_in_its_url() -> None:
    """A base URL may carry a user, a password or a `?key=`: a 502 names the upstream
    without them."""
    gateway = Gateway(
        GateSettings(
            api_keys=[KEY],
            providers={
                "openai": ProviderSettings(base_url="http://admin:s3cr3t@127.0.0.1:1/v1?key=K3Y")
            },
            max_retries=0,
        )
    )
    async with gateway, client_for(gateway) as http:
        response = await http.post(
            "/v1/chat/completions", json={"model": "openai/gpt-4.1", "messages": MESSAGES}
        )
    assert response.status_code == 502
    assert_openai_error(response.json(), code="upstream_connection_error")
    assert "127.0.0.1:1" in response.text
    assert "s3cr3t" not in response.text and "K3Y" not in response.text
    assert "s3cr3t" not in repr(gateway.providers["openai"])


@pytest.mark.parametrize(
    ("length", "status"),
    [("\u00b2".encode("latin-1"), 200), (b"9" * 5000, 413)],
)
async def test_an_odd_content_length_is_no_500(
    gateway: Gateway, length: bytes, status: int
) -> None:
    """Behind a server that lets one through: "²" is read as no length, and 5000 digits are too
    large (int() refuses to read them)."""
    body = b'{"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}'
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0)

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = chat_scope(KEY, (b"content-length", length))
    await gateway(scope, receive, send)
    assert sent[0]["status"] == status


@pytest.mark.parametrize("status", [401, 400, 500])
@pytest.mark.parametrize("stream", [False, True])
async def test_the_gateways_upstream_key_is_never_relayed(
    http: httpx2.AsyncClient, upstream: FakeUpstream, status: int, stream: bool
) -> None:
    """An upstream that quotes the key it was sent: the caller must not read it."""
    quoted = Fault(status=status, message="Incorrect API key provided: up-key (Bearer up-key).")
    upstream.schedule(quoted, quoted, quoted)
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-4.1", "messages": MESSAGES, "stream": stream},
    )
    assert response.status_code == (403 if status == 401 else status)
    assert "up-key" not in response.text
    assert "Incorrect API key provided: ***" in response.json()["error"]["message"]
