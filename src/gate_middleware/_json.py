"""JSON on the request path: orjson when it is installed (the `speed` extra), else the
standard library. Four JSON steps a request, about 4 us each with the standard library
and under 1 us with orjson (bench/throughput.py shows the difference)."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["dumps", "loads", "stdlib_dumps", "stdlib_loads"]

# Where an unpaired surrogate can come from: an escape of one (raw bytes of one are
# not UTF-8, which `json.loads` refuses by itself).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# NaN and Infinity are not JSON: orjson refuses them, and an upstream would too (the
# standard library took them, and sent them on as they came).
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def stdlib_loads(data: bytes | str) -> Any:
    try:
        text = data if isinstance(data, str) else data.decode(json.detect_encoding(data))
        value = _DECODER.decode(text)
    except RecursionError:  # nested deeper than the interpreter's stack: bad input
        raise ValueError("JSON nested too deeply") from None
    if isinstance(data, str) or _SURROGATE_ESCAPE.search(data):
        # The standard library takes "\ud800" alone as a string, which no UTF-8 can
        # carry: not to the upstream, not into the ledger (one such model name stopped
        # every ledger batch). orjson refuses it; so does this.
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except RecursionError:  # decoded, yet too deep to encode again: bad input too
            raise ValueError("JSON nested too deeply") from None
        except UnicodeEncodeError:
            raise ValueError("JSON with an unpaired surrogate (\\ud800-\\udfff)") from None
    return value


def stdlib_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


try:
    import orjson
except ImportError:  # pragma: no cover - depends on the install
    loads, dumps = stdlib_loads, stdlib_dumps
else:

    def loads(data: bytes | str) -> Any:
        return orjson.loads(data)

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)
