"""Thin httpx transports that run the core. The sync and async twins differ only in ``await``.

They read the request once (the body is kept for exactly one replay), ask the engine what to do, do it, and hand back
the response with its stream wrapped for metering. No policy, pricing or ledger logic lives here.
"""

from __future__ import annotations

import contextvars
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any, Protocol

import httpx

from .core import Answer, Deliver, Head, Send, StreamEnd, describe_request
from .engine import Engine, delivery_context
from .metering import UsageMeter
from .x402 import MAX_CHALLENGE_BYTES, PAYMENT_HEADERS, decode_settlement

_HOP_HEADERS = frozenset({"content-length", "transfer-encoding"})
_PAYMENT_HEADER_BYTES = frozenset(name.encode("ascii") for name in PAYMENT_HEADERS)
_SECRET_HEADER_BYTES = _PAYMENT_HEADER_BYTES | {b"authorization"}
_DROPPED_ON_REBUILD = _PAYMENT_HEADER_BYTES | {name.encode("ascii") for name in _HOP_HEADERS}


class _Request(Protocol):
    method: str
    url: Any
    headers: Any
    extensions: Any
    content: bytes


class _Ending:
    """Finishes a flow exactly once when a delivered body ends, aborts or is closed; holds the stream deadline.

    ``current_receipt`` is set in the context that ends the body (the consumer's); receipt listeners run in the
    context of the call as it was at delivery, even when an abandoned stream is only closed by the garbage collector.
    """

    __slots__ = ("_context", "_ended", "_engine", "_flow", "_http", "deadline", "meter")

    def __init__(self, http: ModuleType, meter: UsageMeter, deliver: Deliver, engine: Engine, flow: Any) -> None:
        self.meter = meter
        self._http = http
        self._engine = engine
        self._flow = flow
        self._ended = False
        self._context = contextvars.copy_context()
        self.deadline = None if deliver.deadline_seconds is None else time.monotonic() + deliver.deadline_seconds

    def timeout(self) -> Exception:
        """The error of a stream that ran past its deadline."""
        error: Exception = self._http.ReadTimeout("llm402: the stream ran past its deadline (max_stream_seconds)")
        return error

    def end(self, *, aborted: bool, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        meter = self.meter
        aborted = aborted and not meter.done
        report = meter.settlement
        end = StreamEnd(
            meter.usage,
            aborted=aborted,
            error=error if aborted else None,
            body=meter.body,
            settlement=None if report is None else decode_settlement({"payment-response": report}),
        )
        token = delivery_context.set(self._context)
        try:
            if self._engine.advance(self._flow, end) is not None:
                raise RuntimeError("llm402 flow asked for HTTP after delivery")
        finally:
            delivery_context.reset(token)


def _outgoing(http: ModuleType, request: _Request, send: Send, placeholder_auth: str | None) -> Any:
    """The request to put on the wire: the caller's headers (minus any payment header they carried, and the
    placeholder API key an SDK insists on sending to a pay-per-call gateway), ours, and the body."""
    if send.url is not None:  # a request of llm402's own (top-up, key mint): nothing of the caller's goes along
        return http.Request(
            send.method or "POST",
            send.url,
            headers=list(send.headers.items()),
            content=send.body,
            extensions=request.extensions,
        )
    ours = [(name.encode("ascii"), value.encode("ascii")) for name, value in send.headers.items()]
    names = {name.lower() for name, _ in ours}
    in_place = send.body is request.content and names.isdisjoint(_SECRET_HEADER_BYTES)
    skip = (_PAYMENT_HEADER_BYTES if in_place else _DROPPED_ON_REBUILD) | names
    placeholder = None if placeholder_auth is None else placeholder_auth.encode("ascii")
    headers = [
        (key, value)
        for key, value in request.headers.raw
        if (lower := key.lower()) not in skip and not (lower == b"authorization" and value == placeholder)
    ]
    if in_place:
        # the common case (first, unpaid send with the caller's body): the caller's request goes out with its headers
        # replaced instead of a new request; nothing secret is added, so a redirect httpx builds from it carries
        # nothing of ours
        headers.extend(ours)
        request.headers = http.Headers(headers)
        return request
    # a new request (a payment or key goes along, or the body changed), so the caller's never carries a secret
    if not any(key.lower() == b"host" for key, _ in headers):
        headers.insert(0, (b"Host", request.url.netloc))
    headers.extend(ours)
    headers.append((b"content-length", str(len(send.body)).encode("ascii")))
    outgoing = http.Request(
        request.method, request.url, headers=headers, stream=http.ByteStream(send.body), extensions=request.extensions
    )
    outgoing.read()
    return outgoing


def _local(http: ModuleType, request: _Request, answer: Answer) -> Any:
    return http.Response(answer.status, headers=list(answer.headers.items()), content=answer.body, request=request)


def _delivered(http: ModuleType, request: Any, response: Any, deliver: Deliver, stream: Any, unread: bool) -> Any:
    """The response handed to the caller: the gateway's, with our headers added and its body metered. A response
    whose body is still unread is adjusted in place; one whose body was read (by us, or already by the inner
    transport: a mock's ``content=``) is rebuilt around the metered stream."""
    if unread and not hasattr(response, "_content"):
        headers = response.headers
        for name, value in deliver.headers.items():
            headers[name] = value
        response.stream = stream
        response.request = request
        return response
    headers = http.Headers(response.headers)
    for name, value in deliver.headers.items():
        headers[name] = value
    return http.Response(
        response.status_code,
        headers=headers,
        stream=stream,
        extensions=response.extensions,
        request=request,
    )


def _header(headers: Any, name: str) -> str | None:
    """One header's value (repeats joined), without the KeyError a missing header costs ``Headers.get``."""
    values = headers.get_list(name)
    return ", ".join(values) if values else None


def _meter(response: Any, deliver: Deliver, streaming: bool) -> UsageMeter:
    return UsageMeter(
        streaming=streaming,
        content_encoding=_header(response.headers, "content-encoding"),
        strip_usage_event=deliver.strip_usage_event,
    )


# --- sync ------------------------------------------------------------------------------------------------------


class SyncMeteredStream:
    """Mixin body of the sync stream wrapper (combined with the stack's ``SyncByteStream``)."""

    def __init__(self, inner: Any, ending: _Ending) -> None:
        self._inner = inner
        self._ending = ending

    def __iter__(self) -> Iterator[bytes]:
        feed, deadline, monotonic = self._ending.meter.feed, self._ending.deadline, time.monotonic
        try:
            for chunk in self._inner:
                if deadline is not None and monotonic() > deadline:
                    raise self._ending.timeout()
                out = feed(chunk)
                if out:
                    yield out
            tail = self._ending.meter.finish()
            if tail:
                yield tail
        except BaseException as exc:
            self._ending.end(aborted=True, error=type(exc).__name__)
            raise
        self._ending.end(aborted=False)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._ending.end(aborted=True, error="closed_early")


def _decoded(response: Any, raw: bytes) -> bytes:
    """The body for parsing: gzip/deflate undone (bounded), whatever the gateway sent despite ``identity``."""
    if (_header(response.headers, "content-encoding") or "").lower() in ("gzip", "deflate", "x-gzip"):
        try:
            return zlib.decompressobj(wbits=47).decompress(raw, MAX_CHALLENGE_BYTES + 1)
        except zlib.error:
            return b""
    return raw


def _read_bounded_sync(response: Any) -> bytes:
    body = bytearray()
    for chunk in response.stream:
        body += chunk
        if len(body) > MAX_CHALLENGE_BYTES:
            break
    response.close()
    return bytes(body)


def handle_sync(
    http: ModuleType, engine: Engine, inner: Any, request: Any, stream_type: type[SyncMeteredStream]
) -> Any:
    """Run one call through the engine over a sync inner transport."""
    body = request.read()
    call = describe_request(request.method, str(request.url), request.headers.get("content-type"), body)
    flow = engine.flow(call)
    effect = engine.advance(flow)
    response: Any = None
    consumed: bytes | None = None
    while True:
        if isinstance(effect, Send):
            if response is not None:
                response.close()
            try:
                response = inner.handle_request(_outgoing(http, request, effect, engine.placeholder_auth))
                consumed = _read_bounded_sync(response) if response.status_code == 402 or effect.read_body else None
                parsed = _decoded(response, consumed) if consumed is not None else None
                head = Head(response.status_code, response.headers, parsed)
            except Exception as exc:
                effect = engine.advance(flow, error=exc)  # the flow records the failure and re-raises
                continue
            effect = engine.advance(flow, head)
        elif isinstance(effect, Answer):
            if response is not None:
                response.close()
            return _local(http, request, effect)
        elif isinstance(effect, Deliver):
            deliver = effect
            meter = _meter(response, deliver, call.streaming)
            ending = _Ending(http, meter, deliver, engine, flow)
            raw = http.ByteStream(consumed) if consumed is not None else response.stream
            return _delivered(http, request, response, deliver, stream_type(raw, ending), consumed is None)
        else:
            raise RuntimeError("llm402 flow ended without an answer")


# --- async -----------------------------------------------------------------------------------------------------


class AsyncMeteredStream:
    """Mixin body of the async stream wrapper (combined with the stack's ``AsyncByteStream``)."""

    def __init__(self, inner: Any, ending: _Ending) -> None:
        self._inner = inner
        self._ending = ending

    async def __aiter__(self) -> AsyncIterator[bytes]:
        feed, deadline, monotonic = self._ending.meter.feed, self._ending.deadline, time.monotonic
        try:
            async for chunk in self._inner:
                if deadline is not None and monotonic() > deadline:
                    raise self._ending.timeout()
                out = feed(chunk)
                if out:
                    yield out
            tail = self._ending.meter.finish()
            if tail:
                yield tail
        except BaseException as exc:
            self._ending.end(aborted=True, error=type(exc).__name__)
            raise
        self._ending.end(aborted=False)

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._ending.end(aborted=True, error="closed_early")


async def _read_bounded_async(response: Any) -> bytes:
    body = bytearray()
    async for chunk in response.stream:
        body += chunk
        if len(body) > MAX_CHALLENGE_BYTES:
            break
    await response.aclose()
    return bytes(body)


async def handle_async(
    http: ModuleType, engine: Engine, inner: Any, request: Any, stream_type: type[AsyncMeteredStream]
) -> Any:
    """Run one call through the engine over an async inner transport."""
    body = await request.aread()
    call = describe_request(request.method, str(request.url), request.headers.get("content-type"), body)
    flow = engine.flow(call)
    effect = engine.advance(flow)
    response: Any = None
    consumed: bytes | None = None
    while True:
        if isinstance(effect, Send):
            if response is not None:
                await response.aclose()
            try:
                response = await inner.handle_async_request(_outgoing(http, request, effect, engine.placeholder_auth))
                wanted = response.status_code == 402 or effect.read_body
                consumed = await _read_bounded_async(response) if wanted else None
                parsed = _decoded(response, consumed) if consumed is not None else None
                head = Head(response.status_code, response.headers, parsed)
            except Exception as exc:
                effect = engine.advance(flow, error=exc)
                continue
            effect = engine.advance(flow, head)
        elif isinstance(effect, Answer):
            if response is not None:
                await response.aclose()
            return _local(http, request, effect)
        elif isinstance(effect, Deliver):
            deliver = effect
            meter = _meter(response, deliver, call.streaming)
            ending = _Ending(http, meter, deliver, engine, flow)
            raw = http.ByteStream(consumed) if consumed is not None else response.stream
            return _delivered(http, request, response, deliver, stream_type(raw, ending), consumed is None)
        else:
            raise RuntimeError("llm402 flow ended without an answer")


# --- the httpx stack -------------------------------------------------------------------------------------------


def default_limits() -> httpx.Limits:
    """Connection limits for agent workloads (many concurrent calls to one gateway)."""
    return httpx.Limits(max_connections=1000, max_keepalive_connections=100)


class _HttpxSyncStream(SyncMeteredStream, httpx.SyncByteStream):
    pass


class _HttpxAsyncStream(AsyncMeteredStream, httpx.AsyncByteStream):
    pass


class PaymentTransport(httpx.BaseTransport):
    """An ``httpx`` transport that pays, meters and budgets every call through an `Engine`."""

    def __init__(self, engine: Engine, inner: httpx.BaseTransport | None = None) -> None:
        self.engine = engine
        self._inner = inner or httpx.HTTPTransport(limits=default_limits())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response: httpx.Response = handle_sync(httpx, self.engine, self._inner, request, _HttpxSyncStream)
        return response

    def close(self) -> None:
        self._inner.close()


class AsyncPaymentTransport(httpx.AsyncBaseTransport):
    """The async twin of `PaymentTransport`."""

    def __init__(self, engine: Engine, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.engine = engine
        self._inner = inner or httpx.AsyncHTTPTransport(limits=default_limits())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response: httpx.Response = await handle_async(httpx, self.engine, self._inner, request, _HttpxAsyncStream)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
