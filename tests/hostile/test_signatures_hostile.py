"""One signature per logical call, whatever a gateway or a retry layer does (issue 17, DESIGN invariants 2 and 7).

Each test runs a real hostile gateway on 127.0.0.1 and counts the authorizations it received."""

from __future__ import annotations

import json
import threading

import openai
import pytest
from hostile_gateway import HostileGateway, Seen, b64, challenge_v2, chat_answer

from llm402 import Gateway, Policy, Wallet
from llm402.errors import PaidAnswerLost
from llm402.openai import refusal_from_error
from llm402.pricing import ModelPrice

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
PRICE = 5000


def client(gw: Gateway, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), **kw)  # type: ignore[arg-type]


def ask(gw: Gateway, **kw: object) -> object:
    return client(gw, max_retries=0, **kw).chat.completions.create(model="m", messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]


class SettleThen500:
    """Settles every new authorization, then answers 500; a re-sent one gets x402's nonce-already-used 402."""

    def __init__(self) -> None:
        self.settled: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        payment = seen.payment
        if payment is None:
            return 402, challenge_v2(PRICE), b"{}"
        with self.lock:
            if payment in self.settled:
                body = {"x402Version": 2, "error": "invalid_exact_evm_nonce_already_used", "accepts": []}
                return 402, {"PAYMENT-REQUIRED": b64(body)}, b"{}"
            self.settled.append(payment)
        return 500, {"content-type": "application/json"}, b'{"error": {"message": "upstream died after settling"}}'


def test_settle_then_500_five_retries_sign_once_and_each_is_paid_answer_lost() -> None:
    script = SettleThen500()
    with HostileGateway(script) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy())
        with pytest.raises(openai.InternalServerError):
            ask(gw)
        for _ in range(5):  # a plain retry loop around an unchanged client
            with pytest.raises(openai.APIStatusError) as info:
                ask(gw)
            refusal = refusal_from_error(info.value)
            assert isinstance(refusal, PaidAnswerLost), refusal
        assert len(set(hostile.payments())) == 1
        assert len(script.settled) == 1
    assert sum(r.cost for r in gw.receipts()) == PRICE  # counted once, by the call that signed it


def test_the_sdk_retry_layer_cannot_make_a_second_signature() -> None:
    script = SettleThen500()
    with HostileGateway(script) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy())
        for _ in range(3):
            with pytest.raises(openai.APIStatusError):
                client(gw, max_retries=3).chat.completions.create(model="m", messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]
        assert len(set(hostile.payments())) == 1
        assert len(script.settled) == 1


def test_pay_again_is_explicit() -> None:
    script = SettleThen500()
    with HostileGateway(script) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy())
        with pytest.raises(openai.InternalServerError):
            ask(gw)
        with pytest.raises(openai.InternalServerError):  # the caller said: this is a new purchase
            ask(gw, default_headers={"llm402-pay-again": "true"})
        assert len(set(hostile.payments())) == 2
        assert all("llm402-pay-again" not in s.headers for s in hostile.seen)
    assert sum(r.cost for r in gw.receipts()) == 2 * PRICE


def test_one_round_trip_a_402_after_the_prepaid_request_is_not_paid_again() -> None:
    def script(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        paid = hostile.payments(CHAT)
        if seen.payment is not None and len(paid) == 1:
            return 200, {"content-type": "application/json"}, chat_answer()
        return 402, challenge_v2(PRICE), b"{}"  # takes the up-front payment, then asks again

    with HostileGateway(script) as hostile:
        gw = Gateway(
            hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy(one_round_trip=True)
        )
        ask(gw)
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as info:
                ask(gw)
            assert info.value.status_code == 402
        # the first call's payment and one prepaid authorization (re-sent by the retries): never a third
        assert len(set(hostile.payments())) == 2
    counted = sum(r.cost for r in gw.receipts())
    assert counted >= PRICE


def test_one_round_trip_a_redirect_after_the_prepaid_request_is_not_followed() -> None:
    with HostileGateway(lambda seen: (200, {}, chat_answer())) as elsewhere:

        def script(seen: Seen) -> tuple[int, dict[str, str], bytes]:
            if seen.payment is not None and len(hostile.payments(CHAT)) == 1:
                return 200, {"content-type": "application/json"}, chat_answer()
            if seen.payment is not None:
                return 307, {"location": elsewhere.url + CHAT}, b""
            return 402, challenge_v2(PRICE), b"{}"

        with HostileGateway(script) as hostile:
            gw = Gateway(
                hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy(one_round_trip=True)
            )
            ask(gw)
            with pytest.raises(openai.APIStatusError) as info:
                ask(gw)
            assert refusal_from_error(info.value).code == "payment_redirected"  # type: ignore[union-attr]
            assert len(set(hostile.payments())) == 2
        assert elsewhere.seen == []
    assert sum(r.cost for r in gw.receipts()) == 2 * PRICE  # the redirected authorization may have settled


def test_a_minted_key_never_follows_a_redirect_to_another_origin() -> None:
    minted = "sk-" + "k" * 48
    with HostileGateway(lambda seen: (200, {"content-type": "application/json"}, chat_answer())) as elsewhere:

        def script(seen: Seen) -> tuple[int, dict[str, str], bytes]:
            if seen.path == "/v1/topup":
                body = {"accepts": [{**json.loads(b64_req())["accepts"][0]}]}
                return 402, {"content-type": "application/json"}, json.dumps(body).encode()
            if seen.path == "/v1/auth/keys":
                return 200, {"content-type": "application/json"}, json.dumps({"key": minted}).encode()
            return 307, {"location": elsewhere.url + CHAT}, b""

        with HostileGateway(script) as hostile:
            gw = Gateway(
                hostile.url + "/v1",
                wallet=Wallet.create(),
                profile="token-kiosk",
                ledger="memory://",
                policy=Policy(),
                prices={"m": ModelPrice.from_usd("1", "1")},
            )
            ask(gw)
            assert any(s.headers.get("authorization") == f"Bearer {minted}" for s in hostile.seen)
        assert len(elsewhere.seen) == 1
        assert minted not in json.dumps(elsewhere.seen[0].headers)


def b64_req() -> str:
    import base64

    return base64.b64decode(challenge_v2(1_000_000)["PAYMENT-REQUIRED"]).decode()


def test_the_payment_identifier_a_gateway_declares_is_sent_and_kept_across_retries() -> None:
    import base64 as _b64

    declared = {"payment-identifier": {"info": {"required": False}, "schema": {"type": "object"}}}
    script = SettleThen500()

    def gateway(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.payment is None:
            return 402, challenge_v2(PRICE, extensions=declared), b"{}"
        return script(seen)

    with HostileGateway(gateway) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy())
        with pytest.raises(openai.InternalServerError):
            ask(gw)
        with pytest.raises(openai.APIStatusError):
            ask(gw)
        sent = [json.loads(_b64.b64decode(p)) for p in hostile.payments()]
    ids = {p["extensions"]["payment-identifier"]["info"]["id"] for p in sent}
    assert len(sent) == 2 and len(ids) == 1  # the retry carried the same payment and so the same id
    assert next(iter(ids)).startswith("pay_")


class RefuseThenShow:
    """Settles every new authorization but answers 402 without saying so; a re-sent one then gets ``then``."""

    def __init__(self, then: str) -> None:
        self.settled: list[str] = []
        self.then = then

    def __call__(self, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.payment is None:
            return 402, challenge_v2(PRICE), b"{}"
        if seen.payment not in self.settled:
            self.settled.append(seen.payment)  # it moved the money, and claims it could not
            body = {"x402Version": 2, "error": "facilitator_unavailable", "accepts": []}
            return 402, {"PAYMENT-REQUIRED": b64(body)}, b"{}"
        if self.then == "redirect":
            return 307, {"location": "http://127.0.0.1:9/elsewhere"}, b""
        body = {"x402Version": 2, "error": "invalid_exact_evm_nonce_already_used", "accepts": []}
        return 402, {"PAYMENT-REQUIRED": b64(body)}, b"{}"


@pytest.mark.parametrize("then", ["nonce_already_used", "redirect"])
def test_a_refused_payment_shown_settled_on_a_retry_is_counted_once(then: str) -> None:
    import time as _time

    from llm402.budget.base import receipt_day

    script = RefuseThenShow(then)
    with HostileGateway(script) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy())
        for _ in range(3):
            with pytest.raises(openai.APIStatusError):
                ask(gw)
        assert len(set(hostile.payments())) == 1
    assert len(script.settled) == 1
    totals = gw.ledger.totals(gw.agent, receipt_day(_time.time()))
    assert totals.day_spent == PRICE  # what moved is spent, once
    assert totals.day_reserved == 0  # and the first call's exposure was released, not left beside it
    assert sum(r.cost for r in gw.receipts()) == PRICE
