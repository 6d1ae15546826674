"""The router's decisions without I/O: `fallback_flow` fed outcomes by hand, one test per branch.

No server runs and no request is sent: the gateways point at a port nobody listens on, and nothing here sends.
"""

from __future__ import annotations

import json

import httpx
import pytest
from tenacity import stop_after_attempt, wait_fixed

from llm402 import Gateway, Policy, Wallet
from llm402.errors import REFUSAL_HEADER
from llm402.receipts import PaymentRecord, Receipt
from llm402.router import ROUTE_HEADER, CircuitBreaker, FallbackRules, RetryPolicy, Route, Router
from llm402.router.flow import Flow, GiveBack, HandOver, Reraise, Try, Wait, fallback_flow
from llm402.router.plan import CallPlan, Outcome, local_refusal

MESSAGES = [{"role": "user", "content": "hi"}]


def make_router(**kw: object) -> Router:
    """Routes A and B on one gateway (one ledger, one agent); two passes, half a second apart."""
    gateway = Gateway(
        "http://127.0.0.1:9/v1", wallet=Wallet.create(), policy=Policy(max_payment_usd="0.05"), ledger="memory://"
    )
    kw.setdefault("retry", RetryPolicy(stop=stop_after_attempt(2), wait=wait_fixed(0.5)))
    return Router([Route(gateway, "m-a", name="A"), Route(gateway, "m-b", name="B")], **kw)  # type: ignore[arg-type]


def start(router: Router, **body: object) -> tuple[CallPlan, Flow, Try | Wait | HandOver | GiveBack | Reraise]:
    data = json.dumps({"model": "x", "messages": MESSAGES, **body}).encode()
    plan = CallPlan(router, "POST", f"{router.base_url}/chat/completions", [("content-type", "application/json")], data)
    flow = fallback_flow(plan)
    return plan, flow, next(flow)


def receipt(error: str | None = None, *, paid: bool = False, status: int | None = 402) -> Receipt:
    payment = PaymentRecord("exact", "eip155:84532", "0xasset", 1_000, "0xpayer", "0xpayee") if paid else None
    return Receipt(
        call_id="c1",
        agent="agent",
        intent=None,
        gateway="http://127.0.0.1:9/v1",
        method="POST",
        path="/chat/completions",
        model="m-a",
        status=status,
        streamed=False,
        started_at=0.0,
        latency_ms=1.0,
        cost=1_000 if paid else 0,
        payment=payment,
        error=error,
    )


def answer(status: int, body: bytes = b"{}", *, headers: dict[str, str] | None = None, **kw: object) -> Outcome:
    return Outcome(0.0, 1.0, status, httpx.Headers(headers or {}), body, **kw)  # type: ignore[arg-type]


def lost(error: BaseException | None = None, **kw: object) -> Outcome:
    return Outcome(0.0, 1.0, error=error or httpx.ReadTimeout("lost"), **kw)  # type: ignore[arg-type]


REFUSED = {REFUSAL_HEADER: "budget_exceeded", "content-type": "application/json"}
ENVELOPE = json.dumps({"error": {"code": "budget_exceeded", "type": "llm402_refusal", "cap_name": "global"}}).encode()


def test_the_first_route_is_tried_first() -> None:
    _, _, action = start(make_router())
    assert action == Try(0)


def test_an_answer_is_handed_over_and_the_route_counts_as_working() -> None:
    router = make_router()
    _, flow, _ = start(router)
    assert flow.send(answer(200)) == HandOver(0)
    assert router.status()[0]["state"] == "closed"


def test_a_server_error_moves_on_to_the_next_route() -> None:
    plan, flow, _ = start(make_router())
    assert flow.send(answer(500)) == Try(1)
    assert [(a["route"], a["error"]) for a in plan.attempts] == [("A", "http_500")]


def test_the_requests_own_fault_is_given_back_as_it_came() -> None:
    _, flow, _ = start(make_router())
    end = flow.send(answer(400, b'{"error": "bad request"}', receipt=receipt("http_400", status=400)))
    assert isinstance(end, GiveBack)
    assert (end.status, end.body, end.receipt.route) == (400, b'{"error": "bad request"}', "A")
    assert ("x-should-retry", "false") in end.headers and (ROUTE_HEADER, "A") in end.headers


@pytest.mark.parametrize("code", ["paid_answer_lost", "payment_outcome_unknown"])  # settled shown, or not
def test_a_payment_whose_answer_was_lost_is_resent_once_on_the_same_route_then_moves_on(code: str) -> None:
    plan, flow, _ = start(make_router())
    assert flow.send(lost(receipt=receipt(paid=True))) == Try(0, resend=True)
    assert flow.send(answer(402, receipt=receipt(code))) == Try(1)
    assert plan.paid


def test_a_pass_without_an_answer_waits_then_starts_again() -> None:
    _, flow, _ = start(make_router())
    assert flow.send(answer(503)) == Try(1)
    assert flow.send(answer(503)) == Wait(0.5)
    assert flow.send(None) == Try(0)


def test_a_retry_after_longer_than_the_backoff_is_waited() -> None:
    _, flow, _ = start(make_router(clock=lambda: 0.0))  # the clock stands still: the hold is still running
    flow.send(answer(429, headers={"retry-after": "2"}))
    end = flow.send(answer(429, headers={"retry-after": "2"}))
    assert end == Wait(2.0)


def test_when_passes_run_out_the_last_failure_is_given_back() -> None:
    _, flow, _ = start(make_router())
    for outcome in (answer(503), answer(503)):
        flow.send(outcome)
    flow.send(None)
    flow.send(answer(500))
    end = flow.send(answer(502, b"upstream down"))
    assert isinstance(end, GiveBack) and (end.status, end.body) == (502, b"upstream down")
    assert end.receipt.route is None and end.receipt.error == "http_502"
    assert ("x-should-retry", "false") in end.headers


def test_an_exception_with_no_payment_out_is_reraised() -> None:
    _, flow, _ = start(make_router(retry=RetryPolicy(stop=stop_after_attempt(1))))
    flow.send(lost(httpx.ConnectError("refused")))
    error = httpx.ConnectError("refused again")
    end = flow.send(lost(error))
    assert isinstance(end, Reraise) and end.error is error and end.receipt.error == "ConnectError"


def test_no_route_fitting_the_request_is_the_routers_own_503() -> None:
    gateway = Gateway(
        "http://127.0.0.1:9/v1", wallet=Wallet.create(), policy=Policy(max_payment_usd="0.05"), ledger="memory://"
    )
    router = Router([Route(gateway, "m", name="A", tools=False)])
    _, _, end = start(router, tools=[{"type": "function", "function": {"name": "f"}}])
    assert isinstance(end, GiveBack) and end.status == 503
    assert json.loads(end.body)["error"]["code"] == "no_route_available"


def test_a_local_refusal_that_does_not_fall_back_is_final() -> None:
    _, flow, _ = start(make_router(fallback=FallbackRules(refusals=frozenset({"payment_over_ticket"}))))
    local = receipt("budget_exceeded")
    end = flow.send(answer(402, ENVELOPE, headers=REFUSED, receipt=local, local=local))
    assert isinstance(end, GiveBack) and end.status == 402 and end.receipt.error == "budget_exceeded"


def test_a_local_budget_refusal_skips_the_routes_under_the_same_cap() -> None:
    plan, flow, _ = start(make_router())
    local = receipt("budget_exceeded")
    end = flow.send(answer(402, ENVELOPE, headers=REFUSED, receipt=local, local=local))
    assert isinstance(end, GiveBack) and end.status == 402  # B books into the same ledger: skipped, nothing left
    assert [(a["route"], a["error"], bool(a.get("skipped"))) for a in plan.attempts] == [
        ("A", "budget_exceeded", False),
        ("B", "budget_exceeded", True),
    ]


def test_a_gateways_refusal_envelope_is_a_gateway_402() -> None:
    """The same answer with no local receipt behind it: neither final nor a cap block; the next route is tried."""
    plan, flow, _ = start(make_router(fallback=FallbackRules(refusals=frozenset({"payment_over_ticket"}))))
    assert flow.send(answer(402, ENVELOPE, headers=REFUSED, receipt=receipt("http_402"))) == Try(1)
    assert [(a["route"], a["error"]) for a in plan.attempts] == [("A", "http_402")]


def test_a_refusal_header_on_a_server_error_is_a_server_error() -> None:
    router = make_router(breaker=CircuitBreaker(failures=1))
    _, flow, _ = start(router)
    assert flow.send(answer(500, ENVELOPE, headers=REFUSED)) == Try(1)
    assert router.status()[0]["state"] == "open", "it counts against the route's circuit, unlike a local refusal"


def test_only_a_receipt_finished_before_the_response_came_back_vouches_for_a_refusal() -> None:
    headers = {REFUSAL_HEADER: "budget_exceeded"}
    assert local_refusal(headers, receipt("budget_exceeded")) == "budget_exceeded"
    assert local_refusal(headers, None) is None  # the gateway's own answer: its receipt came only after its body
    assert local_refusal(headers, receipt("payment_over_ticket")) is None  # a different refusal than the header's
    assert local_refusal({}, receipt("budget_exceeded")) is None
