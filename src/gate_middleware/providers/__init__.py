"""Model backends behind the `Provider` protocol, and building them from settings."""

from __future__ import annotations

import httpx

from .._known_models import VENDOR_BASE_URLS
from ..errors import ConfigurationError
from ..settings import GateSettings
from .base import Provider
from .fake import FakeProvider
from .openai import OpenAICompatible

__all__ = ["providers_from_settings"]


def providers_from_settings(
    settings: GateSettings, http_client: httpx.AsyncClient | None
) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name, config in settings.providers.items():
        if config.kind == "fake":
            providers[name] = FakeProvider(latency=settings.fake_latency)
            continue
        base_url = config.base_url or VENDOR_BASE_URLS.get(name)
        if base_url is None:
            raise ConfigurationError(
                f"Provider {name!r} needs a base_url (GATE_PROVIDERS__{name.upper()}__BASE_URL)."
            )
        providers[name] = OpenAICompatible(
            base_url,
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            headers={name: value.get_secret_value() for name, value in config.headers.items()},
            connect_timeout=config.connect_timeout or settings.connect_timeout,
            read_timeout=config.read_timeout or settings.read_timeout,
            stream_timeout=config.stream_timeout or settings.stream_timeout,
            stream_usage=config.stream_usage,
            client=http_client,
        )
    return providers
