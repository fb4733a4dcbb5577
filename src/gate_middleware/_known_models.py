"""Built-in catalogue: context lengths and list prices (USD per million tokens).

Prices are the vendors' published list prices when this table was written; override
any of them with `GATE_MODELS` (or a config file) where your contract differs.
"""

from __future__ import annotations

__all__ = ["KNOWN_MODELS", "VENDOR_BASE_URLS"]

# id: (context length, input, output, cached input, kind)
KNOWN_MODELS: dict[str, tuple[int, float, float, float | None, str]] = {
    "openai/gpt-4.1": (1_047_576, 2.00, 8.00, 0.50, "chat"),
    "openai/gpt-4.1-mini": (1_047_576, 0.40, 1.60, 0.10, "chat"),
    "openai/gpt-4.1-nano": (1_047_576, 0.10, 0.40, 0.025, "chat"),
    "openai/gpt-4o": (128_000, 2.50, 10.00, 1.25, "chat"),
    "openai/gpt-4o-mini": (128_000, 0.15, 0.60, 0.075, "chat"),
    "openai/o3": (200_000, 2.00, 8.00, 0.50, "chat"),
    "openai/o4-mini": (200_000, 1.10, 4.40, 0.275, "chat"),
    "openai/text-embedding-3-small": (8_191, 0.02, 0.0, None, "embedding"),
    "openai/text-embedding-3-large": (8_191, 0.13, 0.0, None, "embedding"),
    "anthropic/claude-opus-4-5": (200_000, 5.00, 25.00, 0.50, "chat"),
    "anthropic/claude-sonnet-4-5": (200_000, 3.00, 15.00, 0.30, "chat"),
    "anthropic/claude-haiku-4-5": (200_000, 1.00, 5.00, 0.10, "chat"),
    "google/gemini-2.5-pro": (1_048_576, 1.25, 10.00, 0.31, "chat"),
    "google/gemini-2.5-flash": (1_048_576, 0.30, 2.50, 0.075, "chat"),
    "deepseek/deepseek-chat": (128_000, 0.28, 0.42, 0.028, "chat"),
    "deepseek/deepseek-reasoner": (128_000, 0.28, 0.42, 0.028, "chat"),
}

# Where a provider named after its vendor lives, when its settings give no base_url.
VENDOR_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com/v1",
    "google": "https://generativelanguage.googleapis.com/v1beta/openai",
    "deepseek": "https://api.deepseek.com/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "groq": "https://api.groq.com/openai/v1",
    "mistral": "https://api.mistral.ai/v1",
    "together": "https://api.together.xyz/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "vllm": "http://127.0.0.1:8000/v1",
}
