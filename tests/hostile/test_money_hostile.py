"""Nothing signed above policy, nothing spent uncounted, whatever a gateway says (issue 16, DESIGN invariants 1, 3,
4 and 9). Each test runs a real hostile gateway on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from hostile_gateway import (
    ASSET,
    NETWORK,
    PAYEE,
    HostileGateway,
    Seen,
    accepts,
    b64,
    challenge_v2,
    chat_answer,
    settlement,
)

from llm402 import Gateway, Policy, Wallet
from llm402.budget.base import receipt_day, topup_agent
from llm402.openai import refusal_from_error, typed_error
from llm402.pricing import ModelPrice

CHAT = "/v1/chat/completions"
TOPUP = "/v1/topup"
MESSAGES = [{"role": "user", "content": "hi"}]
USD = 1_000_000
PRICES = {"m": ModelPrice.from_usd("1", "1")}


def client(gw: Gateway, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), max_retries=0, **kw)


def ask(gw: Gateway, **kw: Any) -> Any:
    return client(gw).chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, **kw)


def refusal_code(gw: Gateway, **kw: Any) -> str | None:
    with pytest.raises(openai.APIStatusError) as info:
        ask(gw, **kw)
    refusal = refusal_from_error(info.value)
    return refusal.code if refusal is not None else None


class EndlessCredit:
    """A credit gateway that always wants more: every call is INSUFFICIENT_BALANCE, every top-up is taken."""

    def __init__(self, minimum: int = USD) -> None:
        self.minimum = minimum
        self.topups: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.path == TOPUP:
            asked = int(float(seen.json()["amount"]) * USD)
            if seen.payment is None:
                entry = accepts(max(asked, self.minimum), assetTransferMethod="eip3009")
                return 402, {"content-type": "application/json"}, json.dumps({"accepts": [entry]}).encode()
            with self.lock:
                self.topups.append(json.loads(__import__("base64").b64decode(seen.payment))["accepted"]["amount"])
            return 200, {"content-type": "application/json"}, b'{"ok": true}'
        body = {"error": {"code": "INSUFFICIENT_BALANCE", "message": "top up first"}}
        return 402, {"content-type": "application/json"}, json.dumps(body).encode()


def kiosk(url: str, policy: Policy, **kw: Any) -> Gateway:
    return Gateway(
        url + "/v1",
        wallet=Wallet.create(),
        profile="token-kiosk",
        api_key="sk-test",
        ledger="memory://",
        policy=policy,
        prices=PRICES,
        **kw,
    )


def topup_totals(gw: Gateway) -> int:
    day = receipt_day(time.time())
    totals = gw.ledger.totals(topup_agent(gw.agent), day)
    return totals.day_spent + totals.day_reserved


def test_twelve_topup_demands_stop_at_the_daily_topup_limit() -> None:
    script = EndlessCredit()
    with HostileGateway(script) as hostile:
        gw = kiosk(hostile.url, Policy(max_payment_usd="1", daily_cap_usd="5", total_budget_usd="5"))
        codes = [refusal_code(gw) for _ in range(12)]
    assert len(script.topups) == 5  # 12 demanded: 5 signed, $5.00 counted, the cap held
    assert sum(int(a) for a in script.topups) == 5 * USD
    assert topup_totals(gw) == 5 * USD
    assert codes[:5] == ["insufficient_balance"] * 5
    assert set(codes[5:]) == {"topup_refused"}
    consumption = gw.ledger.totals(gw.agent, receipt_day(time.time()))
    assert consumption.day_spent == 0  # top-ups are not consumption (and not double counted)


def test_concurrent_calls_share_one_topup_at_a_time_within_the_limit() -> None:
    script = EndlessCredit()
    with HostileGateway(script) as hostile:
        gw = kiosk(hostile.url, Policy(max_payment_usd="1", daily_cap_usd="5"))
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: refusal_code(gw), range(8)))
    assert sum(int(a) for a in script.topups) <= 5 * USD  # 8 threads: never above the $5 limit
    assert topup_totals(gw) == sum(int(a) for a in script.topups)
    assert all(code in ("insufficient_balance", "topup_refused") for code in codes)


def test_a_topup_is_bounded_by_the_max_ticket_by_default() -> None:
    script = EndlessCredit(minimum=USD)
    with HostileGateway(script) as hostile:
        gw = kiosk(hostile.url, Policy(max_payment_usd="0.05", daily_cap_usd="5"))
        assert refusal_code(gw) == "topup_refused"  # the gateway's $1 minimum is above the $0.05 ticket
    assert script.topups == []
    assert hostile.payments() == []


def test_the_default_profile_never_buys_credit() -> None:
    script = EndlessCredit()
    with HostileGateway(script) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy(), prices=PRICES)
        for _ in range(10):
            with pytest.raises(openai.APIStatusError) as info:
                ask(gw)
            assert info.value.status_code == 402
            assert typed_error(info.value) is not None  # the gateway's refusal, typed (InsufficientCredits)
        assert hostile.count(TOPUP) == 0
    assert script.topups == []


@pytest.mark.parametrize("amount", [1_000_000 * USD, 2**255])
def test_no_policy_means_safe_limits(amount: int) -> None:
    with HostileGateway(lambda seen: (402, challenge_v2(amount), b"{}")) as hostile:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gw = Gateway(hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://")
        assert any("safe defaults" in str(w.message) for w in caught)
        assert refusal_code(gw) == "payment_over_ticket"
        assert hostile.payments() == []
    assert gw.policy.max_payment == USD
    assert gw.policy.daily_cap == 10 * USD


def models(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"object": "list", "data": list(entries)}).encode()


def test_an_unpriced_call_under_a_cap_is_refused_before_any_traffic() -> None:
    def script(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.path == "/v1/models":
            return 200, {"content-type": "application/json"}, models({"id": "other"})
        return 200, {"content-type": "application/json"}, chat_answer(1000, 1000)

    with HostileGateway(script) as hostile:
        gw = Gateway(
            hostile.url + "/v1",
            profile="plain",
            api_key="sk-x",
            ledger="memory://",
            policy=Policy(daily_cap_usd="0.000001"),
        )
        for _ in range(5):
            assert refusal_code(gw) == "price_unknown"
        assert hostile.count(CHAT) == 0
        assert 1 <= hostile.count("/v1/models") <= 2  # fetched on first use, not on every call
        lenient = Gateway(
            hostile.url + "/v1", profile="plain", api_key="sk-x", ledger="memory://", policy=Policy(allow_unpriced=True)
        )
        ask(lenient)
        assert hostile.count(CHAT) == 1


def test_published_prices_are_loaded_on_first_use_and_bind_the_cap() -> None:
    priced = {"id": "m", "promptPricePer1MTokens": "1", "completionPricePer1M": "1"}

    def script(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.path == "/v1/models":
            return 200, {"content-type": "application/json"}, models(priced)
        return 200, {"content-type": "application/json"}, chat_answer(1000, 1000)

    with HostileGateway(script) as hostile:
        gw = Gateway(
            hostile.url + "/v1",
            profile="plain",
            api_key="sk-x",
            ledger="memory://",
            policy=Policy(daily_cap_usd="0.01"),
        )
        ask(gw)
        assert gw.last_receipt is not None and gw.last_receipt.cost == 2000  # 2,000 tokens at $1 per 1M
        answered = 0
        for _ in range(10):
            try:
                ask(gw)
                answered += 1
            except openai.APIStatusError as exc:
                assert refusal_from_error(exc).code == "budget_exceeded"  # type: ignore[union-attr]
        assert sum(r.cost for r in gw.receipts()) <= 10_000


def test_a_call_that_outlives_the_reservation_ttl_is_still_counted() -> None:
    now = [1_000_000.0]
    release = threading.Event()

    def slow_stream() -> Any:
        yield b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        release.wait(10)
        usage = {"prompt_tokens": 100_000, "completion_tokens": 100_000, "total_tokens": 200_000}
        yield (
            "data: "
            + json.dumps(
                {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "m",
                    "choices": [],
                    "usage": usage,
                }
            )
            + "\n\n"
        ).encode()
        yield b"data: [DONE]\n\n"

    def script(seen: Seen) -> tuple[int, dict[str, str], Any]:
        return 200, {"content-type": "text/event-stream"}, slow_stream()

    with HostileGateway(script) as hostile:
        gw = Gateway(
            hostile.url + "/v1",
            profile="plain",
            api_key="sk-x",
            ledger="memory://",
            clock=lambda: now[0],
            policy=Policy(total_budget_usd="1"),
            prices=PRICES,
        )
        stream = client(gw).chat.completions.create(model="m", messages=MESSAGES, max_tokens=100_000, stream=True)
        chunks = iter(stream)
        next(chunks)
        now[0] += 2000.0  # the 900 s reservation TTL passes while the stream runs
        gw.ledger.recover(now[0])  # another process sweeps expired reservations
        release.set()
        for _ in chunks:
            pass
    day = receipt_day(now[0] - 2000.0)
    totals = gw.ledger.totals(gw.agent, day)
    assert gw.last_receipt is not None and gw.last_receipt.cost == 200_000
    assert totals.agent_spent == 200_000  # counted, though the call ran past the TTL


def paid_script(report: str | None, amount: int = 50_000, scheme: str = "upto") -> Any:
    def script(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.payment is None:
            entry = accepts(amount, scheme=scheme, assetTransferMethod="permit2", facilitatorAddress="0x" + "fa" * 20)
            if scheme == "exact":
                entry = accepts(amount)
            body = {"x402Version": 2, "resource": {"url": "http://x/v1/chat/completions"}, "accepts": [entry]}
            return 402, {"PAYMENT-REQUIRED": b64(body)}, b"{}"
        headers = {"content-type": "application/json"}
        if report is not None:
            headers["PAYMENT-RESPONSE"] = report
        return 200, headers, chat_answer()

    return script


@pytest.mark.parametrize(
    ("report", "counted"),
    [
        ("no-payer", 50_000),
        ("other-network", 50_000),
        ("other-asset", 50_000),
        ("other-payer", 50_000),
        ("this-payer", 1),
        ("zero", 0),
    ],
)
def test_only_a_report_for_this_payment_lowers_an_upto_ceiling(report: str, counted: int) -> None:
    wallet = Wallet.create()
    payer = wallet.address
    reports = {
        "no-payer": b64({"success": True, "transaction": "0x" + "77" * 32, "network": NETWORK, "amount": "1"}),
        "other-network": settlement(payer, 1, network="eip155:1"),
        "other-asset": settlement(payer, 1, asset="0x" + "99" * 20),
        "other-payer": settlement("0x" + "12" * 20, 1),
        "this-payer": settlement(payer, 1, asset=ASSET),
        "zero": settlement(payer, 0, transaction=""),
    }
    with HostileGateway(paid_script(reports[report])) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=wallet, ledger="memory://", policy=Policy())
        ask(gw)
        assert len(hostile.payments()) == 1
    assert gw.last_receipt is not None and gw.last_receipt.cost == counted
    totals = gw.ledger.totals(gw.agent, receipt_day(time.time()))
    assert totals.day_spent + totals.day_reserved == 50_000 if counted == 50_000 else totals.day_spent == counted


def test_settlement_pending_on_the_paid_replay_counts_the_payment() -> None:
    wallet = Wallet.create()

    def script(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.payment is None:
            return 402, challenge_v2(7000), b"{}"
        report = b64(
            {
                "success": False,
                "errorReason": "settlement_pending",
                "transaction": "0x" + "55" * 32,
                "network": NETWORK,
                "payer": wallet.address,
            }
        )
        body = {"x402Version": 2, "error": "settlement_pending", "accepts": [accepts(7000)]}
        return 402, {"PAYMENT-REQUIRED": b64(body), "PAYMENT-RESPONSE": report}, b"{}"

    with HostileGateway(script) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=wallet, ledger="memory://", policy=Policy())
        with pytest.raises(openai.APIStatusError) as info:
            ask(gw)
        refusal = refusal_from_error(info.value)
        assert refusal is not None and refusal.code == "paid_answer_lost"
        assert "settlement_pending" in refusal.message
        assert "0x" + "55" * 32 in refusal.message
        assert len(hostile.payments()) == 1
    assert gw.last_receipt is not None and gw.last_receipt.cost == 7000
    assert gw.last_receipt.payment is not None and gw.last_receipt.payment.transaction == "0x" + "55" * 32


def test_a_refused_replay_stays_counted_until_the_authorization_expires() -> None:
    def script(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.payment is None:
            return 402, challenge_v2(7000), b"{}"
        body = {"x402Version": 2, "error": "invalid_exact_evm_payload_signature", "accepts": [accepts(7000)]}
        return 402, {"PAYMENT-REQUIRED": b64(body)}, b"{}"

    with HostileGateway(script) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy())
        with pytest.raises(openai.APIStatusError) as info:
            ask(gw)
        refusal = refusal_from_error(info.value)
        assert refusal is not None and "invalid_exact_evm_payload_signature" in refusal.message
    totals = gw.ledger.totals(gw.agent, receipt_day(time.time()))
    assert totals.day_reserved == 7000  # the gateway's word is not proof: exposure until validBefore


def test_the_response_cache_never_serves_another_key_holder() -> None:
    def script(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.path == "/v1/models":
            return 200, {}, models({"id": "m", "promptPricePer1MTokens": "1", "completionPricePer1M": "1"})
        if seen.headers.get("authorization") != "Bearer sk-good":
            return 401, {"content-type": "application/json"}, b'{"error": {"code": "invalid_api_key"}}'
        return 200, {"content-type": "application/json"}, chat_answer()

    with HostileGateway(script) as hostile:
        gw = Gateway(
            hostile.url + "/v1",
            profile="plain",
            ledger="memory://",
            policy=Policy(),
            prices=PRICES,
            response_cache=True,
        )
        good = openai.OpenAI(base_url=gw.base_url, api_key="sk-good", http_client=gw.http_client(), max_retries=0)
        bad = openai.OpenAI(base_url=gw.base_url, api_key="sk-bad", http_client=gw.http_client(), max_retries=0)
        good.chat.completions.create(model="m", messages=MESSAGES, temperature=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="m", messages=MESSAGES, temperature=0)
        good.chat.completions.create(model="m", messages=MESSAGES, temperature=0)
        assert hostile.count(CHAT) == 2  # the second good call was a cache hit; the bad key reached the gateway
    _ = PAYEE


def test_an_unpaid_answer_of_unknown_price_on_the_default_profile_is_never_counted_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with HostileGateway(lambda seen: (200, {"content-type": "application/json"}, chat_answer(1000, 1000))) as hostile:
        gw = Gateway(hostile.url + "/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy())
        with caplog.at_level("WARNING", logger="llm402"):
            for _ in range(3):
                ask(gw)
    warnings = [r for r in caplog.records if "without a payment and its price is unknown" in r.getMessage()]
    assert len(warnings) == 1  # once per gateway and model, not per call
    assert hostile.url in warnings[0].getMessage()
