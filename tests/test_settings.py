from __future__ import annotations

import json
from pathlib import Path

import pytest

from gate_middleware import GateSettings


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATE_API_KEYS", "sk-one, sk-two")
    monkeypatch.setenv("GATE_PROVIDERS__OPENAI__API_KEY", "sk-vendor-secret")
    monkeypatch.setenv("GATE_PROVIDERS__LOCAL", '{"base_url": "http://127.0.0.1:9/v1"}')
    monkeypatch.setenv("GATE_ALIASES", '{"fast": "openai/gpt-4.1-mini"}')
    monkeypatch.setenv("GATE_MAX_BODY_BYTES", "1234")
    settings = GateSettings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["sk-one", "sk-two"]
    assert settings.providers["openai"].api_key is not None
    assert settings.providers["local"].base_url == "http://127.0.0.1:9/v1"
    assert settings.aliases == {"fast": "openai/gpt-4.1-mini"}
    assert settings.max_body_bytes == 1234
    # Secrets never print.
    assert "sk-vendor-secret" not in repr(settings) and "sk-one" not in str(settings)


def test_config_file_under_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"api_keys": ["sk-file"], "read_timeout": 5, "cors_origins": ["*"]}))
    monkeypatch.setenv("GATE_CONFIG_FILE", str(path))
    monkeypatch.setenv("GATE_READ_TIMEOUT", "9")
    settings = GateSettings()
    assert settings.api_keys[0].get_secret_value() == "sk-file"
    assert settings.read_timeout == 9 and settings.cors_origins == ["*"]


def test_toml_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tomllib")
    path = tmp_path / "gate.toml"
    path.write_text('api_keys = ["sk-toml"]\n[providers.deepseek]\napi_key = "sk-ds"\n')
    monkeypatch.setenv("GATE_CONFIG_FILE", str(path))
    settings = GateSettings()
    assert settings.providers["deepseek"].api_key is not None


def test_a_misspelt_nested_setting_is_an_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="apikey"):
        GateSettings(providers={"openai": {"apikey": "sk-x"}})


def test_cli_reports_bad_settings_in_one_line_without_their_values(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    secret = "sk-real-secret-0123456789"
    env = {**os.environ, "GATE_PROVIDERS": json.dumps({"openai": secret})}
    result = subprocess.run(
        [sys.executable, "-m", "gate_middleware", "serve", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid setting GATE_PROVIDERS__OPENAI" in result.stderr
    assert secret not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_provider_headers_are_secrets_never_printed() -> None:
    """Azure's `api-key` travels in a provider's headers: as secret as its api_key."""
    from gate_middleware.providers import providers_from_settings

    settings = GateSettings(
        api_keys=["k"],
        providers={
            "azure": {"base_url": "https://x.example/v1", "headers": {"api-key": "AZ-SECRET"}}
        },
    )
    assert "AZ-SECRET" not in repr(settings) and "AZ-SECRET" not in str(settings.model_dump())
    provider = providers_from_settings(settings, None)["azure"]
    assert provider._headers["api-key"] == "AZ-SECRET"  # what the upstream is sent


def test_a_toml_file_on_python_3_10_without_tomli_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    from gate_middleware import ConfigurationError

    config = tmp_path / "gate.toml"
    config.write_text('api_keys = ["k"]\n')
    monkeypatch.setenv("GATE_CONFIG_FILE", str(config))
    assert GateSettings().api_keys[0].get_secret_value() == "k"
    monkeypatch.setattr(sys, "version_info", (3, 10, 14))
    monkeypatch.setitem(sys.modules, "tomli", None)  # not installed
    with pytest.raises(ConfigurationError, match="tomli"):
        GateSettings()
