"""The same transports for the ``httpx2`` stack (openai 3.x is built on it). Imported only when asked for."""

from __future__ import annotations

import httpx2

from .engine import Engine
from .transport import (
    HttpStack,
    ModuleStack,
    handle_async,
    handle_sync,
)

HTTPX2: HttpStack[httpx2.Request, httpx2.Response] = ModuleStack(httpx2)


class Httpx2PaymentTransport(httpx2.BaseTransport):
    """An ``httpx2`` transport that pays, meters and budgets every call through an `Engine`."""

    def __init__(self, engine: Engine, inner: httpx2.BaseTransport | None = None) -> None:
        self.engine = engine
        self._inner = inner or httpx2.HTTPTransport(
            limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
        )

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        return handle_sync(HTTPX2, self.engine, self._inner, request)

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
        return await handle_async(HTTPX2, self.engine, self._inner, request)

    async def aclose(self) -> None:
        await self._inner.aclose()
