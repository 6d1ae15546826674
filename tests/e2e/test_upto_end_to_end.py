"""x402 ``upto`` end to end: the OpenAI SDK on an llm402 client against the sandbox's ``/upto/v1`` mount, which offers
exact and upto for the same ceiling. The sandbox's own balances are the independent side of every check."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
from e2e_support import FUNDS, SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.sandbox import SandboxServer

MESSAGES = [{"role": "user", "content": "Say hi"}]


def gateway(sandbox: SandboxServer, wallet: Wallet, **policy: Any) -> Gateway:
    return Gateway(
        f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1", **policy)
    )


def client(gw: Gateway, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), **kw)  # type: ignore[arg-type]


def ledger_total(gw: Gateway) -> int:
    totals = gw.ledger.totals(gw.agent, time.strftime("%Y-%m-%d", time.gmtime()))
    return int(totals.day_spent + totals.day_reserved)


def test_upto_pays_only_the_metered_cost(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = gateway(sandbox, wallet)
    raw = client(gw).chat.completions.with_raw_response.create(model="sandbox/small", messages=MESSAGES, max_tokens=400)
    [receipt] = gw.receipts()
    charged = FUNDS - view.balance(wallet.address)
    assert receipt.payment is not None and receipt.payment.scheme == "upto"
    assert 0 < charged < receipt.payment.amount, "the ceiling covers 400 completion tokens; the answer is short"
    assert receipt.cost == receipt.payment.settled_amount == charged
    assert receipt.reserved == receipt.payment.amount
    assert raw.headers["llm402-cost"] == str(charged)
    assert ledger_total(gw) == charged, "the ledger keeps what moved, not the ceiling"


def test_a_streamed_upto_call_reconciles_to_the_settlement_after_the_stream(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = gateway(sandbox, wallet)
    chunks = list(
        client(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=400, stream=True)
    )
    assert chunks and all(c.usage is None for c in chunks), "the usage chunk llm402 asked for is not passed on"
    [receipt] = gw.receipts()
    charged = FUNDS - view.balance(wallet.address)
    assert receipt.payment is not None and receipt.payment.scheme == "upto"
    assert receipt.cost == charged < receipt.payment.amount
    assert ledger_total(gw) == charged


def test_a_cut_upto_stream_counts_the_ceiling(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = gateway(sandbox, wallet)
    sdk = client(gw, max_retries=0)
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for _ in sdk.chat.completions.create(
            model="sandbox/small",
            messages=MESSAGES,
            max_tokens=400,
            stream=True,
            extra_headers={"X-Sandbox-Fault": "stream_cut=1"},
        ):
            pass
    deadline = time.monotonic() + 5
    while view.balance(wallet.address) == FUNDS and time.monotonic() < deadline:
        time.sleep(0.02)
    [receipt] = gw.receipts()
    assert receipt.payment is not None
    assert receipt.cost == receipt.payment.amount, "no settlement report came: the whole ceiling may have moved"
    assert ledger_total(gw) == receipt.payment.amount >= FUNDS - view.balance(wallet.address) > 0


@pytest.mark.parametrize(
    "fault",
    ["settlement_amount=1000000000", "settlement_payer=0x000000000000000000000000000000000000dEaD"],
)
def test_a_settlement_report_llm402_cannot_believe_counts_the_ceiling(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, fault: str
) -> None:
    gw = gateway(sandbox, wallet)
    client(gw).chat.completions.create(
        model="sandbox/small", messages=MESSAGES, max_tokens=400, extra_headers={"X-Sandbox-Fault": fault}
    )
    [receipt] = gw.receipts()
    assert receipt.payment is not None and receipt.payment.scheme == "upto"
    assert receipt.cost == receipt.payment.amount == ledger_total(gw)
    assert FUNDS - view.balance(wallet.address) <= receipt.cost


def test_the_ceiling_counts_against_the_caps(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    # the answer would cost a few micro-USDC, but a ceiling of 400 completion tokens does not fit the day's cap
    gw = gateway(sandbox, wallet, daily_cap_usd="0.0001")
    with pytest.raises(openai.APIStatusError) as refused:
        client(gw, max_retries=0).chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=400)
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "budget_exceeded"  # type: ignore[index]
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS


@pytest.mark.parametrize("policy", [{"prefer_upto": False}, {"allowed_schemes": frozenset({"exact"})}])
def test_the_policy_can_keep_to_exact(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, policy: dict[str, Any]
) -> None:
    gw = gateway(sandbox, wallet, **policy)
    client(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=400)
    [receipt] = gw.receipts()
    assert receipt.payment is not None and receipt.payment.scheme == "exact"
    assert receipt.cost == receipt.payment.amount == FUNDS - view.balance(wallet.address)


def test_warm_upto_calls_pay_the_ceiling_up_front_and_settle_the_cost(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = gateway(sandbox, wallet, one_round_trip=True)
    http = gw.http_client()
    body = {"model": "sandbox/small", "messages": MESSAGES, "max_tokens": 400}
    for _ in range(4):
        assert http.post(f"{gw.base_url}/chat/completions", json=body).status_code == 200
    receipts = list(gw.receipts())
    assert all(r.payment is not None and r.payment.scheme == "upto" for r in receipts)
    assert view.stats(wallet.address)["signatures_seen"] == 4
    assert sum(r.cost for r in receipts) == FUNDS - view.balance(wallet.address) == ledger_total(gw)


def test_an_upto_refusal_by_the_gateway_moves_nothing_and_is_typed(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    poor = Wallet.create()
    view.fund(poor.address, 10)  # less than any ceiling: the facilitator refuses the authorization
    gw = gateway(sandbox, poor)
    response = gw.http_client().post(
        f"{gw.base_url}/chat/completions", json={"model": "sandbox/small", "messages": MESSAGES, "max_tokens": 400}
    )
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "payment_rejected"
    assert view.balance(poor.address) == 10
    [receipt] = gw.receipts()
    assert receipt.cost == 0 and receipt.payment is not None and receipt.payment.scheme == "upto"
    assert ledger_total(gw) == receipt.payment.amount, "a signed ceiling stays exposure until it expires"


@pytest.mark.parametrize("stack", ["httpx", "httpx2"])
def test_both_http_stacks_read_the_streamed_settlement(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, stack: str
) -> None:
    gw = gateway(sandbox, wallet)
    http = gw.http_client() if stack == "httpx" else gw.httpx2_client()
    body = {"model": "sandbox/small", "messages": MESSAGES, "max_tokens": 400, "stream": True}
    with http.stream("POST", f"{gw.base_url}/chat/completions", json=body) as response:
        assert response.status_code == 200
        ceiling = response.headers["llm402-cost-max"]
        assert "llm402-cost" not in response.headers, "the cost is known only after the stream"
        text = b"".join(response.iter_bytes()).decode()
    assert ": payment-response " in text, "the comment reaches the caller (SSE clients ignore it)"
    [receipt] = gw.receipts()
    assert receipt.payment is not None and receipt.payment.scheme == "upto"
    assert receipt.cost == FUNDS - view.balance(wallet.address) < receipt.payment.amount == int(ceiling)
    assert ledger_total(gw) == receipt.cost
