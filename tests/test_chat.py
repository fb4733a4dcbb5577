from __future__ import annotations

import json

import httpx2
import openai
import pytest
from starlette.types import Receive, Scope, Send

from gate_middleware import RequestRecord
from gate_middleware.testing import FakeUpstream

from .conftest import make_gateway, mounted, sdk

MESSAGES = [{"role": "user", "content": "Say hello."}]


async def test_whole_answer_with_usage_and_public_model_name(
    client: openai.AsyncOpenAI, upstream: FakeUpstream, records: list[RequestRecord]
) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="openai/gpt-4.1", messages=MESSAGES
    )
    answer = raw.parse()
    assert answer.model == "openai/gpt-4.1"
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 16
    assert raw.headers["x-gate-provider"] == "openai"
    assert raw.headers["x-request-id"].startswith("req_")
    # The upstream saw its own name for the model.
    assert upstream.requests[-1]["body"]["model"] == "gpt-4.1"
    assert records[-1].status == 200 and records[-1].completion_tokens == 16
    assert records[-1].prompt_tokens == answer.usage.prompt_tokens


async def test_unknown_fields_reach_the_upstream_untouched(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    await client.chat.completions.create(
        model="openai/gpt-4.1",
        messages=MESSAGES,
        extra_body={"vendor_knob": {"deep": [1, 2, {"x": None}]}, "seed": 7},
        temperature=0.3,
    )
    sent = upstream.requests[-1]["body"]
    assert sent["vendor_knob"] == {"deep": [1, 2, {"x": None}]}
    assert sent["seed"] == 7 and sent["temperature"] == 0.3
    assert sent["messages"] == MESSAGES


async def test_aliases_and_bare_names(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert answer.model == "openai/gpt-4o"


async def test_stream_with_usage_as_openai_sends_it(
    client: openai.AsyncOpenAI, records: list[RequestRecord]
) -> None:
    stream = await client.chat.completions.create(
        model="openai/gpt-4.1",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = await client.chat.completions.create(model="openai/gpt-4.1", messages=MESSAGES)
    assert text == whole.choices[0].message.content
    assert all(c.model == "openai/gpt-4.1" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert records[0].stream and records[0].completion_tokens == 16


async def test_stream_without_usage_hides_the_usage_chunk_but_meters_it(
    http: httpx2.AsyncClient, upstream: FakeUpstream, records: list[RequestRecord]
) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-4.1", "messages": MESSAGES, "stream": True, "max_tokens": 5},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(p["choices"] for p in payloads), "the usage-only chunk must be stripped"
    assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    assert records[-1].completion_tokens == 5 and records[-1].usage_reported


async def test_request_id_is_taken_from_the_request(http: httpx2.AsyncClient) -> None:
    response = await http.get("/v1/models", headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    error = await http.get("/v1/nowhere", headers={"x-request-id": "trace-43"})
    assert error.headers["x-request-id"] == "trace-43"


async def test_app_attribution_is_recorded(
    http: httpx2.AsyncClient, records: list[RequestRecord]
) -> None:
    await http.post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-4.1", "messages": MESSAGES},
        headers={"x-title": "My Tool", "http-referer": "https://tool.example"},
    )
    assert records[-1].app == "My Tool"


async def test_the_standard_library_json_path_works_too(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gate_middleware import _json

    monkeypatch.setattr(_json, "loads", _json.stdlib_loads)
    monkeypatch.setattr(_json, "dumps", _json.stdlib_dumps)
    answer = await client.chat.completions.create(model="openai/gpt-4.1", messages=MESSAGES)
    stream = await client.chat.completions.create(
        model="openai/gpt-4.1",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        answer.choices[0].message.content
    )
    assert chunks[-1].usage is not None
    vectors = await client.embeddings.create(model="openai/text-embedding-3-small", input="é")
    assert vectors.data[0].embedding


async def test_an_event_of_several_data_lines_reaches_the_client_whole(
    records: list[RequestRecord],
) -> None:
    """SSE lets an event's data span lines (pretty-printed JSON); the relay keeps them
    `data:` lines, so the client reads the same JSON."""
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    choice = {"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}
    pretty = json.dumps({**chunk, "choices": [choice]}, indent=1).replace("\n", "\ndata: ")
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    events = [f"data: {pretty}", f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}"]
    body = ("\n\n".join([*events, "data: [DONE]"]) + "\n\n").encode()

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    gateway = make_gateway(upstream, records)
    async with gateway:
        stream = await sdk(mounted(gateway)).chat.completions.create(
            model="openai/gpt-4.1", messages=MESSAGES, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert [c.choices[0].delta.content for c in chunks] == ["Hello"]
    assert chunks[0].model == "openai/gpt-4.1"
    assert records[0].status == 200 and records[0].completion_tokens == 1
