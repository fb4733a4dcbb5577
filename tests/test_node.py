"""The official openai Node SDK against the gateway on a real uvicorn server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gate_middleware.demo import create_app
from gate_middleware.settings import GateSettings

from .conftest import KEY, LiveServer

HERE = Path(__file__).resolve().parent / "node"


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        message = "node and npm are needed for the Node SDK check"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("node")
    shutil.copy(HERE / "package.json", work)
    shutil.copy(HERE / "check.mjs", work)
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"npm install failed: {result.stderr[-2000:]}")
    return work


def test_the_node_sdk_works_against_the_gateway(node_modules: Path) -> None:
    app = create_app(GateSettings(api_keys=[KEY]))
    with LiveServer(app) as server:
        result = subprocess.run(
            ["node", "check.mjs"],
            cwd=node_modules,
            env={**os.environ, "GATE_URL": server.url + "/v1", "GATE_KEY": KEY},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["model"] == "openai/gpt-4.1" and seen["content"]
    assert seen["usage"]["completion_tokens"] == 16
    assert seen["streamed"] == seen["content"]
    assert seen["streamUsage"]["total_tokens"] == seen["usage"]["total_tokens"]
    assert seen["embeddingLength"] == 256
    assert "openai/gpt-4.1" in seen["modelIds"]
    assert seen["notFound"] == {"status": 404, "cls": "NotFoundError", "code": "model_not_found"}
    assert seen["unauthorized"] == {"status": 401, "cls": "AuthenticationError"}
