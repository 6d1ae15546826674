"""The call flow as a state machine, driven directly: scripted replies are fed into the generator, no HTTP.

One test per invariant and per branch that signs or counts money (h11's way: feed events, read actions)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import pytest

from llm402.budget.base import Caps
from llm402.core import (
    Answer,
    AwaitRelease,
    CallRequest,
    CurrentKey,
    Deliver,
    Effect,
    Expose,
    Finish,
    FlowConfig,
    Grow,
    Head,
    KeepSignedIn,
    LoadPrices,
    NotePayment,
    Reserve,
    Send,
    Sign,
    SignIn,
    StreamEnd,
    call_flow,
    describe_request,
)
from llm402.credit import CreditProfile
from llm402.errors import BudgetExceeded, ReservationHeld, refusal_from_envelope
from llm402.metering import Usage
from llm402.policy import Policy
from llm402.pricing import ModelPrice, PriceCatalog
from llm402.x402 import SignedPayment

URL = "http://127.0.0.1:9/v1/chat/completions"
PAYER = "0xCdCDCdCdcdcdcdCdcDcDCdcDcDCdCdcdCdcDCDcD"
ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAYEE = "0x" + "ab" * 20
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def b64(data: object) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


def entry(amount: int = 5000, scheme: str = "exact", **extra: object) -> dict[str, Any]:
    return {
        "scheme": scheme,
        "network": "eip155:84532",
        "asset": ASSET,
        "amount": str(amount),
        "payTo": PAYEE,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2", **extra},
    }


def v2_402(*entries: dict[str, Any], **more: Any) -> Head:
    challenge = {"x402Version": 2, "resource": {"url": URL}, "accepts": list(entries) or [entry()], **more}
    return Head(402, {"payment-required": b64(challenge)}, b"{}")


def kiosk_402(amount: int = 5000) -> Head:
    return Head(402, {"content-type": "application/json"}, json.dumps({"accepts": [entry(amount)]}).encode())


def v1_402(amount: int = 5000) -> Head:
    legacy = {
        "scheme": "exact",
        "network": "base-sepolia",
        "maxAmountRequired": str(amount),
        "resource": URL,
        "description": "",
        "mimeType": "application/json",
        "payTo": PAYEE,
        "maxTimeoutSeconds": 60,
        "asset": ASSET,
        "extra": {"name": "USDC", "version": "2"},
    }
    return Head(402, {}, json.dumps({"x402Version": 1, "accepts": [legacy]}).encode())


OK = Head(200, {"content-type": "application/json"})
USAGE = StreamEnd(Usage(prompt_tokens=10, completion_tokens=5))


@dataclass
class Script:
    """Replies to the flow's effects: HTTP answers from a queue, everything else by type."""

    answers: list[Head | BaseException]
    end: StreamEnd = USAGE
    reserve_error: BaseException | None = None
    signed: list[SignedPayment] = field(default_factory=list)
    extra: dict[type, Callable[[Any], Any]] = field(default_factory=dict)

    def __call__(self, effect: Effect) -> Any:
        if type(effect) in self.extra:
            return self.extra[type(effect)](effect)
        if isinstance(effect, Send):
            answer = self.answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        if isinstance(effect, Sign):
            payment = SignedPayment(
                effect.challenge.dialect.replay_header,
                f"signed-{len(self.signed)}",
                effect.requirement,
                PAYER,
                f"0x{len(self.signed):064x}",
                2_000_000_000,
            )
            self.signed.append(payment)
            return payment
        if isinstance(effect, Reserve) and self.reserve_error is not None:
            raise self.reserve_error
        if isinstance(effect, Deliver):
            return self.end
        if isinstance(effect, SignIn):
            return {"sign-in-with-x": "proof"}
        return None


def drive(flow: Generator[Effect, Any, None], script: Script) -> list[Effect]:
    """Run ``flow`` to its end, answering each effect from ``script``; the effects, in order."""
    effects: list[Effect] = []
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration:
            return effects
        effects.append(effect)
        value, error = None, None
        try:
            value = script(effect)
        except Exception as exc:
            error = exc


def config(policy: Policy | None = None, **kw: Any) -> FlowConfig:
    cfg = FlowConfig(
        agent="a",
        intent=None,
        policy=policy or Policy(max_payment_usd="0.05"),
        payer=PAYER,
        base_url="http://127.0.0.1:9/v1",
        clock=lambda: 1_000_000.0,
        **kw,
    )
    counter = iter(range(10_000))
    cfg.new_id = lambda: f"call-{next(counter)}"
    return cfg


def request(body: dict[str, Any] = BODY, url: str = URL) -> CallRequest:
    return describe_request("POST", url, "application/json", json.dumps(body).encode())


def of(effects: list[Effect], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def answer_code(effects: list[Effect]) -> str | None:
    answers = of(effects, Answer)
    assert len(answers) == 1
    refusal = refusal_from_envelope(answers[0].body)
    return None if refusal is None else refusal.code


def test_an_unpaid_answer_reserves_sends_delivers_and_counts_its_usage() -> None:
    cfg = config(prices=PriceCatalog({"m": ModelPrice.from_usd("1", "1")}))
    effects = drive(call_flow(cfg, request()), Script([OK]))
    assert [type(e) for e in effects] == [Reserve, Send, Deliver, Finish]
    reserve, finish = of(effects, Reserve)[0], of(effects, Finish)[0]
    assert reserve.hold.amount > 0 and reserve.hold.expires_at >= 1_000_000.0 + cfg.hold_seconds
    assert finish.actual == 15  # 15 tokens at $1 per million


@pytest.mark.parametrize(
    ("head", "header"), [(v2_402(), "PAYMENT-SIGNATURE"), (v1_402(), "X-PAYMENT"), (kiosk_402(), "X-Payment")]
)
def test_each_402_dialect_grows_signs_once_exposes_and_replays_once(head: Head, header: str) -> None:
    effects = drive(call_flow(config(), request()), Script([head, OK]))
    kinds = [type(e) for e in effects]
    assert kinds == [Reserve, Send, Grow, Sign, NotePayment, Expose, Send, Deliver, NotePayment, Finish]
    assert of(effects, Grow)[0].amount == 5000  # grown to the quote before signing
    replay = of(effects, Send)[1]
    assert replay.headers[header] == "signed-0"
    deliver = of(effects, Deliver)[0]
    assert deliver.headers["x-should-retry"] == "false"
    assert of(effects, Finish)[0].actual == 5000
    assert [n.state for n in of(effects, NotePayment)] == ["signed", "answered"]


def test_a_policy_refusal_sends_nothing_and_reserves_nothing() -> None:
    effects = drive(call_flow(config(Policy(allowed_intents=frozenset({"x"}))), request()), Script([]))
    assert [type(e) for e in effects] == [Finish, Answer]
    assert of(effects, Finish)[0].reserved is False
    assert answer_code(effects) == "intent_not_allowed"


def test_a_budget_refusal_at_reserve_sends_nothing() -> None:
    refusal = BudgetExceeded("no room", cap_name="daily", cap=1, spent=1, reserved=0, requested=1)
    effects = drive(call_flow(config(), request()), Script([], reserve_error=refusal))
    assert of(effects, Send) == []
    assert answer_code(effects) == "budget_exceeded"


def test_a_quote_over_the_ticket_is_never_signed() -> None:
    effects = drive(call_flow(config(), request()), Script([v2_402(entry(10**9))]))
    assert of(effects, Sign) == [] and of(effects, Grow) == []
    assert answer_code(effects) == "payment_over_ticket"
    assert of(effects, Finish)[0].actual == 0


def test_a_second_402_is_never_paid_and_the_payment_stays_resendable() -> None:
    effects = drive(call_flow(config(), request()), Script([v2_402(), v2_402(entry(4000))]))
    assert len(of(effects, Sign)) == 1
    assert answer_code(effects) == "payment_rejected"
    finish = of(effects, Finish)[0]
    assert finish.actual == 0 and finish.outstanding is None  # exposure stays until validBefore
    assert of(effects, NotePayment)[-1].state == "unknown"


def test_a_402_showing_the_payment_settled_is_paid_answer_lost_and_counted() -> None:
    report = b64(
        {
            "success": False,
            "errorReason": "settlement_pending",
            "transaction": "0xabc",
            "network": "eip155:84532",
            "payer": PAYER,
        }
    )
    pending = Head(402, {"payment-response": report, "payment-required": v2_402().headers["payment-required"]})
    effects = drive(call_flow(config(), request()), Script([v2_402(), pending]))
    assert answer_code(effects) == "paid_answer_lost"
    assert of(effects, Finish)[0].actual == 5000
    assert of(effects, NotePayment)[-1] == NotePayment(request().fingerprint, "settled", transaction="0xabc")


def test_a_redirect_after_paying_is_not_followed_and_counts_the_payment() -> None:
    moved = Head(307, {"location": "http://elsewhere/v1/chat/completions"})
    effects = drive(call_flow(config(), request()), Script([v2_402(), moved]))
    assert answer_code(effects) == "payment_redirected"
    assert of(effects, Finish)[0].actual == 5000


def test_a_lost_paid_answer_counts_the_payment_and_reraises() -> None:
    flow = call_flow(config(), request())
    with pytest.raises(TimeoutError):
        drive(flow, Script([v2_402(), TimeoutError("stalled")]))


def test_a_lost_paid_answer_is_finished_as_spent_before_the_error_escapes() -> None:
    effects: list[Effect] = []
    script = Script([v2_402(), TimeoutError("stalled")])

    def record(effect: Effect) -> Any:
        effects.append(effect)
        return script(effect)

    with pytest.raises(TimeoutError):
        drive(
            call_flow(config(), request()),
            Script([], extra=dict.fromkeys((Reserve, Send, Grow, Sign, NotePayment, Expose, Finish), record)),
        )
    assert of(effects, Finish)[0].actual == 5000
    assert of(effects, NotePayment)[-1].state == "unknown"


def test_a_retry_resends_the_outstanding_payment_and_signs_nothing() -> None:
    cfg = config()
    first = Script([v2_402(), TimeoutError("lost")])
    with pytest.raises(TimeoutError):
        drive(call_flow(cfg, request()), first)
    cfg.payments.remember(request().fingerprint, first.signed[0], "call-0", 1_000_000.0)
    cfg.payments.mark_unknown(request().fingerprint, counted=True)  # what the engine notes for a lost answer
    effects = drive(call_flow(cfg, request()), Script([OK]))
    assert of(effects, Sign) == []
    assert of(effects, Reserve)[0].hold.amount == 0  # the first attempt counted it
    assert of(effects, Send)[0].headers["PAYMENT-SIGNATURE"] == "signed-0"
    assert of(effects, Finish)[0].actual == 0


def test_pay_again_signs_a_new_payment_on_purpose() -> None:
    cfg = config()
    first = Script([v2_402(), TimeoutError("lost")])
    with pytest.raises(TimeoutError):
        drive(call_flow(cfg, request()), first)
    cfg.payments.remember(request().fingerprint, first.signed[0], "call-0", 1_000_000.0)
    cfg.payments.mark_unknown(request().fingerprint)
    again = describe_request("POST", URL, "application/json", json.dumps(BODY).encode(), pay_again=True)
    effects = drive(call_flow(cfg, again), Script([v2_402(), OK]))
    assert len(of(effects, Sign)) == 1


def test_upto_reconciles_to_a_report_for_this_payer_and_releases_the_rest() -> None:
    upto = entry(50_000, "upto", assetTransferMethod="permit2", facilitatorAddress="0x" + "fa" * 20)
    report = b64({"success": True, "transaction": "0x1", "network": "eip155:84532", "payer": PAYER, "amount": "1234"})
    effects = drive(call_flow(config(), request()), Script([v2_402(upto), Head(200, {"payment-response": report})]))
    finish = of(effects, Finish)[0]
    assert finish.actual == 1234 and finish.outstanding == 0


def test_upto_without_a_usable_report_counts_the_ceiling() -> None:
    upto = entry(50_000, "upto", assetTransferMethod="permit2", facilitatorAddress="0x" + "fa" * 20)
    report = b64({"success": True, "transaction": "0x1", "amount": "1"})  # no payer, no network
    effects = drive(call_flow(config(), request()), Script([v2_402(upto), Head(200, {"payment-response": report})]))
    assert of(effects, Finish)[0].actual == 50_000


def test_an_unpriced_metered_call_under_a_cap_loads_prices_then_refuses_before_traffic() -> None:
    effects = drive(call_flow(config(Policy(), metered=True), request()), Script([]))
    assert [type(e) for e in effects] == [LoadPrices, Finish, Answer]
    assert answer_code(effects) == "price_unknown"


def kiosk_config(**policy: Any) -> FlowConfig:
    return config(
        Policy(max_payment_usd="1", daily_cap_usd="5", **policy),
        metered=True,
        prices=PriceCatalog({"m": ModelPrice.from_usd("1", "1")}),
        credit=CreditProfile(),
        api_key="sk-x",
    )


INSUFFICIENT = Head(402, {}, b'{"error": {"code": "INSUFFICIENT_BALANCE"}}')


def test_a_topup_is_reserved_under_its_own_limit_signed_exposed_and_settled_before_the_replay() -> None:
    script = Script([INSUFFICIENT, kiosk_402(1_000_000), OK, OK], extra={CurrentKey: lambda e: "sk-x"})
    effects = drive(call_flow(kiosk_config(), request()), script)
    lease = of(effects, Reserve)[1]
    assert lease.hold.agent == "a#topup" and lease.hold.amount == 1_000_000
    assert lease.caps == Caps(daily=5_000_000)
    assert of(effects, Expose)[0].call_id == lease.hold.call_id
    topup_finish = of(effects, Finish)[0]
    assert topup_finish.call_id == lease.hold.call_id and topup_finish.actual == 1_000_000
    assert topup_finish.receipt.payment is not None and topup_finish.receipt.payment.kind == "topup"
    assert len(of(effects, Sign)) == 1
    assert of(effects, Finish)[-1].actual == 15  # the call itself: metered usage


def test_a_topup_above_the_topup_limit_is_refused_unsigned() -> None:
    script = Script([INSUFFICIENT], extra={CurrentKey: lambda e: "sk-x"})
    effects = drive(call_flow(kiosk_config(topup_max_usd="0.5"), request()), script)
    assert of(effects, Sign) == []
    assert answer_code(effects) == "topup_refused"


def test_a_topup_in_flight_elsewhere_is_awaited_and_reused() -> None:
    def reserve(effect: Reserve) -> None:
        if effect.hold.call_id.startswith("topup:"):
            raise ReservationHeld("held")

    script = Script(
        [INSUFFICIENT, OK], extra={CurrentKey: lambda e: "sk-x", Reserve: reserve, AwaitRelease: lambda e: True}
    )
    effects = drive(call_flow(kiosk_config(), request()), script)
    assert of(effects, Sign) == []
    assert len(of(effects, AwaitRelease)) == 1
    assert of(effects, Deliver)


def test_sign_in_with_x_is_tried_alone_once_this_wallet_paid_there() -> None:
    cfg = config()
    siwx = {"sign-in-with-x": {"info": {"domain": "127.0.0.1:9"}}}
    effects = drive(call_flow(cfg, request()), Script([v2_402(extensions=siwx), OK]))
    assert of(effects, SignIn) == []  # a first payment goes alone
    noted = of(effects, KeepSignedIn)[0]
    cfg.signed_in.add((noted.origin, noted.payer))  # what the engine does with KeepSignedIn
    effects = drive(call_flow(cfg, request()), Script([v2_402(extensions=siwx), OK]))
    assert len(of(effects, SignIn)) == 1 and of(effects, Sign) == []
    assert of(effects, Send)[1].headers["sign-in-with-x"] == "proof"


def test_a_payment_refused_then_taken_on_a_retry_is_counted_by_the_retry() -> None:
    cfg = config()
    first = Script([v2_402(), v2_402(error="facilitator_unavailable")])
    effects = drive(call_flow(cfg, request()), first)
    assert answer_code(effects) == "payment_rejected" and of(effects, Finish)[0].actual == 0
    cfg.payments.remember(request().fingerprint, first.signed[0], "call-0", 1_000_000.0)
    cfg.payments.mark_unknown(request().fingerprint)  # refused: only exposure, not counted
    effects = drive(call_flow(cfg, request()), Script([OK]))
    assert of(effects, Sign) == []
    assert of(effects, Finish)[0].actual == 5000  # the retry counts what moved
    releases = [e for e in effects if type(e).__name__ == "Release"]
    assert [r.call_id for r in releases] == ["call-0"]  # and the first call's exposure is released, not doubled


def test_a_policy_in_code_raises_the_same_clear_error_as_a_file() -> None:
    from llm402.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="typo: Extra inputs are not permitted"):
        Policy(typo=1)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="alert_at"):
        Policy(alert_at=["1.5"])  # type: ignore[list-item]


def test_a_404_is_model_not_found_only_when_the_gateway_says_so() -> None:
    from llm402.errors import GatewayNotFound, ModelNotFound, gateway_error

    model = gateway_error(404, b'{"error": {"code": "model_not_found", "message": "no such model: x"}}')
    path = gateway_error(404, b'{"detail": "Not Found"}')
    assert isinstance(model, ModelNotFound)
    assert isinstance(path, GatewayNotFound) and not isinstance(path, ModelNotFound)


def test_a_transport_error_on_the_key_mint_still_finishes_the_call() -> None:
    cfg = config(
        Policy(max_payment_usd="1"),
        credit=CreditProfile(chain_id=84532),
        mint_keys=True,
        metered=True,
        prices=PriceCatalog({"m": ModelPrice.from_usd("1", "1")}),
    )
    script = Script([ConnectionError("mint endpoint down")], extra={CurrentKey: lambda e: None})
    effects: list[Effect] = []

    def record(effect: Effect) -> Any:
        effects.append(effect)
        return script(effect)

    with pytest.raises(ConnectionError):
        drive(call_flow(cfg, request()), record)  # type: ignore[arg-type]
    finishes = [e for e in effects if isinstance(e, Finish)]
    assert [f.call_id for f in finishes] == ["call-0"]  # the call's own reservation is settled, with its receipt
    assert finishes[0].receipt.error == "ConnectionError"
    assert [type(e) for e in effects if isinstance(e, Send)] == [Send]  # the mint's one request, nothing else
