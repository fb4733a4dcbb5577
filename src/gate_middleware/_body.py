"""Reading and checking request bodies: only the fields the gateway itself needs."""

from __future__ import annotations

from typing import Any

from starlette.types import Receive, Scope

from . import _json
from .errors import GateError, InvalidRequestError, PayloadTooLargeError
from .record import gate_headers
from .tokens import MAX_TOKENS

__all__ = ["check_chat", "check_embeddings", "read_json"]


async def read_json(scope: Scope, receive: Receive, limit: int) -> dict[str, Any]:
    declared = gate_headers(scope).get("content-length")
    # ASCII digits only ("²".isdigit() is true, int("²") fails); a number too long to
    # read cheaply is too large anyway.
    if (
        declared
        and declared.isascii()
        and declared.isdigit()
        and (len(declared) > 18 or int(declared) > limit)
    ):
        raise _too_large(limit)
    chunks, size = [], 0
    while True:  # the ASGI messages themselves: Request.stream() is a generator more
        message = await receive()
        if message["type"] == "http.disconnect":
            # Nobody is left to answer; the record still says what happened.
            raise GateError(
                "The client disconnected while sending the request.",
                status=499,
                type="invalid_request_error",
                code="client_disconnected",
            )
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = _json.loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    except ValueError:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return body


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The request body is larger than this gateway's limit of {limit} bytes."
    )


def _type_error(param: str, expected: str, value: Any) -> InvalidRequestError:
    got = "null" if value is None else type(value).__name__
    return InvalidRequestError(
        f"Invalid type for '{param}': expected {expected}, but got {got}.", param=param
    )


# Model names are short (OpenRouter's longest are under 100 characters); one is stored
# in every ledger row of a request, refused ones too.
_LONGEST_NAME = 256


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    models = body.get("models")
    if isinstance(models, list):
        for name in models:  # whichever answers names the ledger rows, as `model` does
            if isinstance(name, str) and (len(name) > _LONGEST_NAME or "\x00" in name):
                raise InvalidRequestError(
                    f"Invalid 'models': a name has more than {_LONGEST_NAME} characters "
                    "or a NUL character.",
                    param="models",
                )
    if model is None and isinstance(models, list) and models and isinstance(models[0], str):
        return models[0]  # OpenRouter's convention: `models` alone names the first choice
    if model is None:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise _type_error("model", "a non-empty string", model)
    if "\x00" in model:  # no database stores it: its ledger row would fail every batch
        raise InvalidRequestError("Invalid 'model': it contains a NUL character.", param="model")
    if len(model) > _LONGEST_NAME:
        raise InvalidRequestError(
            f"Invalid 'model': longer than {_LONGEST_NAME} characters.", param="model"
        )
    return model


def _optional(
    body: dict[str, Any], param: str, kind: type | tuple[type, ...], expected: str
) -> None:
    value = body.get(param)
    if value is not None and (
        not isinstance(value, kind) or isinstance(value, bool) and kind is not bool
    ):
        raise _type_error(param, expected, value)


# The optional chat fields the gateway itself reads: their type, as an error names it.
_CHAT_OPTIONAL: dict[str, tuple[type | tuple[type, ...], str]] = {
    "stream": (bool, "a boolean"),
    "stream_options": (dict, "an object"),
    "max_tokens": (int, "an integer"),
    "max_completion_tokens": (int, "an integer"),
    "n": (int, "an integer"),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
}
_AT_LEAST_ONE = frozenset({"max_tokens", "max_completion_tokens", "n"})
# What a hold multiplies: bounded, so a cost is always an integer the database holds.
_AT_MOST = {"max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS, "n": 128}


def check_chat(body: dict[str, Any]) -> tuple[str, bool]:
    """The model asked for and whether to stream; 400 for what the gateway itself reads."""
    model = _model(body)
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequestError("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise InvalidRequestError(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            param="messages",
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{index}]", "an object", message)
        if not isinstance(message.get("role"), str):
            raise _type_error(f"messages[{index}].role", "a string", message.get("role"))
    for param in body:  # in the order sent; most requests send one or two of these
        spec = _CHAT_OPTIONAL.get(param)
        if spec is None:
            continue
        _optional(body, param, *spec)
        if param in _AT_LEAST_ONE and (value := body[param]) is not None:
            if value < 1:
                raise InvalidRequestError(f"Invalid '{param}': must be at least 1.", param=param)
            if value > _AT_MOST[param]:
                raise InvalidRequestError(
                    f"Invalid '{param}': must be at most {_AT_MOST[param]}.", param=param
                )
    return model, body.get("stream") is True


def check_embeddings(body: dict[str, Any]) -> str:
    model = _model(body)
    inputs = body.get("input")
    if inputs is None:
        raise InvalidRequestError("Missing required parameter: 'input'.", param="input")
    if not isinstance(inputs, (str, list)) or (isinstance(inputs, list) and not inputs):
        raise _type_error("input", "a string or a non-empty array", inputs)
    _optional(body, "dimensions", int, "an integer")
    return model
