"""gate-middleware: an OpenAI-compatible AI gateway inside any Starlette or FastAPI app."""

from __future__ import annotations

from ._tuning import tune_gc
from .accounts import AccountKeys
from .app import Gateway
from .auth import Authenticator, Level, Principal, StaticKeys
from .client import GateClient
from .errors import (
    AuthenticationError,
    ConfigurationError,
    GateError,
    GatewayNotStartedError,
    InsufficientQuotaError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamLimitError,
)
from .errors import handle_gate_error as gate_exception_handler
from .guard import Guard
from .health import HealthStore, MemoryHealth, RedisHealth
from .middleware import GateContext, GateDependency, GateMiddleware
from .providers.base import Provider, Reply
from .providers.fake import FakeProvider
from .providers.openai import OpenAICompatible
from .ratelimit import RateLimitGuard
from .record import RecordHook, RequestRecord
from .routing import Catalogue, Deployment, ModelEntry
from .settings import (
    DeploymentSettings,
    GateSettings,
    LimitSettings,
    ModelSettings,
    ProviderSettings,
    RateLimitSettings,
)
from .storage import Storage, StorageConflict, storage_from_url

__version__ = "0.1.0"

__all__ = [
    "AccountKeys",
    "AuthenticationError",
    "Authenticator",
    "Catalogue",
    "ConfigurationError",
    "Deployment",
    "DeploymentSettings",
    "FakeProvider",
    "GateClient",
    "GateContext",
    "GateDependency",
    "GateError",
    "GateMiddleware",
    "GateSettings",
    "Gateway",
    "GatewayNotStartedError",
    "Guard",
    "HealthStore",
    "InsufficientQuotaError",
    "InvalidRequestError",
    "Level",
    "LimitSettings",
    "MemoryHealth",
    "ModelEntry",
    "ModelSettings",
    "NotFoundError",
    "OpenAICompatible",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Principal",
    "Provider",
    "ProviderSettings",
    "RateLimitError",
    "RateLimitGuard",
    "RateLimitSettings",
    "RecordHook",
    "RedisHealth",
    "Reply",
    "RequestRecord",
    "ServiceUnavailableError",
    "StaticKeys",
    "Storage",
    "StorageConflict",
    "UpstreamError",
    "UpstreamLimitError",
    "__version__",
    "gate_exception_handler",
    "storage_from_url",
    "tune_gc",
]
