"""The gateway on a real uvicorn server, over real sockets, upstream on loopback too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from gate_middleware import RequestRecord
from gate_middleware.demo import create_app
from gate_middleware.settings import GateSettings
from gate_middleware.testing import FakeUpstream, Fault

from .conftest import KEY, LiveServer, free_port, wait_for

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture
def stack() -> Iterator[tuple[FakeUpstream, str, list[RequestRecord]]]:
    """Fake upstream and gateway, each on its own uvicorn server."""
    upstream = FakeUpstream()
    with LiveServer(upstream) as up:
        settings = GateSettings(
            api_keys=[KEY], providers={"openai": {"base_url": up.url + "/v1", "api_key": "up"}}
        )
        app = create_app(settings)
        records: list[RequestRecord] = []
        app.state.gateway.record_hooks.append(records.append)
        with LiveServer(app) as gate:
            yield upstream, gate.url, records


async def test_sdk_end_to_end(stack: tuple[FakeUpstream, str, list[RequestRecord]]) -> None:
    upstream, url, records = stack
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    answer = await client.chat.completions.create(model="openai/gpt-4.1", messages=MESSAGES)
    assert answer.usage is not None and answer.usage.completion_tokens == 16
    stream = await client.chat.completions.create(
        model="openai/gpt-4.1",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        answer.choices[0].message.content
    )
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.total_tokens == answer.usage.total_tokens
    )
    embedded = await client.embeddings.create(model="openai/text-embedding-3-small", input="hi")
    assert len(embedded.data[0].embedding) == 256
    assert any(m.id == "openai/gpt-4.1" for m in (await client.models.list()).data)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="acme/gpt-9", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="openai/gpt-4.1", messages=[])
    await client.close()


async def test_stream_is_relayed_chunk_by_chunk(
    stack: tuple[FakeUpstream, str, list[RequestRecord]],
) -> None:
    upstream, url, _ = stack
    upstream.chunk_latency = 0.05
    arrivals = []
    async with (
        httpx2.AsyncClient(timeout=10) as http,
        http.stream(
            "POST",
            url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={
                "model": "openai/gpt-4.1",
                "messages": MESSAGES,
                "stream": True,
                "max_tokens": 10,
            },
        ) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    # 13 events (role, 10 words, finish, [DONE]) about 50 ms apart: not buffered to the end.
    assert len(arrivals) == 13
    assert arrivals[-2] - arrivals[0] > 0.4


async def test_upstream_dying_mid_stream_ends_cleanly(
    stack: tuple[FakeUpstream, str, list[RequestRecord]],
) -> None:
    upstream, url, records = stack
    upstream.schedule(Fault(drop="mid", after_chunks=4))
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(
            url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "openai/gpt-4.1", "messages": MESSAGES, "stream": True},
        )
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert len(payloads) == 5  # four chunks, then the error event; the torn half is gone
    assert all("choices" in p for p in payloads[:4])
    error = payloads[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "upstream_connection_error"
    await wait_for(lambda: len(records) == 1)
    assert records[0].status == 502 and records[0].stream


async def test_client_disconnect_cancels_the_upstream(
    stack: tuple[FakeUpstream, str, list[RequestRecord]],
) -> None:
    upstream, url, records = stack
    upstream.chunk_latency = 0.1  # 200 words: 20 s if nobody hangs up
    async with (
        httpx2.AsyncClient(timeout=10) as http,
        http.stream(
            "POST",
            url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={
                "model": "openai/gpt-4.1",
                "messages": MESSAGES,
                "stream": True,
                "max_tokens": 200,
            },
        ) as response,
    ):
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    await wait_for(lambda: upstream.disconnects == 1, timeout=3)
    await wait_for(lambda: len(records) == 1, timeout=3)
    assert records[0].status == 499 and records[0].error_code == "client_disconnected"
    # What was produced before the client left is known, for billing.
    assert records[0].estimated_completion_tokens >= 2
    # The upstream counts the disconnect, then closes its stream when its tasks end.
    await wait_for(lambda: upstream.open_streams == 0, timeout=3)


def test_cli_serve_prints_url_and_key_and_serves(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATE_")}
    with subprocess.Popen(
        [sys.executable, "-m", "gate_middleware", "serve", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    ) as process:
        try:
            _use_the_cli_server(process, port, tmp_path)
        finally:
            process.terminate()
            process.wait(10)


def _use_the_cli_server(process: subprocess.Popen[str], port: int, directory: Path) -> None:
    assert process.stdout is not None
    lines: list[str] = []
    while not any("API key" in line for line in lines):
        line = process.stdout.readline()
        assert line, f"the server stopped: {lines}"
        lines.append(line)
    assert any(f"http://127.0.0.1:{port}/v1" in line for line in lines), lines
    key = next(line for line in lines if "API key" in line).rsplit(" ", 1)[-1].strip()
    admin = next(line for line in lines if "admin key" in line).rsplit(" ", 1)[-1].strip()
    assert key.startswith("sk-gate-") and admin.startswith("sk-gate-admin-")
    deadline = time.monotonic() + 10
    while True:
        try:
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key) as client:
                answer = client.chat.completions.create(model="openai/gpt-4.1", messages=MESSAGES)
            break
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert answer.model == "openai/gpt-4.1"
    assert answer.choices[0].message.content


async def test_a_malformed_event_mid_stream_ends_cleanly(
    stack: tuple[FakeUpstream, str, list[RequestRecord]],
) -> None:
    upstream, url, records = stack
    upstream.chunk_latency = 0.02  # so the bad event arrives after the first bytes went out
    upstream.schedule(Fault(malformed=True, after_chunks=3))
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(
            url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "openai/gpt-4.1", "messages": MESSAGES, "stream": True},
        )
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [("choices" in p) for p in payloads] == [True, True, True, False]
    assert payloads[-1]["error"]["code"] == "upstream_bad_response"
    await wait_for(lambda: len(records) == 1)
    assert records[0].status == 502


async def test_the_demo_points_a_base_url_without_v1_to_the_gateway(
    stack: tuple[FakeUpstream, str, list[RequestRecord]],
) -> None:
    _, url, _ = stack
    async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="openai/gpt-4.1", messages=MESSAGES)
    assert caught.value.code == "unknown_url"
    assert f"{url}/v1" in caught.value.body["message"]
