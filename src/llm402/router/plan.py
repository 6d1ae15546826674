"""One logical call through the router, without I/O: which routes, in which order, what each outcome means.

The `fallback_flow` (``flow``) walks the routes and asks the plan what each `Outcome` means (answer, give it to the
caller as it is, re-send the same payment, move on); the plan keeps the record every attempt leaves, which becomes
the call's one router receipt. Only llm402's own refusals count as refusals (`local_refusal`): a gateway's answer is
judged as the gateway's, whatever its headers and body claim.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import REFUSAL_HEADER
from ..receipts import Receipt
from .rules import Admission, Health, looks_like_context_error, looks_like_unknown_model, retry_after_seconds

if TYPE_CHECKING:
    from ..budget.base import Caps, Ledger
    from .router import Router

_DROPPED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "authorization", "connection"})
_PASSED_BACK_DROPPED = frozenset({"content-length", "transfer-encoding", "connection"})
ROUTE_HEADER = "llm402-route"
"""Added to the response the router hands over: the name of the route that answered."""


class Verdict(Enum):
    """What a failed or refused attempt means for the call (a 2xx whose first chunk arrived is simply handed over:
    no fallback after that)."""

    FINAL = "final"  # the request's own fault (400, 401, 403...): the same on every route, give it to the caller
    RESEND = "resend"  # a payment went out and the answer was lost: send the identical request again, same route
    NEXT = "next"  # try the next route


@dataclass(frozen=True, slots=True)
class Judgement:
    """The verdict on one attempt, and what it says about its route."""

    verdict: Verdict
    error: str | None
    health: Health
    stays: bool = False  # the route stays in play for a later pass
    retry_after: float | None = None


class RoutesFailed(Exception):
    """A pass over the routes ended without an answer; ``retry_after`` is the shortest hold still running."""

    def __init__(self, retry_after: float | None, retryable: bool) -> None:
        super().__init__("every route failed in this pass")
        self.retry_after = retry_after
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class Outgoing:
    """The request for one route: re-based URL, the route's auth and headers, the body with the route's model.
    Built once per route per call, so a re-send is byte-identical (same fingerprint, same signed payment)."""

    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt's answer, kept to give back when no route answers."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def is_answer(status: int) -> bool:
    """A status whose response goes to the caller once its first chunk arrives (no fallback after that)."""
    return 200 <= status < 300


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to, as a driver saw it: an exception, or a status with (for a failure) its headers and
    the start of its body.

    ``receipt``: the core's receipt for the attempt (``None`` for an answer: that one comes when its body ends).
    ``local``: that receipt when the core had already finished the call as its paying transport returned, i.e. the
    response is llm402's own local answer and not the gateway's (see `local_refusal`).
    """

    started: float  # the attempt's ``perf_counter`` when it was sent
    latency_ms: float
    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: BaseException | None = None
    receipt: Receipt | None = None
    local: Receipt | None = None

    @property
    def answered(self) -> bool:
        """A 2xx whose first chunk arrived: it is handed over."""
        return self.error is None and self.status is not None and is_answer(self.status)


def local_refusal(headers: Mapping[str, str], local: Receipt | None) -> str | None:
    """The code of a refusal llm402 itself made on this attempt, or ``None``.

    The refusal header and envelope prove nothing: a gateway can send both. What a gateway cannot forge is the core's
    own record: a local answer is finished (its receipt published) before the paying transport returns it, while a
    gateway's response is finished only when its body has been read, and recorded as ``http_<status>``. So a refusal
    counts as llm402's only when the receipt of a call finished before its response came back names it."""
    code = headers.get(REFUSAL_HEADER)
    return code if code is not None and local is not None and local.error == code else None


def _paid(receipt: Receipt | None) -> bool:
    """A fresh signed payment went out on this attempt (a re-sent one costs nothing new)."""
    payment = receipt.payment if receipt is not None else None
    return payment is not None and payment.kind == "call" and not payment.reused


@dataclass(frozen=True, slots=True)
class BudgetBlock:
    """A cap that refused this call: which ledger, for which agent, which cap, and how much was asked."""

    ledger: Ledger
    agent: str
    cap_name: str
    cap: int | None
    requested: int

    def covers(self, ledger: Ledger, agent: str, caps: Caps, estimate: int) -> bool:
        """Would a reservation of ``estimate`` hit the same cap? The global cap counts every agent of its ledger;
        the daily and total caps only the agent's own spending."""
        if ledger is not self.ledger or estimate < self.requested:
            return False
        if self.cap_name != "global" and agent != self.agent:
            return False
        same = {"daily": caps.daily, "total": caps.total, "global": caps.global_}
        return self.cap_name in same and same[self.cap_name] == self.cap


def _budget_block(body: bytes, ledger: Ledger, agent: str, caps: Caps, estimate: int) -> BudgetBlock:
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    err = data.get("error") if isinstance(data, Mapping) else None
    err = err if isinstance(err, Mapping) else {}
    requested = err.get("requested")
    name = err.get("cap_name")
    cap = err.get("cap")
    return BudgetBlock(
        ledger,
        agent,
        name if isinstance(name, str) else "",
        cap if isinstance(cap, int) and not isinstance(cap, bool) else None,
        requested if isinstance(requested, int) and not isinstance(requested, bool) else estimate,
    )


class CallPlan:
    """The router's side of one logical call."""

    def __init__(self, router: Router, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.router = router
        self.call_id = uuid.uuid4().hex
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        self.method = method
        parts = urlsplit(url)
        base_path = urlsplit(router.base_url).path.rstrip("/")
        path = parts.path
        self.path = path[len(base_path) :] if base_path and path.startswith(base_path + "/") else path
        self.query = parts.query
        self.headers = [(k, v) for k, v in headers if k.lower() not in _DROPPED_HEADERS]
        self.body = body
        self.json = _json_object(body, headers)
        asked = self.json.get("model") if self.json is not None else None
        self.asked: str | None = asked if isinstance(asked, str) else None
        self.streaming = bool(self.json is not None and self.json.get("stream") is True)
        self.order = router.rank(self.json, self.asked)
        self.attempts: list[dict[str, Any]] = []
        self.paid = False
        self._out: set[int] = set()
        self._blocks: list[BudgetBlock] = []
        self._outgoing: dict[int, Outgoing] = {}
        self._hints: list[float] = []
        self._last: Failure | BaseException | None = None
        self._last_receipt: Receipt | None = None
        self._answer_t0 = self._t0

    # --- what to try ---------------------------------------------------------------------------------------------
    def candidates(self) -> list[int]:
        """The routes still in play, in order (a new pass starts here)."""
        self._hints = []
        return [i for i in self.order if i not in self._out]

    def admit(self, index: int) -> Admission | None:
        """Let the route be tried, or record why it is skipped without traffic."""
        if self._budget_blocked(index):
            self._out.add(index)
            self._skip(index, "budget_exceeded")
            return None
        health = self.router.health[index]
        admission = health.admit()
        if admission == "rate_limited":
            wait = health.held_for()
            if wait > self.router.retry.max_retry_after:
                self._out.add(index)
            else:
                self._hints.append(wait)
            self._skip(index, "rate_limited")
            return None
        if admission == "circuit_open":
            self._out.add(index)  # an open circuit fails fast: it is not waited for within a call
            self._skip(index, "circuit_open")
            return None
        return admission

    def outgoing(self, index: int) -> Outgoing:
        """The request for route ``index`` (built once; a re-send reuses it byte for byte)."""
        built = self._outgoing.get(index)
        if built is not None:
            return built
        route = self.router.routes[index]
        gateway = route.gateway
        url = gateway.base_url + self.path + (f"?{self.query}" if self.query else "")
        body = self.body
        if self.json is not None and isinstance(self.json.get("model"), str):
            body = json.dumps({**self.json, "model": route.model}, separators=(",", ":")).encode()
        ours = {name.lower() for name in route.headers}
        headers = [(k, v) for k, v in self.headers if k.lower() not in ours]
        headers.append(("authorization", f"Bearer {gateway.api_key}"))
        headers.extend(route.headers.items())
        built = Outgoing(url, tuple(headers), body)
        self._outgoing[index] = built
        return built

    # --- what an attempt means -----------------------------------------------------------------------------------
    def judge(self, index: int, admission: Admission | None, outcome: Outcome, *, resend: bool = False) -> Judgement:
        """Decide what a failed or refused attempt means, and record it (attempt, route health, what is left)."""
        headers, body, error = outcome.headers, outcome.body, outcome.error
        paid = _paid(outcome.receipt)
        self.paid = self.paid or paid
        refusal = local_refusal(headers, outcome.local)
        judgement = self._classify(outcome.status, headers, body, error, refusal, paid, resend)
        if admission is not None:
            self.router.health[index].record(judgement.health, admission)
        wait = judgement.retry_after
        if wait is not None:
            self.router.health[index].hold(wait)
            if wait > self.router.retry.max_retry_after:
                judgement = replace(judgement, stays=False)
            else:
                self._hints.append(wait)
        if not judgement.stays:
            self._out.add(index)
        if refusal == "budget_exceeded":
            self._block(index, body)
        if judgement.verdict is not Verdict.FINAL:
            self._last = error if error is not None else Failure(outcome.status or 502, passed_back(headers), body)
        self._record(index, outcome.receipt, outcome.status, judgement.error, outcome.latency_ms, resend=resend)
        if outcome.receipt is not None:
            self._last_receipt = outcome.receipt
        return judgement

    def _classify(
        self,
        status: int | None,
        headers: Mapping[str, str],
        body: bytes,
        error: BaseException | None,
        refusal: str | None,
        paid: bool,
        resend: bool,
    ) -> Judgement:
        rules = self.router.fallback
        if error is not None:  # timeout, connection error, a stream cut before its first chunk
            name = type(error).__name__
            if paid and not resend:
                return Judgement(Verdict.RESEND, name, "failure")
            return Judgement(Verdict.NEXT, name, "failure", stays=not paid and not resend)
        assert status is not None
        if refusal is not None:  # llm402's own refusal: no traffic, or a payment problem on this route
            if rules.falls_back_on_refusal(refusal):
                return Judgement(Verdict.NEXT, refusal, "neutral")
            return Judgement(Verdict.FINAL, refusal, "neutral")
        if paid and (status in rules.statuses or status >= 500):
            return Judgement(Verdict.RESEND if not resend else Verdict.NEXT, f"http_{status}", "failure")
        if status in rules.statuses:
            health: Health = "neutral" if status == 429 else "failure"
            wait = retry_after_seconds(headers)
            stays = not resend
            return Judgement(Verdict.NEXT, f"http_{status}", health, stays=stays, retry_after=wait)
        if status == 402 and rules.unpaid_402:
            return Judgement(Verdict.NEXT, "http_402", "neutral")
        if rules.context_length and looks_like_context_error(status, body):
            return Judgement(Verdict.NEXT, "context_length", "neutral")
        if rules.unknown_model and looks_like_unknown_model(status, body):
            return Judgement(Verdict.NEXT, "unknown_model", "neutral")
        return Judgement(Verdict.FINAL, f"http_{status}", "success")

    def answered(self, index: int, admission: Admission | None, started: float) -> None:
        """A 2xx delivered its first chunk: the route works (``started``: the attempt's ``perf_counter``)."""
        self._answer_t0 = started
        if admission is not None:
            self.router.health[index].record("success", admission)

    def pass_failed(self) -> RoutesFailed:
        """The exception that ends a pass without an answer (tenacity retries it while routes remain)."""
        left = [i for i in self.order if i not in self._out]
        return RoutesFailed(min(self._hints) if self._hints else None, retryable=bool(left))

    # --- budget ----------------------------------------------------------------------------------------------------
    def _block(self, index: int, body: bytes) -> None:
        gateway = self.router.routes[index].gateway
        caps = gateway.engine.config.caps()
        estimate = self.router.estimate(index, self.json)
        self._blocks.append(_budget_block(body, gateway.ledger, gateway.agent, caps, estimate))

    def _budget_blocked(self, index: int) -> bool:
        """Would this route hit a cap that already refused this call (same ledger, the same cap, for the same agent
        unless it is the global cap, and an estimate no smaller than what was refused)? Then the refusal is certain
        and the route is not tried; a route with its own ledger, agent or caps, or a cheaper one, still is."""
        if not self._blocks:
            return False
        gateway = self.router.routes[index].gateway
        caps = gateway.engine.config.caps()
        estimate = self.router.estimate(index, self.json)
        return any(block.covers(gateway.ledger, gateway.agent, caps, estimate) for block in self._blocks)

    # --- the record ------------------------------------------------------------------------------------------------
    def _skip(self, index: int, reason: str) -> None:
        route = self.router.routes[index]
        self.attempts.append(
            {
                "route": route.name,
                "gateway": route.gateway.base_url,
                "model": route.model,
                "status": None,
                "cost": 0,
                "error": reason,
                "skipped": True,
            }
        )

    def _record(
        self,
        index: int,
        receipt: Receipt | None,
        status: int | None,
        error: str | None,
        latency_ms: float,
        *,
        resend: bool = False,
    ) -> None:
        route = self.router.routes[index]
        self.attempts.append(
            {
                "route": route.name,
                "gateway": route.gateway.base_url,
                "model": route.model,
                "status": status if status is not None else (receipt.status if receipt else None),
                "cost": receipt.cost if receipt is not None else 0,
                "error": error,
                "paid": _paid(receipt),
                "resend": resend,
                "latency_ms": round(latency_ms, 3),
                "call_id": receipt.call_id if receipt is not None else None,
            }
        )

    def finish(
        self, index: int | None, receipt: Receipt | None, *, resend: bool = False, recorded: bool = False
    ) -> Receipt:
        """The router receipt once an answer from route ``index`` ended, or once every route failed (``None``).

        ``cost`` is the sum of what every attempt was charged; ``attempts`` lists them all, skips included.
        ``recorded``: the answering attempt is already in the record (a final error answer went through `judge`)."""
        if index is not None and not recorded:
            error = receipt.error if receipt else None
            latency = (time.perf_counter() - self._answer_t0) * 1000
            self._record(index, receipt, None, error, latency, resend=resend)
            self.paid = self.paid or _paid(receipt)
        attempts = tuple(self.attempts)
        cost = sum(int(a["cost"]) for a in attempts)
        name = self.router.routes[index].name if index is not None else None
        base = receipt if index is not None and receipt is not None else self._last_receipt
        if base is None:
            first = self.router.routes[self.order[0] if self.order else 0].gateway
            return Receipt(
                call_id=self.call_id,
                agent=first.agent,
                intent=first.intent,
                gateway=self.router.base_url,
                method=self.method,
                path=self.path,
                model=self.asked,
                status=None,
                streamed=self.streaming,
                started_at=self.started_at,
                latency_ms=self._elapsed_ms(),
                route=name,
                attempts=attempts,
                error=self._last_error_name() or "no_route_available",
            )
        return replace(
            base,
            call_id=self.call_id,
            started_at=self.started_at,
            latency_ms=self._elapsed_ms(),
            cost=cost,
            route=name,
            attempts=attempts,
            error=base.error if index is not None else (self._last_error_name() or base.error),
        )

    def _elapsed_ms(self) -> float:
        return round((time.perf_counter() - self._t0) * 1000, 3)

    def _last_error_name(self) -> str | None:
        for attempt in reversed(self.attempts):
            if attempt.get("error"):
                return str(attempt["error"])
        return None

    @property
    def last_failure(self) -> Failure | BaseException | None:
        """The last failed attempt's answer (or exception), to give back when no route answers."""
        return self._last

    def final_headers(self, headers: tuple[tuple[str, str], ...], index: int | None) -> list[tuple[str, str]]:
        """Headers of a response the router gives back after its own retries: ``x-should-retry: false`` (the router
        did the retrying; an SDK retry on top would start a new logical call) and the answering route."""
        out = [(k, v) for k, v in headers if k.lower() not in _PASSED_BACK_DROPPED and k.lower() != "x-should-retry"]
        out.append(("x-should-retry", "false"))
        if index is not None:
            out.append((ROUTE_HEADER, self.router.routes[index].name))
        return out


def passed_back(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A response's headers as pairs, repeats kept (to give them back as they came)."""
    items = headers.multi_items() if hasattr(headers, "multi_items") else headers.items()
    return tuple((str(k), str(v)) for k, v in items)


def _json_object(body: bytes, headers: list[tuple[str, str]]) -> dict[str, Any] | None:
    content_type = next((v for k, v in headers if k.lower() == "content-type"), None)
    if not body or (content_type is not None and "json" not in content_type):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
