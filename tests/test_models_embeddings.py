from __future__ import annotations

import httpx2
import openai
import pytest

from gate_middleware import GateSettings, Gateway, RequestRecord
from gate_middleware.testing import FakeUpstream

from .conftest import KEY, make_gateway, mounted, sdk


async def test_models_list_has_owner_context_and_prices(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    by_id = {m.id: m for m in models.data}
    gpt = by_id["openai/gpt-4.1"]
    assert gpt.object == "model" and gpt.owned_by == "openai"
    extra = gpt.model_extra or {}
    assert extra["context_length"] == 1_047_576
    assert float(extra["pricing"]["prompt"]) == pytest.approx(2.0e-6)
    assert float(extra["pricing"]["completion"]) == pytest.approx(8.0e-6)
    # Only vendors this gateway reaches are listed.
    assert not any(m.startswith("anthropic/") for m in by_id)


async def test_model_ids_with_a_slash_can_be_retrieved(client: openai.AsyncOpenAI) -> None:
    model = await client.models.retrieve("openai/gpt-4o-mini")
    assert model.id == "openai/gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("acme/unknown")


async def test_catalogue_overrides_and_weighted_deployments(upstream: FakeUpstream) -> None:
    gateway = make_gateway(
        upstream,
        providers={
            "a": {"base_url": "http://upstream/v1"},
            "b": {"base_url": "http://upstream/v1"},
        },
        models={
            "house/smart": {
                "deployments": [
                    {"provider": "a", "model": "smart-v1", "weight": 3},
                    {"provider": "b", "model": "smart-v2", "weight": 1},
                ],
                "context_length": 32000,
                "input_price": 1.5,
                "output_price": 3,
            }
        },
        aliases={"smart": "house/smart"},
    )
    async with gateway:
        client = sdk(mounted(gateway))
        card = await client.models.retrieve("house/smart")
        assert (card.model_extra or {})["context_length"] == 32000
        seen = set()
        for _ in range(40):
            raw = await client.chat.completions.with_raw_response.create(
                model="smart", messages=[{"role": "user", "content": "hi"}]
            )
            assert raw.parse().model == "house/smart"
            seen.add(raw.headers["x-gate-provider"])
        assert seen == {"a", "b"}
        upstream_names = {r["body"]["model"] for r in upstream.requests}
        assert upstream_names == {"smart-v1", "smart-v2"}


async def test_embeddings_float_and_base64(
    client: openai.AsyncOpenAI, upstream: FakeUpstream, records: list[RequestRecord]
) -> None:
    # The SDK asks for base64 by default and decodes it.
    result = await client.embeddings.create(
        model="openai/text-embedding-3-small", input=["one", "two"], dimensions=64
    )
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 64
    assert result.model == "openai/text-embedding-3-small"
    assert upstream.requests[-1]["body"]["encoding_format"] == "base64"
    floats = await client.embeddings.create(
        model="text-embedding-3-small", input="one", encoding_format="float", dimensions=64
    )
    assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, rel=1e-6)
    assert records[-2].endpoint == "embeddings"
    assert records[-2].prompt_tokens == result.usage.prompt_tokens > 0


async def test_embeddings_bad_input(http: httpx2.AsyncClient) -> None:
    missing = await http.post("/v1/embeddings", json={"model": "openai/text-embedding-3-small"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input"
    empty = await http.post(
        "/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": []}
    )
    assert empty.status_code == 400


async def test_no_vendor_serves_the_builtin_fake() -> None:
    gateway = Gateway(GateSettings(api_keys=[KEY]))
    assert set(gateway.providers) == {"fake"}
    async with gateway:
        client = sdk(mounted(gateway))
        answer = await client.chat.completions.create(
            model="anthropic/claude-opus-4-5", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.model == "anthropic/claude-opus-4-5"
        assert answer.usage is not None and answer.usage.total_tokens > 0
        stream = await client.chat.completions.create(
            model="anthropic/claude-opus-4-5",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == answer.choices[0].message.content
        vectors = await client.embeddings.create(model="openai/text-embedding-3-small", input="x")
        assert len(vectors.data[0].embedding) == 256
