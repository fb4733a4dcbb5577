"""The model catalogue: public model names -> deployments (provider + upstream name).

Built once at start-up from the built-in table, settings and the host's providers;
a request only looks its model up in a dict and, with several deployments, draws one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._known_models import KNOWN_MODELS
from .errors import ConfigurationError, NotFoundError
from .providers.base import Provider
from .settings import GateSettings, ModelSettings

__all__ = ["Catalogue", "Deployment", "ModelEntry"]

_MAX_DYNAMIC = 1024  # cache bound for `brand/model` names not in the catalogue


@dataclass(frozen=True, slots=True)
class Deployment:
    provider_name: str
    provider: Provider
    model: str
    weight: float = 1.0

    @property
    def key(self) -> str:
        """Names the deployment in health state and logs."""
        return f"{self.provider_name}:{self.model}"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    id: str
    owned_by: str
    kind: str
    deployments: tuple[Deployment, ...]
    context_length: int | None = None
    input_price: float | None = None
    output_price: float | None = None
    cached_input_price: float | None = None
    fallbacks: tuple[str, ...] = ()
    context_fallback: str | None = None
    max_retries: int | None = None

    def ordered(self) -> list[Deployment]:
        """Deployments in a weighted random order: the first is drawn by weight, and so on."""
        if len(self.deployments) == 1:
            return [self.deployments[0]]
        pool, order = list(self.deployments), []
        while pool:
            chosen = random.choices(pool, [d.weight for d in pool])[0]
            pool.remove(chosen)
            order.append(chosen)
        return order

    def card(self) -> dict[str, Any]:
        """The entry in `GET /models`: OpenAI's fields plus what a buyer needs."""
        card: dict[str, Any] = {
            "id": self.id,
            "object": "model",
            "created": 0,
            "owned_by": self.owned_by,
            "context_length": self.context_length,
        }
        if self.input_price is not None:
            # OpenRouter's convention: USD per token, as strings.
            card["pricing"] = {
                "prompt": _per_token(self.input_price),
                "completion": _per_token(self.output_price or 0.0),
                "input_cache_read": _per_token(self.cached_input_price)
                if self.cached_input_price is not None
                else None,
            }
        return card


def _per_token(per_million: float | None) -> str:
    return f"{(per_million or 0.0) / 1_000_000:.12f}".rstrip("0").rstrip(".") or "0"


class Catalogue:
    def __init__(
        self,
        entries: Mapping[str, ModelEntry],
        providers: Mapping[str, Provider],
        aliases: Mapping[str, str],
    ) -> None:
        self._entries = dict(entries)
        self._providers = dict(providers)
        self._aliases = dict(aliases)
        self._dynamic: dict[str, ModelEntry] = {}
        for alias, target in self._aliases.items():
            if target not in self._entries:
                raise ConfigurationError(f"Alias {alias!r} points to unknown model {target!r}.")

    @classmethod
    def build(cls, settings: GateSettings, providers: Mapping[str, Provider]) -> Catalogue:
        fake_only = set(providers) == {"fake"}
        entries: dict[str, ModelEntry] = {}
        ids = list(KNOWN_MODELS) + [m for m in settings.models if m not in KNOWN_MODELS]
        for model_id in ids:
            override = settings.models.get(model_id, ModelSettings())
            brand, _, name = model_id.partition("/")
            if override.deployments:
                deployments = []
                for d in override.deployments:
                    if d.provider not in providers:
                        raise ConfigurationError(
                            f"Model {model_id!r} names provider {d.provider!r}, which is not "
                            f"configured (have: {', '.join(sorted(providers))})."
                        )
                    deployments.append(
                        Deployment(d.provider, providers[d.provider], d.model or name, d.weight)
                    )
            elif brand in providers or fake_only:
                owner = brand if brand in providers else "fake"
                deployments = [Deployment(owner, providers[owner], name or model_id)]
            else:
                continue  # a known model whose vendor this gateway does not reach
            context, inp, out, cached, kind = KNOWN_MODELS.get(
                model_id, (None, None, None, None, "chat")
            )
            entries[model_id] = ModelEntry(
                id=model_id,
                owned_by=override.owned_by or brand or "unknown",
                kind=override.kind if model_id in settings.models else kind,
                deployments=tuple(deployments),
                context_length=override.context_length or context,
                input_price=_first(override.input_price, inp),
                output_price=_first(override.output_price, out),
                cached_input_price=_first(override.cached_input_price, cached),
                fallbacks=tuple(override.fallbacks),
                context_fallback=override.context_fallback,
                max_retries=override.max_retries,
            )
        aliases = _bare_names(entries)
        aliases.update(settings.aliases)
        catalogue = cls(entries, providers, aliases)
        for entry in entries.values():
            for name in (*entry.fallbacks, *filter(None, [entry.context_fallback])):
                try:
                    catalogue.resolve(name)
                except NotFoundError:
                    raise ConfigurationError(
                        f"Model {entry.id!r} falls back to {name!r}, which is not served."
                    ) from None
        return catalogue

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def resolve(self, name: str) -> ModelEntry:
        entry = self._entries.get(name) or self._dynamic.get(name)
        if entry is not None:
            return entry
        if (target := self._aliases.get(name)) is not None:
            return self._entries[target]
        brand, slash, upstream_name = name.partition("/")
        provider = self._providers.get(brand) if slash and upstream_name else None
        if provider is None:
            raise NotFoundError(
                f"The model '{name}' does not exist or is not served here; "
                "GET /models lists the models you can use.",
                param="model",
                code="model_not_found",
            )
        # Not in the catalogue: its kind is unknown, so either API may use it.
        entry = ModelEntry(name, brand, "any", (Deployment(brand, provider, upstream_name),))
        if len(self._dynamic) < _MAX_DYNAMIC:
            self._dynamic[name] = entry
        return entry


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _bare_names(entries: Mapping[str, ModelEntry]) -> dict[str, str]:
    """`gpt-4.1` -> `openai/gpt-4.1`, for tools that send OpenAI's bare names."""
    seen: dict[str, list[str]] = {}
    for model_id in entries:
        _, slash, bare = model_id.partition("/")
        if slash:
            seen.setdefault(bare, []).append(model_id)
    return {bare: ids[0] for bare, ids in seen.items() if len(ids) == 1 and bare not in entries}
