"""The router's httpx transports: one logical call, many routes, each through its gateway's `PaymentTransport`.

They sit *above* the paying transports, so every attempt is a complete, paid, metered, receipted call of the core,
and below the client, so the OpenAI SDK, LangChain and LlamaIndex use them unchanged. They are drivers of the
`fallback_flow`: they send, peek at a first chunk, read a failure and sleep when it says so; every decision is the
flow's. The sync and async twins differ only in ``await``.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from ..receipts import Receipt
from .flow import GiveBack, HandOver, Reraise, Try, Wait, fallback_flow
from .plan import ROUTE_HEADER, CallPlan, Outcome, is_answer

if TYPE_CHECKING:
    from .router import Router

MAX_ERROR_BODY = 64 * 1024
"""How much of a failed attempt's body is read (to judge it, and to give it back if no route answers)."""


class AttemptReceipts:
    """Where the core's receipt for one attempt lands.

    Each attempt opens one in a context variable; a listener on every route's engine drops the receipts it publishes
    into the one open in the publishing context. The core finishes a delivered body in the caller's context *as it
    was at delivery*, so this finds the attempt even when the body ends much later, in another task, or under the
    garbage collector; a closed one takes nothing more, so a stale one left in a context cannot catch other calls.
    """

    __slots__ = ("_open", "_receipts")

    def __init__(self) -> None:
        self._receipts: list[Receipt] = []
        self._open = True

    def add(self, receipt: Receipt) -> None:
        if self._open:
            self._receipts.append(receipt)

    def finished(self) -> Receipt | None:
        """The attempt's call receipt if the core has finished the call already (a credit top-up inside the call has
        its own receipt, left out); the box stays open."""
        calls = [r for r in self._receipts if r.payment is None or r.payment.kind != "topup"]
        return calls[-1] if calls else None

    def close(self) -> Receipt | None:
        """Stop collecting; the attempt's call receipt."""
        self._open = False
        return self.finished()


_attempt: contextvars.ContextVar[AttemptReceipts | None] = contextvars.ContextVar("llm402_router_attempt", default=None)


def collect_receipt(receipt: Receipt) -> None:
    """The engine listener behind `AttemptReceipts` (registered once per engine; idle outside router attempts)."""
    box = _attempt.get()
    if box is not None:
        box.add(receipt)


def _open_attempt() -> AttemptReceipts:
    box = AttemptReceipts()
    _attempt.set(box)
    return box


def _since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _plan(router: Router, request: httpx.Request, body: bytes) -> CallPlan:
    return CallPlan(router, request.method, str(request.url), request.headers.multi_items(), body)


def _wire(request: httpx.Request, plan: CallPlan, index: int) -> httpx.Request:
    out = plan.outgoing(index)
    return httpx.Request(
        request.method, out.url, headers=list(out.headers), content=out.body, extensions=request.extensions
    )


def _failed(started: float, box: AttemptReceipts, **fields: Any) -> Outcome:
    """The outcome of an attempt that ended without an answer (its receipt is in: the response is closed)."""
    return Outcome(started, _since(started), receipt=box.close(), **fields)


@dataclass(frozen=True, slots=True)
class _Peeked:
    """A 2xx tried on a route, its first chunk read: what a `HandOver` hands over."""

    response: httpx.Response
    first: bytes
    rest: Any  # the rest of the body: an iterator (sync) or an async iterator
    box: AttemptReceipts


def _hand_over(
    router: Router, plan: CallPlan, action: HandOver, peeked: _Peeked | None, stream_type: Any, request: httpx.Request
) -> httpx.Response:
    """The answering route's response, its body unbuffered; its end publishes the router receipt, right after the
    core has published the attempt's."""
    if peeked is None:
        raise RuntimeError("llm402 router: a hand-over without a response")

    def done() -> None:
        router.publish(plan.finish(action.index, peeked.box.close(), resend=action.resend))

    response = peeked.response
    headers = httpx.Headers(response.headers)
    headers[ROUTE_HEADER] = router.routes[action.index].name
    stream = stream_type(peeked.first, peeked.rest, response.stream, done)
    return httpx.Response(
        response.status_code, headers=headers, stream=stream, extensions=response.extensions, request=request
    )


def _conclude(router: Router, action: GiveBack | Reraise, request: httpx.Request) -> httpx.Response:
    """The router's last word: publish the router receipt, then answer or raise."""
    router.publish(action.receipt)
    if isinstance(action, Reraise):
        raise action.error
    return httpx.Response(action.status, headers=list(action.headers), content=action.body, request=request)


# --- sync ------------------------------------------------------------------------------------------------------


class _RoutedStream(httpx.SyncByteStream):
    """The answering route's body: the chunk the router peeked at, then the rest, unbuffered. Its end (done, cut,
    or closed early) publishes the router receipt, right after the core has published the attempt's."""

    def __init__(self, first: bytes, rest: Iterator[bytes], inner: Any, done: Callable[[], None]) -> None:
        self._first = first
        self._rest = rest
        self._inner = inner
        self._done = done
        self._ended = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._first:
                yield self._first
            yield from self._rest
        except GeneratorExit:
            close = getattr(self._rest, "close", None)
            if close is not None:
                close()
            self._end()
            raise
        except BaseException:
            self._end()
            raise
        self._end()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._done()


def _peek(response: httpx.Response) -> tuple[bytes, Iterator[bytes]]:
    rest = iter(response.stream)  # type: ignore[arg-type]
    for chunk in rest:
        if chunk:
            return chunk, rest
    return b"", rest


def _read(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        for chunk in response.stream:  # type: ignore[union-attr]
            body += chunk
            if len(body) > MAX_ERROR_BODY:
                break
    except httpx.TransportError:
        pass
    finally:
        response.close()
    return bytes(body[:MAX_ERROR_BODY])


class RouterTransport(httpx.BaseTransport):
    """Fallback, retries and circuit breaking over per-route `PaymentTransport`s (``transports[i]`` serves route i)."""

    def __init__(self, router: Router, transports: Sequence[httpx.BaseTransport]) -> None:
        self.router = router
        self._transports = tuple(transports)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        if self.router.wants_catalog(body):
            self.router.ensure_catalog()
        plan = _plan(self.router, request, body)
        flow = fallback_flow(plan)
        action = next(flow)
        peeked: _Peeked | None = None
        while isinstance(action, Try | Wait):
            if isinstance(action, Wait):
                self.router.sleep(action.seconds)
                action = flow.send(None)
            else:
                outcome, peeked = self._try(plan, action, request)
                action = flow.send(outcome)
        if isinstance(action, HandOver):
            return _hand_over(self.router, plan, action, peeked, _RoutedStream, request)
        return _conclude(self.router, action, request)

    def _try(self, plan: CallPlan, action: Try, request: httpx.Request) -> tuple[Outcome, _Peeked | None]:
        box = _open_attempt()
        started = time.perf_counter()
        try:
            response = self._transports[action.index].handle_request(_wire(request, plan, action.index))
        except httpx.TransportError as exc:
            return _failed(started, box, error=exc), None
        local = box.finished()  # the core finished the call before any body was read: it answered locally
        status = response.status_code
        if not is_answer(status):
            content = _read(response)  # closing it ends the core's flow: its receipt is published
            return _failed(started, box, status=status, headers=response.headers, body=content, local=local), None
        try:
            first, rest = _peek(response)
        except httpx.TransportError as exc:
            response.close()
            return _failed(started, box, status=status, error=exc), None
        return Outcome(started, _since(started), status), _Peeked(response, first, rest, box)

    def close(self) -> None:
        for transport in {id(t): t for t in self._transports}.values():
            transport.close()


# --- async -----------------------------------------------------------------------------------------------------


class _AsyncRoutedStream(httpx.AsyncByteStream):
    """The async twin of `_RoutedStream`."""

    def __init__(self, first: bytes, rest: AsyncIterator[bytes], inner: Any, done: Callable[[], None]) -> None:
        self._first = first
        self._rest = rest
        self._inner = inner
        self._done = done
        self._ended = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            if self._first:
                yield self._first
            async for chunk in self._rest:
                yield chunk
        except GeneratorExit:
            aclose = getattr(self._rest, "aclose", None)
            if aclose is not None:
                await aclose()
            self._end()
            raise
        except BaseException:
            self._end()
            raise
        self._end()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._done()


async def _apeek(response: httpx.Response) -> tuple[bytes, AsyncIterator[bytes]]:
    rest = response.stream.__aiter__()  # type: ignore[union-attr]
    async for chunk in rest:
        if chunk:
            return chunk, rest
    return b"", rest


async def _aread(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        async for chunk in response.stream:  # type: ignore[union-attr]
            body += chunk
            if len(body) > MAX_ERROR_BODY:
                break
    except httpx.TransportError:
        pass
    finally:
        await response.aclose()
    return bytes(body[:MAX_ERROR_BODY])


class AsyncRouterTransport(httpx.AsyncBaseTransport):
    """The async twin of `RouterTransport`."""

    def __init__(self, router: Router, transports: Sequence[httpx.AsyncBaseTransport]) -> None:
        self.router = router
        self._transports = tuple(transports)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        if self.router.wants_catalog(body):
            await asyncio.to_thread(self.router.ensure_catalog)
        plan = _plan(self.router, request, body)
        flow = fallback_flow(plan)
        action = next(flow)
        peeked: _Peeked | None = None
        while isinstance(action, Try | Wait):
            if isinstance(action, Wait):
                await self.router.async_sleep(action.seconds)
                action = flow.send(None)
            else:
                outcome, peeked = await self._try(plan, action, request)
                action = flow.send(outcome)
        if isinstance(action, HandOver):
            return _hand_over(self.router, plan, action, peeked, _AsyncRoutedStream, request)
        return _conclude(self.router, action, request)

    async def _try(self, plan: CallPlan, action: Try, request: httpx.Request) -> tuple[Outcome, _Peeked | None]:
        box = _open_attempt()
        started = time.perf_counter()
        try:
            response = await self._transports[action.index].handle_async_request(_wire(request, plan, action.index))
        except httpx.TransportError as exc:
            return _failed(started, box, error=exc), None
        local = box.finished()
        status = response.status_code
        if not is_answer(status):
            content = await _aread(response)
            return _failed(started, box, status=status, headers=response.headers, body=content, local=local), None
        try:
            first, rest = await _apeek(response)
        except httpx.TransportError as exc:
            await response.aclose()
            return _failed(started, box, status=status, error=exc), None
        return Outcome(started, _since(started), status), _Peeked(response, first, rest, box)

    async def aclose(self) -> None:
        for transport in {id(t): t for t in self._transports}.values():
            await transport.aclose()
