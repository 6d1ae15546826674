"""The sandbox's HTTP surface (Starlette): the Token Kiosk API, per-call x402 in three dialects, sandbox tools.

Mounts: the API lives at ``/v1/...`` (402s in ``SandboxConfig.default_dialect``) and again under ``/x402v2/v1``,
``/x402v1/v1`` and ``/kiosk/v1`` (402s in that dialect). ``POST /v1/topup`` always speaks the Token Kiosk body.
A paid endpoint runs in credit mode when the request has an ``Authorization`` header (an ``sk-`` key drawing on
the wallet's credit) and per-call x402 otherwise.

Order of a paid x402 call: faults (delay, status) -> validate (400 before any 402) -> 402 when unpaid -> decode and
verify the payment -> generate (a failure answers 502 and nothing is settled) -> settle -> answer; an exact stream is
settled before its first byte, so the settlement header leaves with the response headers. Under ``/upto/v1`` the 402
also offers x402 ``upto``: an upto payment authorizes a ceiling and is settled to the metered cost after the answer
is produced; a stream settles after its content and reports it in a ``: payment-response <base64>`` SSE comment
just before ``[DONE]`` (a client going away settles what was delivered). Streams without ``[DONE]`` carry it just
before their last event: the Responses API's ``response.completed`` (after all content; the usage is in that event)
and Anthropic's ``message_stop`` (after ``message_delta`` and its usage).

Paid endpoints, on every mount: ``/chat/completions``, ``/responses`` (the OpenAI Responses API), ``/messages``
(Anthropic Messages; its SDK's ``base_url`` is the mount without ``/v1``), ``/embeddings``, ``/images/generations``
and Gemini's ``/models/{model}:generateContent`` (see `apis` for the Responses API and Messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from . import apis
from . import models as m
from .auth import SiweContext, Unauthorized, hash_key, key_owner, new_api_key, verify_siwe
from .config import Dialect, Mode, ModelSpec, SandboxConfig
from .dialects import CHANGED_PAYEE, Quote, challenge, payment_header, settlement_headers
from .facilitator import Facilitator, Payment, decode_payment, decode_upto, peek_payer_nonce
from .faults import FaultBook, Faults, FaultSpecError
from .permit2 import UptoPayment
from .store import Store
from .upstream import Upstream, UpstreamFailure, UsageBox
from .wire import Refusal

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
KEEPALIVE_SECONDS = 0.05
MAX_FAUCET = 10**15
_STREAM_CUT: contextvars.ContextVar[bool] = contextvars.ContextVar("llm402_sandbox_stream_cut", default=False)

STATUS_CODES = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    402: "INSUFFICIENT_BALANCE",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    502: "UPSTREAM_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


class ApiError(Exception):
    """An error answered in the Token Kiosk shape ``{"error": CODE, "message": ...}``."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or STATUS_CODES.get(status, "INTERNAL_ERROR")
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The Token Kiosk error body."""
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status, headers=dict(headers or {}))


# --- state --------------------------------------------------------------------------------------------------------


class RateLimiter:
    """Per-wallet sliding windows: at most ``per_minute`` requests in any 60 s and ``per_day`` in any 24 h."""

    def __init__(self, per_minute: int, per_day: int) -> None:
        self.windows = ((60.0, per_minute), (86_400.0, per_day))
        self._hits: dict[str, tuple[deque[float], deque[float]]] = {}

    def hit(self, wallet: str, now: float | None = None) -> int | None:
        """Count a request; answers the Retry-After seconds when over a limit (the request is then not counted)."""
        now = time.monotonic() if now is None else now
        queues = self._hits.setdefault(wallet, (deque(), deque()))
        for (span, limit), hits in zip(self.windows, queues, strict=True):
            while hits and hits[0] <= now - span:
                hits.popleft()
            if len(hits) >= limit:
                return max(1, math.ceil(hits[-limit] + span - now)) if limit > 0 else int(span)
        for hits in queues:
            hits.append(now)
        return None


@dataclass
class SandboxState:
    """Everything the routes share."""

    config: SandboxConfig
    store: Store
    facilitator: Facilitator
    faults: FaultBook
    limiter: RateLimiter
    upstream: Upstream | None


def _state(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


# --- small helpers ------------------------------------------------------------------------------------------------


async def _json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None


def _address(value: Any, what: str = "address") -> str:
    if not isinstance(value, str) or not _ADDRESS.match(value):
        raise ApiError(400, f"{what} must be a 0x-prefixed 20-byte hex address")
    return value


def _checksum(address: str) -> str:
    from eth_utils.address import to_checksum_address

    return str(to_checksum_address(address))


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else header.strip()


def _siwe_context(request: Request, prefix: str) -> SiweContext:
    return SiweContext(host=request.headers.get("host", ""), scheme=request.url.scheme, prefix=prefix)


def _padded(body: Mapping[str, Any], size: int | None) -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode()
    if size is None or size <= len(raw):
        return raw
    padded = {**body, "sandbox_padding": ""}
    base = len(json.dumps(padded, separators=(",", ":")).encode())
    padded["sandbox_padding"] = "x" * max(0, size - base)
    return json.dumps(padded, separators=(",", ":")).encode()


def json_answer(
    body: Mapping[str, Any], headers: Mapping[str, str] | None = None, oversized: int | None = None
) -> Response:
    """A 200 JSON answer (padded to ``oversized`` bytes when that fault is on)."""
    return Response(_padded(body, oversized), 200, dict(headers or {}), media_type="application/json")


# --- streaming ----------------------------------------------------------------------------------------------------


class StreamCut(Exception):
    """Raised inside a stream to drop the connection (the ``stream_cut`` fault)."""


class _CutFilter(logging.Filter):
    """Hides uvicorn's complaint about the response the ``stream_cut`` fault leaves unfinished on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_STREAM_CUT.get() and "without completing response" in record.getMessage())


def _install_cut_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _CutFilter) for f in logger.filters):
        logger.addFilter(_CutFilter())


@dataclass
class Meter:
    """What a stream has delivered so far."""

    tokens: int = 0
    completed: bool = False


class SSEResponse(StreamingResponse):
    """Server-sent events written one by one as the generator yields them (never buffered).

    The client going away cancels the generator; ``on_close(meter)`` runs exactly once in every case. A `StreamCut`
    from the generator ends the response without its terminating chunk, so the client sees a dropped connection.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: Mapping[str, str],
        meter: Meter,
        on_close: Callable[[Meter], None] | None = None,
    ) -> None:
        super().__init__(events, 200, {"cache-control": "no-cache", "x-accel-buffering": "no", **headers})
        self._events = events
        self._meter = meter
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cut = False
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                try:
                    async for chunk in self._events:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except StreamCut:
                    cut = True
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    self._meter.completed = True
                group.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception):
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
            if self._on_close is not None:
                self._on_close(self._meter)
        if cut:
            _STREAM_CUT.set(True)


async def _paced(
    events: AsyncIterator[m.StreamEvent], faults: Faults, delay: float, meter: Meter
) -> AsyncIterator[bytes]:
    """Apply the chunk delay, ``stream_cut`` and ``stream_forever`` to a stream; count what went out."""
    sent_content = 0
    first = True
    async for event in events:
        if faults.stream_cut is not None and (sent_content >= faults.stream_cut or event.kind in ("done", "final")):
            raise StreamCut
        if faults.stream_forever and event.kind != "content":
            while True:
                yield b": keep-alive\n\n"
                await asyncio.sleep(max(delay, KEEPALIVE_SECONDS))
        if not first and delay:
            await asyncio.sleep(delay)
        first = False
        yield event.data
        meter.tokens += event.tokens
        if event.kind == "content":
            sent_content += 1


async def _aiter(events: Iterator[m.StreamEvent]) -> AsyncIterator[m.StreamEvent]:
    for event in events:
        yield event


# --- jobs: what a paid endpoint produces -------------------------------------------------------------------------


@dataclass
class Produced:
    """A model's answer: a JSON body, or a stream of events; usage as known."""

    usage: UsageBox
    body: dict[str, Any] | None = None
    events: AsyncIterator[m.StreamEvent] | None = None


@dataclass
class Job:
    """A validated paid request: its price (x402) or reservation (credit), and how to produce the answer."""

    endpoint: str
    model: str
    quote: int
    description: str
    produce: Callable[[], Awaitable[Produced]]
    cost: Callable[[UsageBox], int]
    base_cost: Callable[[UsageBox], int]
    stream: bool = False
    include_usage: bool = False
    topup: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _chat_job(st: SandboxState, body: Any) -> Job:
    cfg = st.config
    request = m.validate_chat(cfg, body)
    spec = request.spec
    created = int(time.time())

    async def produce() -> Produced:
        if st.upstream is not None:
            if request.stream:
                events, box = await st.upstream.chat_stream(request.body, request.include_usage)
                return Produced(box, events=events)
            data, box = await st.upstream.chat(request.body)
            if not box.known:
                box.prompt_tokens, box.known = request.prompt_tokens, True
            return Produced(box, body=data)
        gen = m.generate_chat(request)
        box = UsageBox(gen.prompt_tokens, gen.completion_tokens, True)
        cid = _completion_id()
        if request.stream:
            return Produced(box, events=_aiter(m.chat_stream(gen, spec.id, cid, created, request.include_usage)))
        return Produced(box, body=m.chat_completion(gen, spec.id, cid, created))

    def prompt(box: UsageBox) -> int:
        return box.prompt_tokens if box.known else request.prompt_tokens

    return Job(
        "chat",
        spec.id,
        m.token_cost(spec, request.prompt_tokens, request.max_tokens, cfg.markup_bps),
        f"Chat completion with {spec.id} (up to {request.max_tokens} completion tokens)",
        produce,
        lambda box: m.token_cost(spec, prompt(box), box.completion_tokens, cfg.markup_bps),
        lambda box: m.token_cost(spec, prompt(box), box.completion_tokens),
        stream=request.stream,
        include_usage=request.include_usage,
    )


def _embeddings_job(st: SandboxState, body: Any) -> Job:
    cfg = st.config
    if not isinstance(body, dict):
        raise m.BadRequest("the request body must be a JSON object")
    spec = m.check_model(cfg, body.get("model"))
    inputs = m.embedding_inputs(body)
    tokens = m.embedding_tokens(inputs)
    answer = m.embeddings_response(body, spec.id, inputs, tokens)  # validates dimensions / encoding_format too

    async def produce() -> Produced:
        return Produced(UsageBox(tokens, 0, True), body=answer)

    price = m.token_cost(spec, tokens, 0, cfg.markup_bps)
    return Job(
        "embeddings",
        spec.id,
        price,
        f"Embeddings with {spec.id} ({tokens} input tokens)",
        produce,
        lambda _box: price,
        lambda _box: m.token_cost(spec, tokens, 0),
    )


def _images_job(st: SandboxState, body: Any) -> Job:
    cfg = st.config
    if not isinstance(body, dict):
        raise m.BadRequest("the request body must be a JSON object")
    spec: ModelSpec = m.check_model(cfg, body["model"]) if body.get("model") is not None else cfg.models[0]
    n = m.image_count(body)
    price = m.flat_cost(cfg.image_price_micro * n, cfg.markup_bps)

    async def produce() -> Produced:
        return Produced(UsageBox(0, 0, True), body=m.images_response(body, n, int(time.time())))

    return Job(
        "images",
        spec.id,
        price,
        f"{n} image(s) with {spec.id}",
        produce,
        lambda _box: price,
        lambda _box: cfg.image_price_micro * n,
    )


def _gemini_job(st: SandboxState, model: str, body: Any) -> Job:
    cfg = st.config
    request = m.gemini_to_chat(cfg, model, body)
    spec = request.spec

    async def produce() -> Produced:
        gen = m.generate_chat(request)
        return Produced(UsageBox(gen.prompt_tokens, gen.completion_tokens, True), body=m.gemini_response(gen, spec.id))

    return Job(
        "generateContent",
        spec.id,
        m.token_cost(spec, request.prompt_tokens, request.max_tokens, cfg.markup_bps),
        f"generateContent with {spec.id} (up to {request.max_tokens} output tokens)",
        produce,
        lambda box: m.token_cost(spec, box.prompt_tokens, box.completion_tokens, cfg.markup_bps),
        lambda box: m.token_cost(spec, box.prompt_tokens, box.completion_tokens),
    )


def _scripted_job(
    st: SandboxState,
    endpoint: str,
    request: m.ChatRequest,
    answer: Callable[[m.Generation], Produced],
    budget_name: str,
) -> Job:
    """A paid job answered by the scripted model (the Responses API, Anthropic Messages). The answer is generated
    before any 402, so a request the model cannot answer is a 400, never a paid failure."""
    cfg, spec = st.config, request.spec
    gen = m.generate_chat(request)

    async def produce() -> Produced:
        return answer(gen)

    return Job(
        endpoint,
        spec.id,
        m.token_cost(spec, request.prompt_tokens, request.max_tokens, cfg.markup_bps),
        f"{endpoint} with {spec.id} (up to {request.max_tokens} {budget_name})",
        produce,
        lambda box: m.token_cost(spec, box.prompt_tokens, box.completion_tokens, cfg.markup_bps),
        lambda box: m.token_cost(spec, box.prompt_tokens, box.completion_tokens),
        stream=request.stream,
    )


def _responses_job(st: SandboxState, body: Any) -> Job:
    request = apis.read_responses_request(st.config, body)
    created = int(time.time())

    def answer(gen: m.Generation) -> Produced:
        box = UsageBox(gen.prompt_tokens, gen.completion_tokens, True)
        response_id = "resp_" + secrets.token_hex(12)
        if request.stream:
            return Produced(box, events=_aiter(apis.responses_stream(gen, request, response_id, created)))
        return Produced(box, body=apis.response_object(gen, request, response_id, created))

    return _scripted_job(st, "Response", request, answer, "output tokens")


def _messages_job(st: SandboxState, body: Any) -> Job:
    request = apis.read_messages_request(st.config, body)

    def answer(gen: m.Generation) -> Produced:
        box = UsageBox(gen.prompt_tokens, gen.completion_tokens, True)
        message_id = "msg_" + secrets.token_hex(12)
        if request.stream:
            return Produced(box, events=_aiter(apis.messages_stream(gen, request, message_id)))
        return Produced(box, body=apis.message_object(gen, request, message_id))

    return _scripted_job(st, "Message", request, answer, "output tokens")


def _topup_job(st: SandboxState, body: Any) -> Job:
    cfg = st.config
    amount = body.get("amount") if isinstance(body, dict) else None
    if isinstance(amount, bool) or not isinstance(amount, int | float | str):
        raise ApiError(400, "'amount' (USD) is required")
    try:
        usd = Decimal(str(amount))
    except InvalidOperation:
        raise ApiError(400, "'amount' must be a number of USD") from None
    if not usd.is_finite() or usd < cfg.topup_min_usd:
        raise ApiError(400, f"Minimum top-up is ${cfg.topup_min_usd}")
    if usd > cfg.topup_max_usd:
        raise ApiError(400, f"Maximum top-up is ${cfg.topup_max_usd}")
    micro = usd * 1_000_000
    if micro != micro.to_integral_value():
        raise ApiError(400, "'amount' has more than 6 decimals")

    async def produce() -> Produced:  # the credit itself happens inside the settlement transaction
        return Produced(UsageBox())

    price = int(micro)
    return Job("topup", "", price, f"Top up ${usd} of credit", produce, lambda _b: price, lambda _b: price, topup=True)


# --- the two ways to pay ------------------------------------------------------------------------------------------


def _note(st: SandboxState, header: str, outcome: str, reason: str, path: str) -> None:
    payer, nonce = peek_payer_nonce(header)
    st.store.record_attempt(payer, nonce, outcome, reason, path)


async def _x402(
    request: Request, st: SandboxState, dialect: Dialect, job: Job, faults: Faults, upto: bool = False
) -> Response:
    cfg, store, path = st.config, st.store, request.url.path
    quote = Quote(job.quote, str(request.url), job.description)
    header = payment_header(request.headers, dialect)
    if header is None:
        return challenge(cfg, dialect, quote, malformed=faults.malformed_402, upto=upto)
    if faults.redirect_after_402:
        _note(st, header, "ignored", "redirect_after_402", path)
        return RedirectResponse(faults.redirect_after_402, status_code=307)
    if faults.change_payee_on_replay:
        _note(st, header, "ignored", "change_payee_on_replay", path)
        return challenge(cfg, dialect, quote, pay_to=CHANGED_PAYEE, upto=upto)
    if faults.change_amount_on_replay:
        _note(st, header, "ignored", "change_amount_on_replay", path)
        changed = Quote(job.quote + max(1, job.quote // 10), quote.resource_url, quote.description)
        return challenge(cfg, dialect, changed, upto=upto)
    payment: Payment | None = None
    try:
        upto_payment = decode_upto(header) if upto else None
        if upto_payment is not None:
            return await _x402_upto(request, st, job, faults, quote, upto_payment)
        payment = decode_payment(header)
        st.facilitator.verify(payment, job.quote, dialect)
    except Refusal as refusal:
        payer = payment.payer if payment else None
        store.record_attempt(payer, payment.authorization.nonce if payment else None, "refused", refusal.reason, path)
        return challenge(cfg, dialect, quote, error=refusal.reason, message=refusal.message, upto=upto)
    auth = payment.authorization
    if faults.replay_402:
        store.record_attempt(payment.payer, auth.nonce, "ignored", "replay_402", path)
        return challenge(cfg, dialect, quote, upto=upto)
    try:
        if faults.upstream_error:
            raise UpstreamFailure("injected upstream_error fault")
        produced = await job.produce()
    except UpstreamFailure as exc:
        store.record_attempt(payment.payer, auth.nonce, "unsettled", "upstream_error", path)
        raise ApiError(502, f"Provider returned an error ({exc}); the payment was not settled") from None
    try:
        settled = st.facilitator.settle(payment, path, topup_wallet=payment.payer if job.topup else None)
    except Refusal as refusal:
        await _discard(produced)
        store.record_attempt(payment.payer, auth.nonce, "refused", refusal.reason, path)
        return challenge(cfg, dialect, quote, error=refusal.reason, message=refusal.message, upto=upto)
    store.record_attempt(payment.payer, auth.nonce, "settled", None, path)
    headers = settlement_headers(
        cfg, dialect, faults.settlement_payer or payment.payer, settled.transaction, auth.value
    )
    if job.topup:
        produced.body = {"balance_usdc": settled.credited_balance, "credited_usdc": auth.value}
    if faults.fail_after_settle:
        await _discard(produced)
        raise ApiError(500, "Injected failure after settlement (fail_after_settle)")
    if faults.stall_after_settle:
        await asyncio.sleep(faults.stall_after_settle)
    return _respond(st, produced, headers, faults)


async def _x402_upto(
    request: Request, st: SandboxState, job: Job, faults: Faults, quote: Quote, payment: UptoPayment
) -> Response:
    """An upto payment: verify its ceiling, produce, then settle the metered cost (a stream: after its last byte)."""
    cfg, store, path = st.config, st.store, request.url.path
    payer, nonce = payment.payer, payment.nonce_key
    try:
        st.facilitator.verify_upto(payment, job.quote)
    except Refusal as refusal:
        store.record_attempt(payer, nonce, "refused", refusal.reason, path)
        return challenge(cfg, "v2", quote, error=refusal.reason, message=refusal.message, upto=True)
    if faults.replay_402:
        store.record_attempt(payer, nonce, "ignored", "replay_402", path)
        return challenge(cfg, "v2", quote, upto=True)
    try:
        if faults.upstream_error:
            raise UpstreamFailure("injected upstream_error fault")
        produced = await job.produce()
    except UpstreamFailure as exc:
        store.record_attempt(payer, nonce, "unsettled", "upstream_error", path)
        raise ApiError(502, f"Provider returned an error ({exc}); the payment was not settled") from None

    def settle(box: UsageBox) -> str:
        """Settle the metered cost (at most the ceiling); the base64 settlement report."""
        amount = min(job.cost(box), payment.ceiling)
        settled = st.facilitator.settle_upto(payment, amount, path)
        store.record_attempt(payer, nonce, "settled", None, path)
        reported = amount if faults.settlement_amount is None else faults.settlement_amount
        transaction = settled.transaction if amount else ""
        headers = settlement_headers(cfg, "v2", faults.settlement_payer or payer, transaction, reported)
        return headers["PAYMENT-RESPONSE"]

    if produced.events is None or faults.fail_after_settle:
        try:
            report = settle(produced.usage)
        except Refusal as refusal:
            await _discard(produced)
            store.record_attempt(payer, nonce, "refused", refusal.reason, path)
            return challenge(cfg, "v2", quote, error=refusal.reason, message=refusal.message, upto=True)
        if faults.fail_after_settle:
            await _discard(produced)
            raise ApiError(500, "Injected failure after settlement (fail_after_settle)")
        if faults.stall_after_settle:
            await asyncio.sleep(faults.stall_after_settle)
        return _respond(st, produced, {"PAYMENT-RESPONSE": report}, faults)

    box, meter = produced.usage, Meter()
    events = produced.events
    settled_once = False

    async def settled_before_done() -> AsyncIterator[m.StreamEvent]:
        """The stream, with the settlement of everything it delivered reported just before its last event."""
        nonlocal settled_once
        async for event in events:
            if event.kind in ("done", "final") and not settled_once:
                settled_once = True
                delivered = box if box.known else UsageBox(box.prompt_tokens, meter.tokens, False)
                try:
                    report = settle(delivered)
                except Refusal as refusal:  # a lost race for the nonce: the answer went out unpaid
                    store.record_attempt(payer, nonce, "refused", refusal.reason, path)
                else:
                    yield m.StreamEvent(b": payment-response " + report.encode() + b"\n\n")
            yield event

    def close(delivered: Meter) -> None:
        nonlocal settled_once
        if not settled_once:  # the client went away or the stream was cut: settle what was delivered
            settled_once = True
            with contextlib.suppress(Refusal):
                settle(_delivered(box, delivered))

    if faults.stall_after_settle:
        await asyncio.sleep(faults.stall_after_settle)
    delay = cfg.stream_chunk_delay_ms / 1000
    return SSEResponse(_paced(settled_before_done(), faults, delay, meter), {}, meter, close)


def _delivered(box: UsageBox, meter: Meter) -> UsageBox:
    """Usage of what a stream delivered: all of it when it completed, else at most the tokens that went out."""
    if meter.completed:
        return box
    if not box.known:
        return UsageBox(box.prompt_tokens, meter.tokens, box.known)
    return UsageBox(box.prompt_tokens, min(box.completion_tokens, meter.tokens), box.known)


async def _discard(produced: Produced) -> None:
    aclose = getattr(produced.events, "aclose", None)
    if aclose is not None:
        await aclose()


def _respond(
    st: SandboxState,
    produced: Produced,
    headers: Mapping[str, str],
    faults: Faults,
    on_close: Callable[[Meter], None] | None = None,
) -> Response:
    if produced.events is None:
        return json_answer(produced.body or {}, headers, faults.oversized)
    meter = Meter()
    delay = st.config.stream_chunk_delay_ms / 1000
    return SSEResponse(_paced(produced.events, faults, delay, meter), headers, meter, on_close)


async def _credit(request: Request, st: SandboxState, job: Job, faults: Faults) -> Response:
    store = st.store
    try:
        key = key_owner(store, _bearer(request))
    except Unauthorized as exc:
        raise ApiError(401, str(exc)) from None
    wallet = key.wallet
    retry = st.limiter.hit(wallet)
    if retry is not None:
        raise ApiError(429, "Rate limit exceeded", headers={"Retry-After": str(retry)})
    reserved = job.quote
    if not store.reserve(wallet, reserved):
        balance, locked = store.credit(wallet)
        raise ApiError(
            402,
            "Insufficient balance. Top up at POST /v1/topup",
            available_usdc=balance - locked,
            required_usdc=reserved,
        )
    started = time.monotonic()

    def finish(box: UsageBox, streamed: bool, error: str | None = None) -> None:
        charged = 0 if error else min(job.cost(box), reserved)
        revenue = 0 if error else max(0, charged - job.base_cost(box))
        store.reconcile(wallet, reserved, charged)
        store.record_usage(
            key_id=key.id,
            wallet=wallet,
            model=job.model,
            endpoint=job.endpoint,
            prompt_tokens=box.prompt_tokens,
            completion_tokens=box.completion_tokens,
            reserved=reserved,
            charged=charged,
            platform_revenue=revenue,
            streamed=streamed,
            latency_ms=int((time.monotonic() - started) * 1000),
            error=error,
        )

    try:
        if faults.upstream_error:
            raise UpstreamFailure("injected upstream_error fault")
        produced = await job.produce()
    except UpstreamFailure:
        finish(UsageBox(), job.stream, "upstream_error")
        raise ApiError(502, "Provider returned an error") from None
    headers = {"X-Sandbox-Charge-Reserved": str(reserved)}
    if produced.events is None:
        finish(produced.usage, False)
        if faults.fail_after_settle:
            raise ApiError(500, "Injected failure after the charge (fail_after_settle)")
        if faults.stall_after_settle:
            await asyncio.sleep(faults.stall_after_settle)
        return _respond(st, produced, headers, faults)
    box = produced.usage
    full = UsageBox(box.prompt_tokens, box.completion_tokens, box.known)

    def close(meter: Meter) -> None:
        finish(_delivered(box, meter), True)

    if faults.fail_after_settle:
        await _discard(produced)
        finish(full, True)
        raise ApiError(500, "Injected failure after the charge (fail_after_settle)")
    if faults.stall_after_settle:
        await asyncio.sleep(faults.stall_after_settle)
    return _respond(st, produced, headers, faults, close)


async def _paid(request: Request, dialect: Mode, build: Callable[[SandboxState, Any], Job]) -> Response:
    st = _state(request)
    try:
        faults = st.faults.resolve(request.headers.get("x-sandbox-fault"))
    except FaultSpecError as exc:
        raise ApiError(400, f"bad X-Sandbox-Fault: {exc}") from None
    if faults.delay_ms:
        await asyncio.sleep(faults.delay_ms / 1000)
    if faults.status is not None:
        headers = {"Retry-After": str(faults.retry_after)} if faults.retry_after is not None else {}
        message = "Rate limit exceeded" if faults.status == 429 else f"Injected fault: HTTP {faults.status}"
        raise ApiError(faults.status, message, headers=headers)
    body = await _json(request)
    try:
        job = build(st, body)
    except m.BadRequest as exc:
        raise ApiError(400, str(exc)) from None
    if job.topup:
        return await _x402(request, st, "kiosk", job, faults)
    if dialect == "free":
        return await _free(st, job, faults)
    if dialect == "aisa":
        probe = request.headers.get("x-aisa-mode") == "x402_probe"
        if "authorization" in request.headers and not probe:
            return await _aisa_credit(request, st, job, faults)
        return await _x402(request, st, "v2", job, faults)
    if "authorization" in request.headers:
        return await _credit(request, st, job, faults)
    if dialect == "upto":
        return await _x402(request, st, "v2", job, faults, upto=True)
    return await _x402(request, st, dialect, job, faults)


async def _free(st: SandboxState, job: Job, faults: Faults) -> Response:
    """A plain gateway: the answer, no payment (the benchmarks' baseline and plain-gateway tests)."""
    try:
        if faults.upstream_error:
            raise UpstreamFailure("injected upstream_error fault")
        produced = await job.produce()
    except UpstreamFailure:
        raise ApiError(502, "Provider returned an error") from None
    return _respond(st, produced, {}, faults)


def _usd(micro: int) -> float:
    """AIsa reports money as USD numbers (``usage.cost: 0.0025``); exact for 6 decimals."""
    return float(Decimal(micro) / 1_000_000)


async def _aisa_credit(request: Request, st: SandboxState, job: Job, faults: Faults) -> Response:
    """AIsa ``api_key_proxy``: a prepaid credit per key, ``usage.cost`` and ``usage.credits_remaining`` on answers."""
    store = st.store
    try:
        key = key_owner(store, _bearer(request))
    except Unauthorized as exc:
        raise ApiError(401, str(exc)) from None
    wallet = key.wallet
    reserved = job.quote
    if not store.reserve(wallet, reserved):
        raise ApiError(402, "Insufficient credits")
    try:
        produced = await job.produce()
    except UpstreamFailure:
        store.reconcile(wallet, reserved, 0)
        raise ApiError(500, "Provider returned an error") from None

    def charge(box: UsageBox) -> tuple[int, int]:
        charged = min(job.cost(box), reserved)
        store.reconcile(wallet, reserved, charged)
        balance, locked = store.credit(wallet)
        return charged, balance - locked

    if produced.events is None:
        charged, remaining = charge(produced.usage)
        body = dict(produced.body or {})
        if isinstance(body.get("usage"), dict):
            body["usage"] = {**body["usage"], "cost": _usd(charged), "credits_remaining": _usd(remaining)}
        return json_answer(body, {}, faults.oversized)
    events = produced.events
    charged_box: list[tuple[int, int]] = []

    async def priced() -> AsyncIterator[m.StreamEvent]:
        async for event in events:
            if event.kind not in ("usage", "final"):
                yield event
                continue
            charged_box.append(charge(produced.usage))
            name, payload = apis.parse_sse(event.data)
            usage = apis.usage_object(payload)
            if usage is not None:
                charged, remaining = charged_box[0]
                usage.update(cost=_usd(charged), credits_remaining=_usd(remaining))
            yield m.StreamEvent(apis.encode_sse(name, payload), event.tokens, event.kind)

    def close(_meter: Meter) -> None:
        if not charged_box:
            charged_box.append(charge(produced.usage))

    produced.events = priced()
    return _respond(st, produced, {}, faults, close)


_AISA_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    402: "insufficient_credits",
    404: "model_not_found",
    429: "rate_limit_exceeded",
    502: "server_error",
    500: "server_error",
}


def _aisa_route(build: Callable[[SandboxState, Any], Job]) -> Callable[[Request], Awaitable[Response]]:
    """The AIsa mount: its own error envelope ``{"error": {"code", "message"}}``; unknown models answer 404."""

    async def endpoint(request: Request) -> Response:
        try:
            return await _paid(request, "aisa", build)
        except ApiError as exc:
            status = 404 if exc.status == 400 and "model" in exc.message.lower() else exc.status
            code = _AISA_CODES.get(status, "server_error")
            body = {"error": {"code": code, "message": exc.message}}
            return JSONResponse(body, status_code=status, headers=dict(exc.headers or {}))

    return endpoint


# --- routes ---------------------------------------------------------------------------------------------------------


async def health(_request: Request) -> Response:
    """``GET /health``."""
    return JSONResponse({"status": "ok"})


async def list_models(request: Request) -> Response:
    """``GET /v1/models``."""
    return JSONResponse(m.models_listing(_state(request).config))


def _model_routes(dialect: Mode) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        st = _state(request)
        rest: str = request.path_params["rest"]
        if request.method == "GET":
            spec = st.config.model(rest)
            if spec is None:
                raise ApiError(404, f"Unknown model: {rest[:100]}")
            return JSONResponse(m.model_entry(spec))
        model, sep, action = rest.rpartition(":")
        if not sep or action != "generateContent":
            raise ApiError(404, f"Unknown model action: {rest[:100]}")
        return await _paid(request, dialect, lambda state, body: _gemini_job(state, model, body))

    return endpoint


def _paid_route(dialect: Mode, build: Callable[[SandboxState, Any], Job]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await _paid(request, dialect, build)

    return endpoint


async def balance(request: Request) -> Response:
    """``GET /v1/balance/{wallet}``: available credit (public)."""
    wallet = _address(request.path_params["wallet"], "wallet").lower()
    amount, locked = _state(request).store.credit(wallet)
    return JSONResponse({"wallet": wallet, "available_usdc": amount - locked})


def _wallet_auth(request: Request, prefix: str, wallet: str) -> None:
    """API key (Bearer or ``api_key`` query) of ``wallet``, or SIWE ``message`` + ``signature`` query params."""
    st = _state(request)
    params = request.query_params
    try:
        key = _bearer(request) or params.get("api_key")
        if key:
            row = key_owner(st.store, key)
            if row.wallet != wallet:
                raise Unauthorized("API key does not belong to this wallet")
            return
        if params.get("message") or params.get("signature"):
            ctx = _siwe_context(request, prefix)
            address = verify_siwe(st.config, st.store, ctx, params.get("message"), params.get("signature"))
            if address != wallet:
                raise Unauthorized("SIWE address does not match this wallet")
            return
        raise Unauthorized("Missing API key or SIWE signature")
    except Unauthorized as exc:
        raise ApiError(401, str(exc)) from None


def _usage_route(prefix: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        wallet = _address(request.path_params["wallet"], "wallet").lower()
        _wallet_auth(request, prefix, wallet)
        store = _state(request).store
        amount, locked = store.credit(wallet)
        keys = [
            {
                "api_key_id": row["id"],
                "label": row["label"],
                "request_count": int(row["request_count"]),
                "total_prompt_tokens": int(row["prompt_tokens"]),
                "total_completion_tokens": int(row["completion_tokens"]),
                "total_charged_usdc": int(row["charged"]),
                "total_platform_revenue_usd": float(Decimal(int(row["revenue"])) / 1_000_000),
            }
            for row in store.usage_by_key(wallet)
        ]
        return JSONResponse(
            {
                "wallet": wallet,
                "balance_usdc": amount,
                "locked_usdc": locked,
                "available_usdc": amount - locked,
                "keys": keys,
            }
        )

    return endpoint


def _topups_route(prefix: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        wallet = _address(request.path_params["wallet"], "wallet").lower()
        _wallet_auth(request, prefix, wallet)
        st = _state(request)
        rows = st.store.topups(wallet)
        topups = [
            {"id": r["id"], "amount_usdc": int(r["amount"]), "tx_hash": r["tx_hash"], "created_at": r["created_at"]}
            for r in rows
        ]
        return JSONResponse({"wallet": wallet, "network": st.config.network_label, "topups": topups})

    return endpoint


def _keys_route(prefix: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        st = _state(request)
        ctx = _siwe_context(request, prefix)
        if request.method == "GET":
            source: Mapping[str, Any] = request.query_params
        else:
            body = await _json(request)
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            source = body
        label = source.get("label") if request.method == "POST" else None
        if label is not None and (not isinstance(label, str) or len(label) > 200):
            raise ApiError(400, "'label' must be a string of at most 200 characters")
        try:
            wallet = verify_siwe(st.config, st.store, ctx, source.get("message"), source.get("signature"))
        except Unauthorized as exc:
            raise ApiError(401, str(exc)) from None
        if request.method == "GET":
            data = [
                {"id": k.id, "label": k.label, "created_at": k.created_at, "revoked_at": k.revoked_at}
                for k in st.store.keys(wallet)
            ]
            return JSONResponse({"data": data})
        key = new_api_key()
        row = st.store.create_key(wallet, hash_key(key), label)
        return JSONResponse({"id": row.id, "key": key, "label": row.label, "created_at": row.created_at})

    return endpoint


def _revoke_route(prefix: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        st = _state(request)
        try:
            key_id = int(request.path_params["key_id"])
        except ValueError:
            raise ApiError(404, "API key not found") from None
        body = await _json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            wallet = verify_siwe(
                st.config, st.store, _siwe_context(request, prefix), body.get("message"), body.get("signature")
            )
        except Unauthorized as exc:
            raise ApiError(401, str(exc)) from None
        if not st.store.revoke_key(wallet, key_id):
            raise ApiError(404, "API key not found")
        return JSONResponse({"revoked": True})

    return endpoint


async def faucet(request: Request) -> Response:
    """``POST /sandbox/faucet {"address", "amount"}``: mint test USDC (micro units)."""
    body = await _json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    address = _address(body.get("address"))
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_FAUCET:
        raise ApiError(400, f"'amount' must be an integer of micro-USDC in 1..{MAX_FAUCET}")
    new_balance = _state(request).store.mint(address, amount)
    return JSONResponse({"address": _checksum(address), "balance": new_balance})


async def usdc_balance(request: Request) -> Response:
    """``GET /sandbox/balance/{address}``: test-USDC balance (not kiosk credit)."""
    address = _address(request.path_params["address"])
    return JSONResponse({"address": _checksum(address), "balance": _state(request).store.usdc_balance(address)})


def _payer_param(request: Request) -> str | None:
    payer = request.query_params.get("payer")
    return _address(payer, "payer") if payer else None


async def stats(request: Request) -> Response:
    """``GET /sandbox/stats?payer=``."""
    return JSONResponse(_state(request).store.stats(_payer_param(request)))


async def settlements(request: Request) -> Response:
    """``GET /sandbox/settlements?payer=``."""
    rows = _state(request).store.settlements(_payer_param(request))
    for row in rows:
        row["payer"], row["payee"] = _checksum(row["payer"]), _checksum(row["payee"])
    return JSONResponse(rows)


def api_routes(prefix: str, dialect: Mode) -> list[BaseRoute]:
    """The API under ``{prefix}/v1`` with 402s in ``dialect`` (``upto``: x402 v2 offering exact and upto)."""
    v1 = f"{prefix}/v1"
    return [
        Route(f"{v1}/models", list_models, methods=["GET"]),
        Route(f"{v1}/models/{{rest:path}}", _model_routes(dialect), methods=["GET", "POST"]),
        Route(f"{v1}/balance/{{wallet}}", balance, methods=["GET"]),
        Route(f"{v1}/usage/{{wallet}}", _usage_route(prefix), methods=["GET"]),
        Route(f"{v1}/topups/{{wallet}}", _topups_route(prefix), methods=["GET"]),
        Route(f"{v1}/topup", _paid_route(dialect, _topup_job), methods=["POST"]),
        Route(f"{v1}/auth/keys", _keys_route(prefix), methods=["GET", "POST"]),
        Route(f"{v1}/auth/keys/{{key_id}}", _revoke_route(prefix), methods=["DELETE"]),
        Route(f"{v1}/chat/completions", _paid_route(dialect, _chat_job), methods=["POST"]),
        Route(f"{v1}/responses", _paid_route(dialect, _responses_job), methods=["POST"]),
        Route(f"{v1}/messages", _paid_route(dialect, _messages_job), methods=["POST"]),
        Route(f"{v1}/embeddings", _paid_route(dialect, _embeddings_job), methods=["POST"]),
        Route(f"{v1}/images/generations", _paid_route(dialect, _images_job), methods=["POST"]),
    ]


def free_routes(prefix: str) -> list[BaseRoute]:
    """A plain OpenAI-compatible gateway under ``{prefix}/v1``: nothing to pay (the benchmarks' baseline)."""
    v1 = f"{prefix}/v1"
    return [
        Route(f"{v1}/models", list_models, methods=["GET"]),
        Route(f"{v1}/chat/completions", _paid_route("free", _chat_job), methods=["POST"]),
        Route(f"{v1}/responses", _paid_route("free", _responses_job), methods=["POST"]),
        Route(f"{v1}/messages", _paid_route("free", _messages_job), methods=["POST"]),
        Route(f"{v1}/embeddings", _paid_route("free", _embeddings_job), methods=["POST"]),
        Route(f"{v1}/images/generations", _paid_route("free", _images_job), methods=["POST"]),
    ]


def aisa_routes(prefix: str) -> list[BaseRoute]:
    """AIsa under ``{prefix}/v1``: ``api_key_proxy`` with a key, x402 v2 without one (or with
    ``X-AIsa-Mode: x402_probe``); ``POST /sandbox/aisa/keys {"credits_usd"}`` issues a key."""
    v1 = f"{prefix}/v1"
    return [
        Route(f"{v1}/models", list_models, methods=["GET"]),
        Route(f"{v1}/chat/completions", _aisa_route(_chat_job), methods=["POST"]),
        Route(f"{v1}/responses", _aisa_route(_responses_job), methods=["POST"]),
        Route(f"{v1}/messages", _aisa_route(_messages_job), methods=["POST"]),
        Route(f"{v1}/embeddings", _aisa_route(_embeddings_job), methods=["POST"]),
        Route("/sandbox/aisa/keys", aisa_key, methods=["POST"]),
    ]


async def aisa_key(request: Request) -> Response:
    """``POST /sandbox/aisa/keys {"credits_usd": 5}``: an AIsa-style key with prepaid credits (shown once)."""
    body = await _json(request)
    credits = body.get("credits_usd", 5) if isinstance(body, dict) else 5
    try:
        amount = int(Decimal(str(credits)) * 1_000_000)
    except ArithmeticError:
        raise ApiError(400, "'credits_usd' must be a number") from None
    if not 0 <= amount <= MAX_FAUCET:
        raise ApiError(400, "'credits_usd' is out of range")
    st = _state(request)
    account = "aisa:" + secrets.token_hex(8)
    key = new_api_key()
    st.store.create_key(account, hash_key(key), "aisa")
    st.store.grant_credit(account, amount)
    return JSONResponse({"key": key, "credits_usd": _usd(amount)})


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.extra)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = STATUS_CODES.get(exc.status_code, "ERROR")
    message = "Not found" if exc.status_code == 404 else str(exc.detail)
    return error_response(exc.status_code, code, message, exc.headers)


async def _internal_error(_request: Request, exc: Exception) -> Response:
    logging.getLogger("llm402.sandbox").error("internal error", exc_info=exc)
    return error_response(500, "INTERNAL_ERROR", f"Internal error: {type(exc).__name__}")


def create_app(config: SandboxConfig | None = None) -> Starlette:
    """The sandbox as a Starlette app (its state lives in ``app.state.sandbox``; the store closes on shutdown)."""
    from .mpp import mpp_routes  # imported here: sandbox/mpp.py builds on this module

    cfg = config or SandboxConfig()
    store = Store(cfg.db_path)
    upstream = Upstream(cfg.upstream_url, cfg.upstream_api_key) if cfg.upstream_url else None
    state = SandboxState(
        cfg,
        store,
        Facilitator(cfg, store),
        FaultBook(cfg.faults),
        RateLimiter(cfg.rate_limit_per_minute, cfg.rate_limit_per_day),
        upstream,
    )
    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/sandbox/faucet", faucet, methods=["POST"]),
        Route("/sandbox/balance/{address}", usdc_balance, methods=["GET"]),
        Route("/sandbox/stats", stats, methods=["GET"]),
        Route("/sandbox/settlements", settlements, methods=["GET"]),
        *api_routes("", cfg.default_dialect),
        *api_routes("/x402v2", "v2"),
        *api_routes("/x402v1", "v1"),
        *api_routes("/kiosk", "kiosk"),
        *api_routes("/upto", "upto"),
        *free_routes("/free"),
        *aisa_routes("/aisa"),
        *mpp_routes(),  # MPP evm/charge: /mpp/v1, /mpp-auth/v1 and the dual-rail /dual/v1 (sandbox/mpp.py)
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if upstream is not None:
                await upstream.aclose()
            store.close()

    _install_cut_filter()
    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.sandbox = state
    return app


__all__ = ["ApiError", "SandboxState", "create_app"]
