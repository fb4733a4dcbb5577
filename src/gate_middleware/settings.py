"""Configuration: one pydantic-settings object, `GATE_` environment variables.

Nested values come as JSON (`GATE_PROVIDERS='{"openai": {"api_key": "sk-..."}}'`) or
with `__` between levels (`GATE_PROVIDERS__OPENAI__API_KEY=sk-...`). A JSON or TOML
file named by `GATE_CONFIG_FILE` is read under the environment, which wins.
"""

from __future__ import annotations

import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from limits import parse_many
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigurationError

__all__ = [
    "DeploymentSettings",
    "GateSettings",
    "LimitSettings",
    "ModelSettings",
    "ProviderSettings",
    "RateLimitSettings",
]


class _Strict(BaseModel):
    """Nested settings: a misspelt field is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ProviderSettings(_Strict):
    """One upstream. `kind="openai"` covers every OpenAI-compatible server."""

    kind: Literal["openai", "fake"] = "openai"
    base_url: str | None = Field(None, description="Default: the vendor's own, by name.")
    api_key: SecretStr | None = None
    headers: dict[str, SecretStr] = Field(
        {}, description="Extra headers, e.g. Azure's api-key: secrets, never printed."
    )
    connect_timeout: float | None = None
    read_timeout: float | None = None
    stream_timeout: float | None = None
    stream_usage: bool = Field(True, description="Ask streams for usage (metering).")


class DeploymentSettings(_Strict):
    provider: str
    model: str | None = Field(None, description="The upstream's name for the model.")
    weight: float = Field(1.0, gt=0)


class ModelSettings(_Strict):
    """A catalogue entry; prices are USD per million tokens."""

    deployments: list[DeploymentSettings] = []
    owned_by: str | None = None
    context_length: int | None = None
    input_price: float | None = None
    output_price: float | None = None
    cached_input_price: float | None = None
    kind: Literal["chat", "embedding"] = "chat"
    fallbacks: list[str] = Field([], description="Models to try, in order, when this one fails.")
    context_fallback: str | None = Field(
        None, description="A model with a longer context, tried when a prompt is too long."
    )
    max_retries: int | None = Field(None, ge=0, description="Overrides GATE_MAX_RETRIES.")


class LimitSettings(_Strict):
    """The limits of one scope, in `limits` notation: "60/minute", "10/second;1000/day"."""

    requests: str | None = Field(None, description='Requests, e.g. "60/minute;1000/day".')
    tokens: str | None = Field(
        None, description='Prompt + completion tokens, e.g. "100000/minute".'
    )
    concurrency: int | None = Field(
        None, ge=1, description="Requests in flight at once (keys only)."
    )

    @field_validator("requests", "tokens")
    @classmethod
    def _parse(cls, value: str | None) -> str | None:
        if value is not None:
            parse_many(value)  # a typo fails at start-up, not on the first request
        return value


class RateLimitSettings(_Strict):
    """Rate limits; none are set by default. A key's own limits (from the account
    system) replace `key`'s; accounts, models, deployments and `gateway` add to them."""

    storage_uri: str = Field(
        "memory://",
        description="memory:// (one process) or redis://host:port/db (shared by workers).",
    )
    strategy: Literal["fixed-window", "moving-window", "sliding-window-counter"] = Field(
        "fixed-window",
        description="fixed-window is the only one that can give back over-estimated tokens.",
    )
    key_prefix: str = Field("gate", description="Prefix of every storage key (Redis).")
    on_storage_error: Literal["open", "closed"] = Field(
        "open", description="Storage unreachable: admit unchecked (open) or answer 503."
    )
    storage_timeout: float = Field(0.5, gt=0, description="Seconds per storage call.")
    completion_estimate: int = Field(
        512, ge=0, description="Completion tokens charged up front when a chat names no max_tokens."
    )
    concurrency_lease: float = Field(
        900.0, gt=0, description="Seconds a slot outlives a worker that died (Redis)."
    )
    key: LimitSettings = Field(LimitSettings(), description="Every key, unless it has its own.")
    models: dict[str, LimitSettings] = Field(
        {}, description="Per key and model: model name -> limits."
    )
    deployments: dict[str, LimitSettings] = Field(
        {}, description='All keys together per upstream: "openai" or "openai/gpt-4.1".'
    )
    gateway: LimitSettings = Field(LimitSettings(), description="All keys together, everything.")


class GateSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATE_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [], description="Bearer keys the gateway accepts (comma-separated or JSON list)."
    )
    providers: dict[str, ProviderSettings] = Field(
        {}, description="Upstreams by name; none configured serves the built-in fake."
    )
    models: dict[str, ModelSettings] = Field(
        {}, description="Catalogue entries added to (or overriding) the built-in one."
    )
    aliases: dict[str, str] = Field({}, description="Extra model names, e.g. gpt-4o.")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Larger bodies get 413.")
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(60.0, gt=0, description="Whole answer, non-streaming.")
    stream_timeout: float = Field(120.0, gt=0, description="Between two stream events.")
    max_retries: int = Field(
        2, ge=0, description="Further attempts after the first, across deployments."
    )
    retry_deadline: float = Field(
        60.0, gt=0, description="Seconds from arrival after which no new attempt starts."
    )
    retry_backoff: float = Field(0.25, ge=0, description="First backoff step in seconds.")
    retry_backoff_max: float = Field(8.0, ge=0, description="Longest backoff step.")
    retry_after_cap: float = Field(
        10.0, ge=0, description="Longest upstream retry-after the gateway will sleep for."
    )
    health_failures: int = Field(
        3, ge=1, description="Failures within the window that cool a deployment down."
    )
    health_window: float = Field(30.0, gt=0, description="Seconds failures are counted over.")
    health_cooldown: float = Field(
        30.0, gt=0, description="Seconds a failing deployment is skipped before a trial."
    )
    health_storage: str = Field(
        "memory://", description="memory:// (one process) or redis://host:port/db (shared)."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="Browser origins allowed to call the gateway ('*' for any)."
    )
    fake_latency: float = Field(
        0.0, ge=0, description="Seconds between stream chunks of fake providers."
    )
    database_url: str | None = Field(
        None,
        description="Accounts, keys, ledger and balances: sqlite:///gate.db, "
        "postgresql://user@host/db[?schema=name] or memory://. Unset: settings keys only.",
    )
    admin_key: SecretStr | None = Field(
        None, description="The key that manages top-level accounts (with a database)."
    )
    key_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long a key lookup is cached: the bound for a disabled "
        "key or account to stop working in other processes.",
    )
    quota: bool = Field(True, description="Hold the most a request may cost before the call.")
    quota_max_tokens: int = Field(
        4096, gt=0, description="Completion tokens held for a request that sets no max_tokens."
    )
    quota_lease_usd: Decimal = Field(
        Decimal("1"), gt=0, description="How much balance a process leases at a time."
    )
    quota_lease_seconds: float = Field(
        30.0,
        gt=0,
        description="Unused leases go back after about a third of this; a dead "
        "process's leases are reclaimed after twice this.",
    )
    unpriced_models: Literal["reject", "free"] = Field(
        "reject", description="A model with no price: refuse it (400), or serve it at zero cost."
    )
    max_credit_usd: Decimal = Field(
        Decimal("1000000"), gt=0, description="The largest single top-up or adjustment."
    )
    ledger_batch_size: int = Field(1000, gt=0, description="Ledger rows per write.")
    ledger_flush_seconds: float = Field(
        0.2, gt=0, description="Longest a ledger row waits before it is written."
    )
    rate_limits: RateLimitSettings = Field(
        RateLimitSettings(), description="Requests, tokens, concurrency."
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, dotenv_settings, file_secret_settings]
        config_file = os.environ.get("GATE_CONFIG_FILE")
        if config_file:
            path = Path(config_file)
            if path.suffix == ".toml":
                _check_toml()
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
        return tuple(sources)


def _check_toml() -> None:
    """Python 3.10 has no TOML reader of its own: say so, not an ImportError."""
    if sys.version_info >= (3, 11):
        return
    try:
        import tomli  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "GATE_CONFIG_FILE names a TOML file, which needs Python 3.11 or later, or "
            "'pip install tomli' on 3.10. A JSON file works everywhere."
        ) from None
