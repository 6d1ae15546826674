"""The same transports for the ``httpx2`` stack (openai 3.x is built on it). Imported only when asked for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx2

from .core import Answer, Send
from .engine import Engine
from .transport import (
    AsyncMeteredStream,
    Ending,
    HttpStack,
    RawHeaders,
    ReadBody,
    SyncMeteredStream,
    handle_async,
    handle_sync,
)


class _SyncStream(SyncMeteredStream, httpx2.SyncByteStream):
    pass


class _AsyncStream(AsyncMeteredStream, httpx2.AsyncByteStream):
    pass


class _Httpx2:
    """`llm402.transport.HttpStack` for httpx2 (the httpx one, with httpx2's types)."""

    def own_request(self, send: Send, extensions: dict[str, Any]) -> httpx2.Request:
        headers = list(send.headers.items())
        return httpx2.Request(
            send.method or "POST", send.url or "", headers=headers, content=send.body, extensions=extensions
        )

    def rebuilt_request(
        self, request: httpx2.Request, headers: RawHeaders, body: bytes, extensions: dict[str, Any]
    ) -> httpx2.Request:
        stream = httpx2.ByteStream(body)
        outgoing = httpx2.Request(request.method, request.url, headers=headers, stream=stream, extensions=extensions)
        outgoing.read()
        return outgoing

    def swap(self, request: httpx2.Request, headers: RawHeaders | None, extensions: dict[str, Any]) -> dict[str, Any]:
        if headers is not None:
            request.headers = httpx2.Headers(headers)
        theirs, request.extensions = request.extensions, extensions
        return theirs

    def local_response(self, request: httpx2.Request, answer: Answer) -> httpx2.Response:
        return httpx2.Response(
            answer.status, headers=list(answer.headers.items()), content=answer.body, request=request
        )

    def adopted(
        self,
        response: httpx2.Response,
        request: httpx2.Request,
        extra: Mapping[str, str],
        ending: Ending,
        asynchronous: bool,
    ) -> httpx2.Response:
        stream = response.stream
        if asynchronous and isinstance(stream, httpx2.AsyncByteStream):
            response.stream = _AsyncStream(stream, ending)
        elif not asynchronous and isinstance(stream, httpx2.SyncByteStream):
            response.stream = _SyncStream(stream, ending)
        else:
            raise RuntimeError(f"the inner transport answered with a {type(stream).__name__} body")
        headers = response.headers
        for name, value in extra.items():
            headers[name] = value
        response.request = request
        return response

    def rebuilt_response(
        self,
        response: httpx2.Response,
        request: httpx2.Request,
        extra: Mapping[str, str],
        body: bytes,
        ending: Ending,
        asynchronous: bool,
    ) -> httpx2.Response:
        headers = httpx2.Headers(response.headers)
        for name, value in extra.items():
            headers[name] = value
        stream = _AsyncStream(ReadBody(body), ending) if asynchronous else _SyncStream(ReadBody(body), ending)
        return httpx2.Response(
            response.status_code, headers=headers, stream=stream, extensions=response.extensions, request=request
        )

    def read_timeout(self, message: str) -> Exception:
        return httpx2.ReadTimeout(message)


HTTPX2: HttpStack[httpx2.Request, httpx2.Response] = _Httpx2()


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
