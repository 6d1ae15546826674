"""One logical call's walk over the routes, without I/O: what to do after each attempt, for both router transports.

`fallback_flow` is a generator, like the core's call flow. It yields an action, and the driver (sync or async: the
only difference is ``await``) does it and sends back what came of it:

- `Try`: send route ``index``'s request (``resend``: the same request again, once, after a payment's answer was
  lost); send back its `Outcome`.
- `Wait`: a pass over the routes ended without an answer and another pass is due; sleep, then send ``None``.
- `HandOver`: the 2xx just tried goes to the caller; its end publishes the router receipt (`CallPlan.finish`).
- `GiveBack`: publish ``receipt`` and answer the caller with this status, these headers and this body.
- `Reraise`: publish ``receipt`` and raise ``error`` (no route answered, and no payment went out).

The last three end the flow. Between passes, tenacity decides: its own decision function (``Retrying.iter``) reads
the `RetryPolicy`'s stop and wait values and says sleep or stop; the flow itself never sleeps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator
from dataclasses import dataclass

from tenacity import DoSleep, RetryCallState, Retrying, retry_if_exception

from ..receipts import Receipt
from .plan import CallPlan, Failure, Outcome, RoutesFailed, Verdict, passed_back
from .rules import Admission, wait_retry_after

log = logging.getLogger("llm402.router")


@dataclass(frozen=True, slots=True)
class Try:
    """Send route ``index``'s request (built once per call: a re-send is byte-identical)."""

    index: int
    resend: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep ``seconds`` before the next pass over the routes."""

    seconds: float


@dataclass(frozen=True, slots=True)
class HandOver:
    """Give the caller the answer of the `Try` just made on route ``index``."""

    index: int
    resend: bool = False


@dataclass(frozen=True, slots=True)
class GiveBack:
    """Answer the caller with this response, the router's last word (``receipt``: the router receipt)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    receipt: Receipt


@dataclass(frozen=True, slots=True)
class Reraise:
    """Raise ``error`` to the caller, the last attempt's own exception (``receipt``: the router receipt)."""

    error: BaseException
    receipt: Receipt


Action = Try | Wait | HandOver | GiveBack | Reraise
Flow = Generator[Action, Outcome | None, None]


def _retryable(error: BaseException) -> bool:
    return isinstance(error, RoutesFailed) and error.retryable


def _log_wait(state: RetryCallState) -> None:
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.info("llm402 router: no route answered (pass %d); next pass in %.2fs", state.attempt_number, wait)


def fallback_flow(plan: CallPlan) -> Flow:
    """The call's actions, from the first `Try` to its end (see the module docstring)."""
    policy = plan.router.retry
    passes = Retrying(  # decides only; the driver sleeps
        stop=policy.stop,
        wait=wait_retry_after(policy.wait),
        retry=retry_if_exception(_retryable),
        before_sleep=_log_wait,
        reraise=True,
    )
    passes.begin()
    state = RetryCallState(passes, fn=None, args=(), kwargs={})
    while True:
        for index in plan.candidates():
            admission = plan.admit(index)
            if admission is None:
                continue
            end = yield from _on_route(plan, index, admission)
            if end is not None:
                yield end
                return
        state.set_exception((RoutesFailed, plan.pass_failed(), None))
        try:
            sleep = passes.iter(state)  # a `DoSleep`, or the pass's `RoutesFailed` again: stop
        except RoutesFailed:
            break
        assert isinstance(sleep, DoSleep)
        state.prepare_for_next_attempt()
        yield Wait(float(sleep))
    yield _give_up(plan)


def _on_route(
    plan: CallPlan, index: int, admission: Admission | None
) -> Generator[Action, Outcome | None, HandOver | GiveBack | None]:
    """The attempts on one route: how the call ends there, or ``None`` to move on. A payment whose answer was lost is
    re-sent once, the same request on the same route (never signed again)."""
    resend = False
    while True:
        outcome = yield Try(index, resend)
        if outcome is None:
            raise TypeError("a Try is answered with its Outcome")
        if outcome.answered:
            plan.answered(index, admission, outcome.started)
            return HandOver(index, resend)
        judged = plan.judge(index, admission, outcome, resend=resend)
        if judged.verdict is Verdict.FINAL:
            receipt = plan.finish(index, outcome.receipt, recorded=True)
            headers = plan.final_headers(passed_back(outcome.headers), index)
            return GiveBack(outcome.status or 502, tuple(headers), outcome.body, receipt)
        if judged.verdict is not Verdict.RESEND or resend:
            return None
        log.info(
            "llm402 router: the answer after a payment on %s was lost; re-sending the same payment once",
            plan.router.routes[index].name,
        )
        resend, admission = True, None


def _give_up(plan: CallPlan) -> GiveBack | Reraise:
    """No route answered: the last failure as it came (with ``x-should-retry: false``), its exception when no payment
    went out, or the router's own 502 (routes tried) / 503 (none could be)."""
    receipt = plan.finish(None, None)
    last = plan.last_failure
    if isinstance(last, BaseException) and not plan.paid:
        return Reraise(last, receipt)
    if isinstance(last, Failure):
        return GiveBack(last.status, tuple(plan.final_headers(last.headers, None)), last.body, receipt)
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
    headers = (("content-type", "application/json"), ("x-should-retry", "false"))
    return GiveBack(502 if tried else 503, headers, json.dumps(body).encode(), receipt)
