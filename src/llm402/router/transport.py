"""The router's httpx transports: one logical call, many routes, each through its gateway's `PaymentTransport`.

They sit *above* the paying transports, so every attempt is a complete, paid, metered, receipted call of the core,
and below the client, so the OpenAI SDK, LangChain and LlamaIndex use them unchanged. The sync and async twins differ
only in ``await``; what to do with each outcome is decided by the `CallPlan`.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception

from ..receipts import Receipt
from .plan import ROUTE_HEADER, CallPlan, Failure, RoutesFailed, Verdict
from .rules import Admission, wait_retry_after

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger("llm402.router")
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

    def close(self) -> Receipt | None:
        """Stop collecting; the attempt's call receipt (a credit top-up inside the call has its own)."""
        self._open = False
        calls = [r for r in self._receipts if r.payment is None or r.payment.kind != "topup"]
        return calls[-1] if calls else None


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


def _retryable(error: BaseException) -> bool:
    return isinstance(error, RoutesFailed) and error.retryable


def _log_wait(state: RetryCallState) -> None:
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.info("llm402 router: no route answered (pass %d); next pass in %.2fs", state.attempt_number, wait)


def _retrying_args(router: Router) -> dict[str, Any]:
    return {
        "stop": router.retry.stop,
        "wait": wait_retry_after(router.retry.wait),
        "retry": retry_if_exception(_retryable),
        "before_sleep": _log_wait,
        "reraise": True,
    }


def _wire(request: httpx.Request, plan: CallPlan, index: int) -> httpx.Request:
    out = plan.outgoing(index)
    return httpx.Request(
        request.method, out.url, headers=list(out.headers), content=out.body, extensions=request.extensions
    )


def _given_up(plan: CallPlan, request: httpx.Request) -> httpx.Response:
    """No route answered: the last failure as it came (with ``x-should-retry: false``), or the router's own 502/503.
    The caller of `give_up` re-raises a last exception instead when no payment went out."""
    last = plan.last_failure
    if isinstance(last, Failure):
        return httpx.Response(
            last.status, headers=plan.final_headers(last.headers, None), content=last.body, request=request
        )
    reasons = sorted({str(a["error"]) for a in plan.attempts if a.get("error")})
    tried = any(not a.get("skipped") for a in plan.attempts)
    body = {
        "error": {
            "code": "no_route_available",
            "type": "llm402_router",
            "message": "no route answered: " + (", ".join(reasons) or "no route fits the request"),
            "routes": [a["route"] for a in plan.attempts],
        }
    }
    return httpx.Response(
        502 if tried else 503,
        headers=[("content-type", "application/json"), ("x-should-retry", "false")],
        content=json.dumps(body).encode(),
        request=request,
    )


def _delivered(
    plan: CallPlan, index: int, response: httpx.Response, stream: Any, request: httpx.Request
) -> httpx.Response:
    headers = httpx.Headers(response.headers)
    headers[ROUTE_HEADER] = plan.router.routes[index].name
    return httpx.Response(
        response.status_code, headers=headers, stream=stream, extensions=response.extensions, request=request
    )


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
        plan = CallPlan(self.router, request.method, str(request.url), request.headers.multi_items(), body)
        try:
            for attempt in Retrying(sleep=self.router.sleep, **_retrying_args(self.router)):
                with attempt:
                    return self._pass(plan, request)
        except RoutesFailed:
            pass
        return self._give_up(plan, request)

    def _give_up(self, plan: CallPlan, request: httpx.Request) -> httpx.Response:
        self.router.publish(plan.finish(None, None))
        last = plan.last_failure
        if isinstance(last, BaseException) and not plan.paid:
            raise last
        return _given_up(plan, request)

    def _pass(self, plan: CallPlan, request: httpx.Request) -> httpx.Response:
        for index in plan.candidates():
            admission = plan.admit(index)
            if admission is None:
                continue
            response = self._attempt(plan, index, admission, request)
            if response is not None:
                return response
        raise plan.pass_failed()

    def _attempt(
        self, plan: CallPlan, index: int, admission: Admission | None, request: httpx.Request, resend: bool = False
    ) -> httpx.Response | None:
        box = _open_attempt()
        started = time.perf_counter()
        try:
            response = self._transports[index].handle_request(_wire(request, plan, index))
        except httpx.TransportError as exc:
            judged = plan.judge(
                index, admission, receipt=box.close(), latency_ms=_since(started), error=exc, resend=resend
            )
        else:
            status = response.status_code
            if 200 <= status < 300:
                try:
                    first, rest = _peek(response)
                except httpx.TransportError as exc:
                    response.close()
                    judged = plan.judge(
                        index,
                        admission,
                        receipt=box.close(),
                        latency_ms=_since(started),
                        status=status,
                        error=exc,
                        resend=resend,
                    )
                else:
                    plan.answered(index, admission, started)

                    def done() -> None:
                        self.router.publish(plan.finish(index, box.close(), resend=resend))

                    stream = _RoutedStream(first, rest, response.stream, done)
                    return _delivered(plan, index, response, stream, request)
            else:
                content = _read(response)  # closing it ends the core's flow: its receipt is published
                judged_receipt = box.close()
                judged = plan.judge(
                    index,
                    admission,
                    receipt=judged_receipt,
                    latency_ms=_since(started),
                    status=status,
                    headers=response.headers,
                    body=content,
                    resend=resend,
                )
                if judged.verdict is Verdict.FINAL:
                    self.router.publish(plan.finish(index, judged_receipt, recorded=True))
                    headers = plan.final_headers(tuple(response.headers.multi_items()), index)
                    return httpx.Response(status, headers=headers, content=content, request=request)
        if judged.verdict is Verdict.RESEND:
            log.info(
                "llm402 router: the answer after a payment on %s was lost; re-sending the same payment once",
                plan.router.routes[index].name,
            )
            return self._attempt(plan, index, None, request, resend=True)
        return None

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
        plan = CallPlan(self.router, request.method, str(request.url), request.headers.multi_items(), body)
        try:
            async for attempt in AsyncRetrying(sleep=self.router.async_sleep, **_retrying_args(self.router)):
                with attempt:
                    return await self._pass(plan, request)
        except RoutesFailed:
            pass
        return self._give_up(plan, request)

    def _give_up(self, plan: CallPlan, request: httpx.Request) -> httpx.Response:
        self.router.publish(plan.finish(None, None))
        last = plan.last_failure
        if isinstance(last, BaseException) and not plan.paid:
            raise last
        return _given_up(plan, request)

    async def _pass(self, plan: CallPlan, request: httpx.Request) -> httpx.Response:
        for index in plan.candidates():
            admission = plan.admit(index)
            if admission is None:
                continue
            response = await self._attempt(plan, index, admission, request)
            if response is not None:
                return response
        raise plan.pass_failed()

    async def _attempt(
        self, plan: CallPlan, index: int, admission: Admission | None, request: httpx.Request, resend: bool = False
    ) -> httpx.Response | None:
        box = _open_attempt()
        started = time.perf_counter()
        try:
            response = await self._transports[index].handle_async_request(_wire(request, plan, index))
        except httpx.TransportError as exc:
            judged = plan.judge(
                index, admission, receipt=box.close(), latency_ms=_since(started), error=exc, resend=resend
            )
        else:
            status = response.status_code
            if 200 <= status < 300:
                try:
                    first, rest = await _apeek(response)
                except httpx.TransportError as exc:
                    await response.aclose()
                    judged = plan.judge(
                        index,
                        admission,
                        receipt=box.close(),
                        latency_ms=_since(started),
                        status=status,
                        error=exc,
                        resend=resend,
                    )
                else:
                    plan.answered(index, admission, started)

                    def done() -> None:
                        self.router.publish(plan.finish(index, box.close(), resend=resend))

                    stream = _AsyncRoutedStream(first, rest, response.stream, done)
                    return _delivered(plan, index, response, stream, request)
            else:
                content = await _aread(response)
                judged_receipt = box.close()
                judged = plan.judge(
                    index,
                    admission,
                    receipt=judged_receipt,
                    latency_ms=_since(started),
                    status=status,
                    headers=response.headers,
                    body=content,
                    resend=resend,
                )
                if judged.verdict is Verdict.FINAL:
                    self.router.publish(plan.finish(index, judged_receipt, recorded=True))
                    headers = plan.final_headers(tuple(response.headers.multi_items()), index)
                    return httpx.Response(status, headers=headers, content=content, request=request)
        if judged.verdict is Verdict.RESEND:
            log.info(
                "llm402 router: the answer after a payment on %s was lost; re-sending the same payment once",
                plan.router.routes[index].name,
            )
            return await self._attempt(plan, index, None, request, resend=True)
        return None

    async def aclose(self) -> None:
        for transport in {id(t): t for t in self._transports}.values():
            await transport.aclose()
