"""A FastAPI app that mounts the gateway at /v1 next to its own routes.

Run: GATE_API_KEYS=sk-my-key uvicorn examples.fastapi_app:app
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gate_middleware import Gateway

gateway = Gateway()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Mounted apps get no lifespan events: the host starts the gateway with its own.
    async with gateway:
        yield


app = FastAPI(title="My product", lifespan=lifespan)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


app.mount("/v1", gateway)
