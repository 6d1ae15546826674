"""The same transports for the ``httpx2`` stack (openai 3.x is built on it). Imported only when asked for."""

from __future__ import annotations

import httpx2

from .engine import Engine
from .transport import AsyncMeteredStream, SyncMeteredStream, handle_async, handle_sync


class _SyncStream(SyncMeteredStream, httpx2.SyncByteStream):
    pass


class _AsyncStream(AsyncMeteredStream, httpx2.AsyncByteStream):
    pass


class Httpx2PaymentTransport(httpx2.BaseTransport):
    """An ``httpx2`` transport that pays, meters and budgets every call through an `Engine`."""

    def __init__(self, engine: Engine, inner: httpx2.BaseTransport | None = None) -> None:
        self.engine = engine
        self._inner = inner or httpx2.HTTPTransport(
            limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
        )

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response: httpx2.Response = handle_sync(httpx2, self.engine, self._inner, request, _SyncStream)
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncHttpx2PaymentTransport(httpx2.AsyncBaseTransport):
    """The async twin of `Httpx2PaymentTransport`."""

    def __init__(self, engine: Engine, inner: httpx2.AsyncBaseTransport | None = None) -> None:
        self.engine = engine
        self._inner = inner or httpx2.AsyncHTTPTransport(
            limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response: httpx2.Response = await handle_async(httpx2, self.engine, self._inner, request, _AsyncStream)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
