"""Upstream HTTP transports behind one small seam.

aiohttp is the default: on the same load it spends about a third of httpx's CPU per
proxied request (bench/throughput.py). An `httpx.AsyncClient` can be passed instead,
which is how tests reach an in-process fake upstream through `httpx.ASGITransport`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import httpx
from yarl import URL

from ..errors import GatewayNotStartedError, UpstreamError

__all__ = ["AiohttpTransport", "HttpxTransport", "Transport", "TransportResponse", "shown"]

_MAX_URLS = 1000


class TransportResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def startup(self) -> None: ...

    async def aclose(self) -> None: ...

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        read_timeout: float,
    ) -> TransportResponse: ...


def shown(url: str) -> str:
    """A URL as callers and logs may see it: without the user, password and query a
    base URL may carry (`http://user:secret@host`, `?key=...`)."""
    try:
        return str(URL(url).with_user(None).with_query(None).with_fragment(None))
    except ValueError:
        return "(an invalid URL)"


def _timeout_error(url: str) -> UpstreamError:
    return UpstreamError(
        f"The upstream timed out ({shown(url)}).", status=504, code="upstream_timeout"
    )


def _connection_error(url: str, exc: BaseException) -> UpstreamError:
    reason = type(exc).__name__
    return UpstreamError(
        f"The upstream connection failed ({shown(url)}: {reason}).",
        status=502,
        code="upstream_connection_error",
    )


class _AiohttpResponse:
    __slots__ = ("_response", "_url", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self._url = url
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except asyncio.TimeoutError:
            raise _timeout_error(self._url) from None
        except aiohttp.ClientError as exc:
            raise _connection_error(self._url, exc) from exc
        finally:
            self._response.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except asyncio.TimeoutError:
            raise _timeout_error(self._url) from None
        except aiohttp.ClientError as exc:
            raise _connection_error(self._url, exc) from exc

    async def aclose(self) -> None:
        # close(), not release(): a stream we stop reading cannot go back to the pool.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport:
    def __init__(self, *, connect_timeout: float, pool_size: int = 1000) -> None:
        self._connect_timeout = connect_timeout
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._urls: dict[str, URL] = {}

    async def startup(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._pool_size, ttl_dns_cache=300)
            # No cookie jar: cookies an upstream sets for one caller must never ride
            # along on another's request (and the jar costs time on every call).
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=True,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        read_timeout: float,
    ) -> TransportResponse:
        if self._session is None:
            raise GatewayNotStartedError("The upstream pool is closed: start the gateway first.")
        timeout = self._timeouts.get(read_timeout)
        if timeout is None:
            timeout = self._timeouts[read_timeout] = aiohttp.ClientTimeout(
                sock_connect=self._connect_timeout, sock_read=read_timeout
            )
        parsed = self._urls.get(url)
        if parsed is None:  # parsed once: an upstream has a handful of URLs
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        try:
            # No redirect is followed: aiohttp would replay the call, the caller's prompt
            # and the provider's own headers (an `x-api-key`) with it, to another host.
            response = await self._session.request(
                method, parsed, data=body, headers=headers, timeout=timeout, allow_redirects=False
            )
        except asyncio.TimeoutError:
            raise _timeout_error(url) from None
        except aiohttp.ClientError as exc:
            raise _connection_error(url, exc) from exc
        return _AiohttpResponse(response, url)


class _HttpxResponse:
    __slots__ = ("_response", "_url", "headers", "status")

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self._url = url
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.TimeoutException:
            raise _timeout_error(self._url) from None
        except Exception as exc:  # an in-process app may raise anything
            raise _connection_error(self._url, exc) from exc
        finally:
            await self._response.aclose()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException:
            raise _timeout_error(self._url) from None
        except Exception as exc:
            raise _connection_error(self._url, exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport:
    """Over a client the host owns: the gateway neither opens nor closes it."""

    def __init__(self, client: httpx.AsyncClient, *, connect_timeout: float) -> None:
        self._client = client
        self._connect_timeout = connect_timeout

    async def startup(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        read_timeout: float,
    ) -> TransportResponse:
        timeout = httpx.Timeout(read_timeout, connect=self._connect_timeout)
        request = self._client.build_request(
            method, url, headers=headers, content=body, timeout=timeout
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise _timeout_error(url) from None
        except Exception as exc:
            raise _connection_error(url, exc) from exc
        return _HttpxResponse(response, url)
