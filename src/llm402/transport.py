"""Thin httpx transports that run the core. The sync and async twins differ only in ``await``.

They read the request once (the body is kept for exactly one replay), ask the engine what to do, do it, and hand back
the response with its stream wrapped for metering. No policy, pricing or ledger logic lives here.

Two rules of I/O live here, because only the transport does I/O:

- every read after the request has a deadline. A delivered body ends by ``Deliver.deadline_seconds``; a body llm402
  reads itself (a 402 challenge, the answer to a top-up or key mint) by `BODY_READ_SECONDS`, or ``max_stream_seconds``
  when that is shorter, and so do the headers of llm402's own requests (the caller's wait as long as the caller
  said). The deadline is checked at each chunk, and each read of the body waits at most the time left when the body
  began (the request's read timeout is narrowed to it), so a body that stalls is cut too: by its deadline, or at
  worst twice that when it stalls just before.
- an async transport never runs the engine's effects (ledger writes, signing, a live policy source) on the event loop:
  they run on a worker thread (asyncio's default executor; ``anyio.to_thread`` under trio), in a copy of the caller's
  context whose changes (``current_receipt``) are set back in the caller's context afterwards. Only the core's pure
  step after a response is taken on the loop, so an unpaid call costs two thread hops (reserve, settle). A caller
  cancelled meanwhile (its own timeout) waits for the thread, and the flow is still ended where it stopped: no
  reservation is left without a receipt.

The driver is written once for both HTTP stacks (httpx, httpx2) against `HttpStack`: what it needs of a stack beyond
reading requests and responses (`RequestView`, `ResponseView`) is building them and changing them in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import zlib
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, MutableMapping
from functools import partial
from typing import Any, Protocol, TypeVar

import httpx

from .core import Answer, CallRequest, Deliver, Effect, Head, Send, StreamEnd, describe_request
from .engine import Engine, IOEffect, delivery_context
from .metering import UsageMeter
from .x402 import MAX_CHALLENGE_BYTES, PAYMENT_HEADERS, decode_settlement, receipt_event_settlement

BODY_READ_SECONDS = 30.0
"""How long a body llm402 reads itself (at most 64 KiB: a 402 challenge, a top-up's or key mint's answer) may take to
arrive whole, and how long llm402's own requests wait for their headers; ``max_stream_seconds`` when that is shorter."""

PAY_AGAIN_HEADER = "llm402-pay-again"
"""A caller's header (removed before the wire): ``true`` pays again for a request identical to one already paid."""
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding"})
_PAYMENT_HEADER_BYTES = frozenset(name.encode("ascii") for name in PAYMENT_HEADERS) | {PAY_AGAIN_HEADER.encode()}
_SECRET_HEADER_BYTES = _PAYMENT_HEADER_BYTES | {b"authorization"}
_DROPPED_ON_REBUILD = _PAYMENT_HEADER_BYTES | {name.encode("ascii") for name in _HOP_HEADERS}

Flow = Generator[Effect, Any, None]
Timeouts = dict[str, float | None]
"""The ``timeout`` request extension both stacks pass to their connection pool (``connect``, ``read``, ...)."""
RawHeaders = list[tuple[bytes, bytes]]


# --- what the driver needs of an HTTP stack ----------------------------------------------------------------------


class _URL(Protocol):
    @property
    def netloc(self) -> bytes: ...


class _RequestHeaders(Protocol):
    @property
    def raw(self) -> RawHeaders: ...

    def get(self, key: str, /) -> str | None: ...


class RequestView(Protocol):
    """What the driver reads of a request (``httpx.Request``, ``httpx2.Request``)."""

    @property
    def method(self) -> str: ...

    @property
    def url(self) -> _URL: ...

    @property
    def headers(self) -> _RequestHeaders: ...

    @property
    def extensions(self) -> Mapping[str, Any]: ...

    @property
    def content(self) -> bytes: ...

    def read(self) -> bytes: ...

    async def aread(self) -> bytes: ...


class ResponseView(Protocol):
    """What the driver reads of a response (``httpx.Response``, ``httpx2.Response``)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> MutableMapping[str, str]: ...

    @property
    def is_stream_consumed(self) -> bool:
        """True once the body was read (by us, or by an inner transport that built the response from ``content=``)."""
        ...

    @property
    def content(self) -> bytes: ...

    def iter_raw(self) -> Iterator[bytes]: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


class SyncBody(Protocol):
    """A sync response body as a stack's transports hand it over (``SyncByteStream``)."""

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class AsyncBody(Protocol):
    """An async response body as a stack's transports hand it over (``AsyncByteStream``)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


Req = TypeVar("Req", bound=RequestView)
Resp = TypeVar("Resp", bound=ResponseView)
T = TypeVar("T")
_Req_contra = TypeVar("_Req_contra", bound=RequestView, contravariant=True)
_Resp_co = TypeVar("_Resp_co", bound=ResponseView, covariant=True)


class HttpStack(Protocol[Req, Resp]):
    """One HTTP stack (httpx, httpx2) as the driver needs it: its requests and responses built, or changed in place
    (the common, unpaid call sends the caller's request and hands back the gateway's response, not copies), and its
    timeout error. `HTTPX` here, ``HTTPX2`` in `llm402.transport_httpx2`."""

    def own_request(self, send: Send, extensions: dict[str, Any]) -> Req:
        """A request of llm402's own (a top-up, a key mint): nothing of the caller's goes along but ``extensions``."""
        ...

    def rebuilt_request(self, request: Req, headers: RawHeaders, body: bytes, extensions: dict[str, Any]) -> Req:
        """A new request to the caller's method and URL with these headers and body, read."""
        ...

    def swap(self, request: Req, headers: RawHeaders | None, extensions: dict[str, Any]) -> dict[str, Any]:
        """Give the caller's request these headers (unless ``None``) and extensions; the extensions it had."""
        ...

    def local_response(self, request: Req, answer: Answer) -> Resp:
        """The caller's answer made here, without the network."""
        ...

    def adopted(
        self, response: Resp, request: Req, extra: Mapping[str, str], ending: Ending, asynchronous: bool
    ) -> Resp:
        """The gateway's response, body unread, handed over in place with ``extra`` headers and its body metered."""
        ...

    def rebuilt_response(
        self, response: Resp, request: Req, extra: Mapping[str, str], body: bytes, ending: Ending, asynchronous: bool
    ) -> Resp:
        """A new response around a body already read, with ``extra`` headers, metered."""
        ...

    def read_timeout(self, message: str) -> Exception:
        """The stack's read-timeout error (the SDKs turn it into their timeout error)."""
        ...


class SyncInner(Protocol[_Req_contra, _Resp_co]):
    """The transport under ours (``httpx.HTTPTransport``, a mock)."""

    def handle_request(self, request: _Req_contra) -> _Resp_co: ...


class AsyncInner(Protocol[_Req_contra, _Resp_co]):
    """The async transport under ours."""

    async def handle_async_request(self, request: _Req_contra) -> _Resp_co: ...


# --- shared by sync and async --------------------------------------------------------------------------------


class Ending:
    """Finishes a flow exactly once when a delivered body ends, aborts or is closed; holds the body's deadline.

    ``current_receipt`` is set in the context that ends the body (the consumer's); receipt listeners run in the
    context of the call as it was at delivery, even when an abandoned stream is only closed by the garbage collector.
    """

    __slots__ = ("_context", "_ended", "_engine", "_flow", "_timeout_error", "deadline", "meter")

    def __init__(
        self,
        meter: UsageMeter,
        deliver: Deliver,
        engine: Engine,
        flow: Flow,
        timeout_error: Callable[[str], Exception],
    ) -> None:
        self.meter = meter
        self._engine = engine
        self._flow = flow
        self._timeout_error = timeout_error
        self._ended = False
        self._context = contextvars.copy_context()
        self.deadline = None if deliver.deadline_seconds is None else time.monotonic() + deliver.deadline_seconds

    def timeout(self) -> Exception:
        """The error of a body that ran past its deadline."""
        return self._timeout_error("llm402: the response body ran past its deadline (max_stream_seconds)")

    def _reading(self, aborted: bool, error: str | None) -> StreamEnd:
        meter = self.meter
        aborted = aborted and not meter.done
        report = meter.settlement
        return StreamEnd(
            meter.usage,
            aborted=aborted,
            error=error if aborted else None,
            body=meter.body,
            settlement=(
                decode_settlement({"payment-response": report})
                if report is not None
                else None
                if meter.receipt is None
                else receipt_event_settlement(meter.receipt)
            ),
        )

    def _finish(self, end: StreamEnd) -> None:
        token = delivery_context.set(self._context)
        try:
            if self._engine.advance(self._flow, end) is not None:
                raise RuntimeError("llm402 flow asked for HTTP after delivery")
        finally:
            delivery_context.reset(token)

    def end(self, *, aborted: bool, error: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._finish(self._reading(aborted, error))

    async def aend(self, *, aborted: bool, error: str | None = None) -> None:
        """`end` with the ledger work on a worker thread; it completes even when the caller is being cancelled."""
        if self._ended:
            return
        self._ended = True
        end = self._reading(aborted, error)
        token = delivery_context.set(self._context)
        try:
            if await _advance_async(self._engine, [self._flow], end) is not None:
                raise RuntimeError("llm402 flow asked for HTTP after delivery")
        finally:
            delivery_context.reset(token)


class ReadBody:
    """A body already read, iterated as either stack's streams are."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __iter__(self) -> Iterator[bytes]:
        if self._data:
            yield self._data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._data:
            yield self._data

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _own_timeouts(request: RequestView) -> tuple[Timeouts, dict[str, Any]]:
    """A copy of the request's timeouts, and extensions carrying it: narrowed later without touching the caller's."""
    extensions = dict(request.extensions)
    timeouts: Timeouts = dict(extensions.get("timeout") or {})
    extensions["timeout"] = timeouts
    return timeouts, extensions


def _narrow(timeouts: Timeouts, seconds: float) -> None:
    """Let each read of the body wait at most ``seconds``. Both stacks' connection pools read the ``read`` timeout
    when the body begins, so this holds for a body not begun yet (the headers were read with the caller's)."""
    read = timeouts.get("read")
    timeouts["read"] = seconds if read is None else min(read, seconds)


def _outgoing(
    stack: HttpStack[Req, Resp], request: Req, send: Send, placeholder_auth: str | None
) -> tuple[Req, Timeouts, dict[str, Any] | None]:
    """The request to put on the wire: the caller's headers (minus any payment header they carried, and the
    placeholder API key an SDK insists on sending to a pay-per-call gateway), ours, and the body; the timeouts it
    carries (ours to narrow); and, when the caller's own request goes out, the extensions to give it back afterwards."""
    timeouts, extensions = _own_timeouts(request)
    if send.url is not None:  # a request of llm402's own (top-up, key mint): nothing of the caller's goes along
        return stack.own_request(send, extensions), timeouts, None
    ours = [(name.encode("ascii"), value.encode("ascii")) for name, value in send.headers.items()]
    names = {name.lower() for name, _ in ours}
    in_place = send.body is request.content and names.isdisjoint(_SECRET_HEADER_BYTES)
    skip = (_PAYMENT_HEADER_BYTES if in_place else _DROPPED_ON_REBUILD) | names
    placeholder = None if placeholder_auth is None else placeholder_auth.encode("ascii")
    bare = None if placeholder is None else placeholder.removeprefix(b"Bearer ")  # the Anthropic SDK's x-api-key
    headers = [
        (key, value)
        for key, value in request.headers.raw
        if (lower := key.lower()) not in skip
        and not (lower == b"authorization" and value == placeholder)
        and not (lower == b"x-api-key" and value == bare)
    ]
    if in_place:
        # the common case (first, unpaid send with the caller's body): the caller's request goes out with its headers
        # replaced instead of a new request; nothing secret is added, so a redirect httpx builds from it carries
        # nothing of ours
        headers.extend(ours)
        return request, timeouts, stack.swap(request, headers, extensions)
    # a new request (a payment or key goes along, or the body changed), so the caller's never carries a secret
    if not any(key.lower() == b"host" for key, _ in headers):
        headers.insert(0, (b"Host", request.url.netloc))
    headers.extend(ours)
    headers.append((b"content-length", str(len(send.body)).encode("ascii")))
    return stack.rebuilt_request(request, headers, send.body, extensions), timeouts, None


def _problem(response: ResponseView) -> bool:
    """A 403 with a Problem Details body (an MPP credential refused after payment): read it for the flow."""
    return response.status_code == 403 and "problem+json" in (response.headers.get("content-type") or "")


def _body_seconds(engine: Engine) -> float:
    """How long a body llm402 reads itself may take (`BODY_READ_SECONDS`, or ``max_stream_seconds`` if shorter)."""
    limit = engine.config.max_stream_seconds
    return BODY_READ_SECONDS if limit is None else min(BODY_READ_SECONDS, limit)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """One header's value (repeats joined), without the KeyError a missing one costs ``Headers.get``."""
    return headers[name] if name in headers else None  # noqa: SIM401 (.get pays for a KeyError inside httpx)


def _meter(response: ResponseView, deliver: Deliver, streaming: bool) -> UsageMeter:
    return UsageMeter(
        streaming=streaming,
        content_encoding=_header(response.headers, "content-encoding"),
        strip_usage_event=deliver.strip_usage_event,
    )


def _decoded(response: ResponseView, raw: bytes) -> bytes:
    """The body for parsing: gzip/deflate undone (bounded), whatever the gateway sent despite ``identity``."""
    if (_header(response.headers, "content-encoding") or "").lower() in ("gzip", "deflate", "x-gzip"):
        try:
            # both sides bounded: ``raw`` is at most MAX_CHALLENGE_BYTES plus one chunk, the output at most one more
            return zlib.decompressobj(wbits=47).decompress(raw, MAX_CHALLENGE_BYTES + 1)
        except zlib.error:
            return b""
    return raw


_LATE = "llm402: the gateway's {} body ran past its deadline ({:g} s)"


def _delivered(
    stack: HttpStack[Req, Resp],
    request: Req,
    response: Resp,
    deliver: Deliver,
    ending: Ending,
    consumed: bytes | None,
    asynchronous: bool,
) -> Resp:
    """The response handed to the caller: the gateway's, with our headers added and its body metered. A response
    whose body is still unread is adjusted in place; one whose body was read (by us, or already by the inner
    transport: a mock's ``content=``) is rebuilt around the metered body."""
    if consumed is None and response.is_stream_consumed:
        consumed = response.content
    if consumed is None:
        return stack.adopted(response, request, deliver.headers, ending, asynchronous)
    return stack.rebuilt_response(response, request, deliver.headers, consumed, ending, asynchronous)


# --- sync ------------------------------------------------------------------------------------------------------


class SyncMeteredStream:
    """Mixin body of the sync stream wrapper (combined with the stack's ``SyncByteStream``)."""

    def __init__(self, inner: SyncBody, ending: Ending) -> None:
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


def _read_bounded_sync(
    response: ResponseView, seconds: float, timeouts: Timeouts, timeout_error: Callable[[str], Exception]
) -> bytes:
    """At most MAX_CHALLENGE_BYTES (plus one chunk) of the body, whole within ``seconds``."""
    if response.is_stream_consumed:
        return response.content[: MAX_CHALLENGE_BYTES + 1]
    _narrow(timeouts, seconds)
    deadline = time.monotonic() + seconds
    body = bytearray()
    try:
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > MAX_CHALLENGE_BYTES:
                break
            if time.monotonic() > deadline:
                raise timeout_error(_LATE.format(response.status_code, seconds))
    finally:
        response.close()
    return bytes(body)


def _describe(request: Any, body: bytes) -> CallRequest:
    """What the flow needs to know of the caller's request (its credentials only as a digest)."""
    headers = request.headers
    pay_again = (headers.get(PAY_AGAIN_HEADER) or "").strip().lower() in ("1", "true", "yes")
    return describe_request(
        request.method, str(request.url), headers.get("content-type"), body, headers.get("authorization"), pay_again
    )


def handle_sync(stack: HttpStack[Req, Resp], engine: Engine, inner: SyncInner[Req, Resp], request: Req) -> Resp:
    """Run one call through the engine over a sync inner transport."""
    body = request.read()
    call = _describe(request, body)
    flow = engine.flow(call)
    response: Resp | None = None
    consumed: bytes | None = None
    timeouts: Timeouts = {}
    try:
        effect = engine.advance(flow)
        while True:
            if isinstance(effect, Send):
                if response is not None:
                    response.close()
                try:
                    outgoing, timeouts, theirs = _outgoing(stack, request, effect, engine.placeholder_auth)
                    if effect.url is not None:  # llm402's own request: its answer too is awaited only so long
                        _narrow(timeouts, _body_seconds(engine))
                    try:
                        response = inner.handle_request(outgoing)
                    finally:
                        if theirs is not None:
                            stack.swap(request, None, theirs)
                    consumed = None
                    if response.status_code == 402 or effect.read_body or _problem(response):
                        seconds = _body_seconds(engine)
                        consumed = _read_bounded_sync(response, seconds, timeouts, stack.read_timeout)
                    parsed = _decoded(response, consumed) if consumed is not None else None
                    head = Head(response.status_code, response.headers, parsed)
                except BaseException as exc:
                    # the flow records the failure (also an interrupt) and re-raises it
                    effect = engine.advance(flow, error=exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                effect = engine.advance(flow, head)
            elif isinstance(effect, Answer):
                if response is not None:
                    response.close()
                return stack.local_response(request, effect)
            elif isinstance(effect, Deliver):
                if response is None:
                    raise RuntimeError("llm402 flow delivered before sending")
                if effect.deadline_seconds is not None:
                    _narrow(timeouts, effect.deadline_seconds)
                ending = Ending(_meter(response, effect, call.streaming), effect, engine, flow, stack.read_timeout)
                return _delivered(stack, request, response, effect, ending, consumed, asynchronous=False)
            else:
                raise RuntimeError("llm402 flow ended without an answer")
    except BaseException:
        if response is not None:  # never handed over: give its connection back
            response.close()
        raise


# --- async -----------------------------------------------------------------------------------------------------


async def _off_loop(fn: Callable[[], T]) -> T:
    """``fn()`` on a worker thread, in a copy of the caller's context; the context variables it changed
    (``current_receipt``) are then set in the caller's context too, as if it had run here."""
    context = contextvars.copy_context()
    try:
        return await _in_thread(partial(context.run, fn))
    finally:  # also when it raised: a flow that records a failure publishes its receipt, then re-raises
        for var, value in context.items():
            if var.get(_UNSET) is not value:
                var.set(value)


async def _in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a worker thread, always run to its end: a cancellation of the caller, even one already pending,
    is delivered once it has finished, so ledger work is never skipped, left half-way, or its result lost.

    asyncio: the loop's default executor (a task's cancellation would abandon ``anyio.to_thread`` half-way); trio and
    the rest: ``anyio.to_thread`` in a shielded scope."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        from anyio import CancelScope, to_thread  # imported on first use: asyncio programs never load it

        with CancelScope(shield=True):
            result = await to_thread.run_sync(fn)
        return result  # noqa: RET504 (outside the scope: mypy reads its __exit__ as able to swallow errors)
    work = loop.run_in_executor(None, fn)  # submitted now, before any cancellation can be delivered
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((work,))
        raise


_UNSET = object()


async def _step(engine: Engine, flow: list[Flow], work: Callable[[], IOEffect | None]) -> IOEffect | None:
    """``work`` (steps of the flow, and the ledger and signer effects they ask for) on a worker thread.

    ``flow`` holds the call's flow (``work`` puts it there when it makes it). A caller cancelled meanwhile waits for
    the work (the thread is not abandoned) and then still ends the flow where it stopped, so a reservation made there
    is never left without a receipt."""
    reached: list[IOEffect | None] = []

    def run() -> IOEffect | None:
        reached.append(work())
        return reached[0]

    try:
        return await _off_loop(run)
    except BaseException as exc:
        stopped = reached[0] if reached else None
        if stopped is not None and flow and not isinstance(exc, GeneratorExit):
            await _off_loop(partial(_abandon, engine, flow[0], stopped, exc))
        raise


def _begin(engine: Engine, call: CallRequest, flow: list[Flow]) -> IOEffect | None:
    """A new flow (under the live policy, which a policy source may have to read) and its first steps."""
    flow.append(engine.flow(call))
    return engine.advance(flow[0])


def _abandon(engine: Engine, flow: Flow, effect: IOEffect, exc: BaseException) -> None:
    """End a flow whose caller went away (``exc``) at ``effect``: the request never sent, the answer never handed
    over (an `Answer` comes after the flow's receipt: nothing is left to do)."""
    if isinstance(effect, Answer):
        return
    try:
        if isinstance(effect, Deliver):
            engine.advance(flow, StreamEnd(None, aborted=True, error=type(exc).__name__))
        else:
            engine.advance(flow, error=exc)
    except BaseException as raised:  # the flow records ``exc``, then raises it again
        if raised is not exc:
            raise


async def _resume(engine: Engine, flow: Flow, head: Head) -> IOEffect | None:
    """`Engine.advance` with a response's head (see `_advance_async`)."""
    return await _advance_async(engine, [flow], head)


async def _advance_async(engine: Engine, flows: list[Flow], value: Any = None) -> IOEffect | None:
    """`Engine.advance` for an async caller: the effects that cannot block (bookkeeping, a memory ledger, a local
    signer, a receipt nobody listens to) are performed on the loop, so the common call spends no thread hop; from
    the first effect that may block (`Engine.blocks`), the rest of the step runs on a worker thread."""
    flow = flows[0]
    effect = engine.run_until(flow, value, pause=engine.blocks)
    if effect is None or isinstance(effect, _HTTP_EFFECTS):
        return effect
    return await _step(engine, flows, partial(_perform_and_advance, engine, flow, effect))


_HTTP_EFFECTS = (Send, Deliver, Answer)


def _perform_and_advance(engine: Engine, flow: Flow, effect: Effect) -> IOEffect | None:
    try:
        value = engine.perform(effect)
    except Exception as exc:  # as `Engine.advance`: the flow decides what a failed effect means
        return engine.advance(flow, error=exc)
    return engine.advance(flow, value)


class AsyncMeteredStream:
    """Mixin body of the async stream wrapper (combined with the stack's ``AsyncByteStream``)."""

    def __init__(self, inner: AsyncBody, ending: Ending) -> None:
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
            await self._ending.aend(aborted=True, error=type(exc).__name__)
            raise
        await self._ending.aend(aborted=False)

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._ending.aend(aborted=True, error="closed_early")


async def _read_bounded_async(
    response: ResponseView, seconds: float, timeouts: Timeouts, timeout_error: Callable[[str], Exception]
) -> bytes:
    """At most MAX_CHALLENGE_BYTES (plus one chunk) of the body, whole within ``seconds``."""
    if response.is_stream_consumed:
        return response.content[: MAX_CHALLENGE_BYTES + 1]
    _narrow(timeouts, seconds)
    deadline = time.monotonic() + seconds
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > MAX_CHALLENGE_BYTES:
                break
            if time.monotonic() > deadline:
                raise timeout_error(_LATE.format(response.status_code, seconds))
    finally:
        await response.aclose()
    return bytes(body)


async def handle_async(stack: HttpStack[Req, Resp], engine: Engine, inner: AsyncInner[Req, Resp], request: Req) -> Resp:
    """Run one call through the engine over an async inner transport; the engine's work runs off the event loop."""
    body = await request.aread()
    call = _describe(request, body)
    started: list[Flow] = []
    response: Resp | None = None
    consumed: bytes | None = None
    timeouts: Timeouts = {}
    try:
        if engine.starts_blocking:
            effect = await _step(engine, started, partial(_begin, engine, call, started))
        else:
            started.append(engine.flow(call))
            effect = await _advance_async(engine, started)
        flow = started[0]
        while True:
            if isinstance(effect, Send):
                if response is not None:
                    await response.aclose()
                try:
                    outgoing, timeouts, theirs = _outgoing(stack, request, effect, engine.placeholder_auth)
                    if effect.url is not None:  # llm402's own request: its answer too is awaited only so long
                        _narrow(timeouts, _body_seconds(engine))
                    try:
                        response = await inner.handle_async_request(outgoing)
                    finally:
                        if theirs is not None:
                            stack.swap(request, None, theirs)
                    consumed = None
                    if response.status_code == 402 or effect.read_body or _problem(response):
                        seconds = _body_seconds(engine)
                        consumed = await _read_bounded_async(response, seconds, timeouts, stack.read_timeout)
                    parsed = _decoded(response, consumed) if consumed is not None else None
                    head = Head(response.status_code, response.headers, parsed)
                except BaseException as exc:
                    if isinstance(exc, GeneratorExit):
                        raise
                    # the flow records the failure (also a cancellation: the caller's own timeout) and re-raises it
                    effect = await _step(engine, started, partial(engine.advance, flow, None, exc))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                effect = await _resume(engine, flow, head)
            elif isinstance(effect, Answer):
                if response is not None:
                    await response.aclose()
                return stack.local_response(request, effect)
            elif isinstance(effect, Deliver):
                if response is None:
                    raise RuntimeError("llm402 flow delivered before sending")
                if effect.deadline_seconds is not None:
                    _narrow(timeouts, effect.deadline_seconds)
                ending = Ending(_meter(response, effect, call.streaming), effect, engine, flow, stack.read_timeout)
                return _delivered(stack, request, response, effect, ending, consumed, asynchronous=True)
            else:
                raise RuntimeError("llm402 flow ended without an answer")
    except BaseException:
        if response is not None:  # never handed over: give its connection back
            await response.aclose()
        raise


# --- the httpx stack -------------------------------------------------------------------------------------------


def default_limits() -> httpx.Limits:
    """Connection limits for agent workloads (many concurrent calls to one gateway)."""
    return httpx.Limits(max_connections=1000, max_keepalive_connections=100)


class ModuleStack:
    """`HttpStack` over an httpx-shaped module: httpx itself, or httpx2 (the same API under another name). One
    implementation serves both; each stack's instance is typed as its own `HttpStack`."""

    def __init__(self, module: Any) -> None:
        self._http = module

        class SyncStream(SyncMeteredStream, module.SyncByteStream):  # type: ignore[misc]
            pass

        class AsyncStream(AsyncMeteredStream, module.AsyncByteStream):  # type: ignore[misc]
            pass

        self._sync_stream: type[Any] = SyncStream
        self._async_stream: type[Any] = AsyncStream

    def own_request(self, send: Send, extensions: dict[str, Any]) -> Any:
        headers = list(send.headers.items())
        return self._http.Request(
            send.method or "POST", send.url or "", headers=headers, content=send.body, extensions=extensions
        )

    def rebuilt_request(self, request: Any, headers: RawHeaders, body: bytes, extensions: dict[str, Any]) -> Any:
        http = self._http
        outgoing = http.Request(
            request.method, request.url, headers=headers, stream=http.ByteStream(body), extensions=extensions
        )
        outgoing.read()
        return outgoing

    def swap(self, request: Any, headers: RawHeaders | None, extensions: dict[str, Any]) -> dict[str, Any]:
        if headers is not None:
            request.headers = self._http.Headers(headers)
        theirs: dict[str, Any] = request.extensions
        request.extensions = extensions
        return theirs

    def local_response(self, request: Any, answer: Answer) -> Any:
        return self._http.Response(
            answer.status, headers=list(answer.headers.items()), content=answer.body, request=request
        )

    def adopted(self, response: Any, request: Any, extra: Mapping[str, str], ending: Ending, asynchronous: bool) -> Any:
        stream = response.stream
        if asynchronous and isinstance(stream, self._http.AsyncByteStream):
            response.stream = self._async_stream(stream, ending)
        elif not asynchronous and isinstance(stream, self._http.SyncByteStream):
            response.stream = self._sync_stream(stream, ending)
        else:
            raise RuntimeError(f"the inner transport answered with a {type(stream).__name__} body")
        headers = response.headers
        for name, value in extra.items():
            headers[name] = value
        response.request = request
        return response

    def rebuilt_response(
        self, response: Any, request: Any, extra: Mapping[str, str], body: bytes, ending: Ending, asynchronous: bool
    ) -> Any:
        headers = self._http.Headers(response.headers)
        for name, value in extra.items():
            headers[name] = value
        stream = (self._async_stream if asynchronous else self._sync_stream)(ReadBody(body), ending)
        return self._http.Response(
            response.status_code, headers=headers, stream=stream, extensions=response.extensions, request=request
        )

    def read_timeout(self, message: str) -> Exception:
        error: Exception = self._http.ReadTimeout(message)
        return error


HTTPX: HttpStack[httpx.Request, httpx.Response] = ModuleStack(httpx)


class PaymentTransport(httpx.BaseTransport):
    """An ``httpx`` transport that pays, meters and budgets every call through an `Engine`."""

    def __init__(self, engine: Engine, inner: httpx.BaseTransport | None = None) -> None:
        self.engine = engine
        self._inner = inner or httpx.HTTPTransport(limits=default_limits())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return handle_sync(HTTPX, self.engine, self._inner, request)

    def close(self) -> None:
        self._inner.close()


class AsyncPaymentTransport(httpx.AsyncBaseTransport):
    """The async twin of `PaymentTransport`."""

    def __init__(self, engine: Engine, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.engine = engine
        self._inner = inner or httpx.AsyncHTTPTransport(limits=default_limits())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await handle_async(HTTPX, self.engine, self._inner, request)

    async def aclose(self) -> None:
        await self._inner.aclose()
