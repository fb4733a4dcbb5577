"""A FastAPI app whose own AI endpoints are guarded and metered by the gateway.

Run: GATE_API_KEYS=sk-my-key uvicorn examples.host_routes:app

- /v1/...            the mounted OpenAI-compatible gateway
- /summarize         a host endpoint: the caller's gateway key, limits, quota and metering
- /summarize/stream  the same, streamed to the caller as plain text
- /translate         the FastAPI dependency way, through the openai SDK
- /health, /ws       not guarded: the middleware leaves them alone
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from gate_middleware import (
    GateContext,
    GateDependency,
    GateError,
    GateMiddleware,
    Gateway,
    gate_exception_handler,
)

gateway = Gateway()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with gateway:
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/v1", gateway)
app.add_middleware(GateMiddleware, gateway=gateway, paths=["/summarize", "/summarize/*"])
app.add_exception_handler(GateError, gate_exception_handler)


class Text(BaseModel):
    text: str
    model: str = "openai/gpt-4.1-mini"


def _messages(text: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Summarize the user's text in one sentence."},
        {"role": "user", "content": text},
    ]


@app.post("/summarize")
async def summarize(body: Text, request: Request) -> dict[str, Any]:
    gate: GateContext = request.state.gate
    answer = await gate.chat(model=body.model, messages=_messages(body.text))
    return {"summary": answer["choices"][0]["message"]["content"], "usage": answer["usage"]}


@app.post("/summarize/stream")
async def summarize_stream(body: Text, request: Request) -> StreamingResponse:
    gate: GateContext = request.state.gate
    chunks = await gate.chat(model=body.model, messages=_messages(body.text), stream=True)

    async def text() -> AsyncIterator[str]:
        async for chunk in chunks:
            for choice in chunk["choices"]:
                yield choice["delta"].get("content") or ""

    return StreamingResponse(text(), media_type="text/plain")


@app.post("/translate")
async def translate(
    body: Text, gate: GateContext = Depends(GateDependency(gateway))
) -> dict[str, str]:
    client = gate.openai()
    answer = await client.chat.completions.create(
        model=body.model,
        messages=[{"role": "user", "content": f"Translate to French: {body.text}"}],
    )
    return {"translation": answer.choices[0].message.content or ""}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()
