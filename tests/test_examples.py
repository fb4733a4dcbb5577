from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import httpx2
import openai
import pytest

from .conftest import KEY, LiveServer

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("GATE_API_KEYS", KEY)
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.parametrize(
    ("module", "own_path", "own_text"),
    [
        ("examples.fastapi_app", "/hello", '{"hello":"world"}'),
        ("examples.starlette_app", "/", "My product's home page."),
    ],
)
async def test_example_hosts_serve_their_routes_and_the_gateway(
    monkeypatch: pytest.MonkeyPatch, module: str, own_path: str, own_text: str
) -> None:
    example = load(module, monkeypatch)
    # A real server, so the host's own lifespan (which starts the gateway) runs.
    with LiveServer(example.app) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        answer = await client.chat.completions.create(
            model="openai/gpt-4.1", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.model == "openai/gpt-4.1" and answer.choices[0].message.content
        models = await client.models.list()
        assert any(m.id == "openai/gpt-4.1" for m in models.data)
        await client.close()
        async with httpx2.AsyncClient() as http:
            own = await http.get(server.url + own_path)
        assert own.status_code == 200 and own.text == own_text
