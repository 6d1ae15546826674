"""The AIsa compute layer (shared/seeds/000): its three modes — ``api_key_proxy``, ``x402_probe``,
``x402_external_settle`` — and its request lifecycle (identity, intent allow-list, daily compute cap, 402 envelope,
settle, replay) replayed through llm402."""

from __future__ import annotations

import re
import time
from typing import Any

import openai
import pytest
from contract_support import AISA_PAYEE, AISA_URL, BASE_MAINNET, BASE_USDC, WireLog, eip3009_signer, uses_cassette
from llama_index.core.base.llms.types import ChatMessage

from llm402 import Gateway, Policy, Wallet
from llm402.approval import Approval, PaymentProposal
from llm402.errors import PolicyRefusal
from llm402.langchain import ChatGateway, GatewayBudgetExceeded, GatewayIntentNotAllowed
from llm402.llama_index import GatewayLLM
from llm402.openai import refusal_from_error
from llm402.x402 import Challenge, Dialect, sign_payment

JUDGE = {
    "model": "gpt-5.2",
    "messages": [{"role": "user", "content": "Judge this round in one line."}],
    "max_tokens": 256,
}
PRICE = 2500  # micro-USDC, the 402's maxAmountRequired
# "Vyper-policied — daily caps + per-intent allowlists"; "call AIsa for judging, commentary, captioning"
INTENTS = frozenset({"judging", "commentary", "captioning"})


def policy(**kw: Any) -> Policy:
    kw.setdefault("max_payment_usd", "0.01")
    kw.setdefault("daily_cap_usd", "1")
    return Policy(allowed_intents=INTENTS, allowed_networks={BASE_MAINNET}, allowed_assets={BASE_USDC}, **kw)


def pay_per_call(wallet: Wallet | None, intent: str = "judging", **kw: Any) -> Gateway:
    """No AISA_API_KEY: the aisa profile pays per call (x402)."""
    kw.setdefault("policy", policy())
    return Gateway(
        AISA_URL, profile="aisa", wallet=wallet, agent="judge.krump.eth", intent=intent, ledger="memory://", **kw
    )


def client_for(gw: Gateway, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), **kw)


def assert_x402_v1_payment(value: dict[str, Any], payer: str) -> None:
    """The X-PAYMENT payload: x402 v1 over Base USDC to the quoted payee, signed (EIP-3009) by ``payer``."""
    assert (value["x402Version"], value["scheme"], value["network"]) == (1, "exact", "base")
    auth = value["payload"]["authorization"]
    assert (auth["from"], auth["to"], int(auth["value"])) == (payer, AISA_PAYEE, PRICE)
    assert int(auth["validBefore"]) <= time.time() + 60 + 5  # maxTimeoutSeconds: 60
    signature = value["payload"]["signature"]
    assert re.fullmatch(r"0x[0-9a-f]{130}", signature)
    assert eip3009_signer(auth, signature, chain_id=8453, asset=BASE_USDC) == payer


# --- api_key_proxy --------------------------------------------------------------------------------------------------


@uses_cassette("aisa_compute/api_key_proxy")
def test_api_key_proxy_streams_tokens_and_meters_usage_cost(wire: WireLog, vcr: Any) -> None:
    """A key makes the gateway metered: under the daily cap a model without a known price needs
    ``allow_unpriced`` (AIsa publishes no table; each answer's ``usage.cost`` is what the receipt counts)."""
    unpriced = policy(allow_unpriced=True)
    gw = Gateway(AISA_URL, profile="aisa", api_key="your-key", intent="commentary", policy=unpriced, ledger="memory://")
    client = client_for(gw)
    stream = client.chat.completions.create(
        model="gpt-5.2", messages=[{"role": "user", "content": "Commentate the opening move."}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "A bold opening!"
    streamed = gw.last_receipt
    assert streamed is not None
    assert (streamed.streamed, streamed.cost, streamed.credits_remaining) == (True, 120, "4.99988")

    judged = Gateway(
        AISA_URL, profile="aisa", api_key="your-key", intent="judging", policy=unpriced, ledger="memory://"
    )
    reply = client_for(judged).chat.completions.create(**JUDGE)
    assert reply.choices[0].message.content == "Round two goes to the challenger."
    assert judged.last_receipt is not None
    assert judged.last_receipt.cost == 210
    assert wire.paid() == []  # a key, not a payment
    assert all(s.headers["authorization"] == "Bearer your-key" for s in wire.sent)
    assert [s.path for s in wire.sent if s.method == "POST"] == ["/v1/chat/completions"] * 2
    assert vcr.all_played


@uses_cassette("aisa_compute/api_key_proxy")
def test_api_key_proxy_refuses_an_unpriced_model_under_the_cap_before_the_call(wire: WireLog) -> None:
    """Without ``allow_unpriced`` a cap cannot bind a model whose price is unknown: llm402 asks the catalog once
    (``GET /models``, which this document does not answer) and refuses locally, before the chat is sent."""
    gw = Gateway(AISA_URL, profile="aisa", api_key="your-key", intent="judging", policy=policy(), ledger="memory://")
    with pytest.raises(openai.APIStatusError) as info:
        client_for(gw, max_retries=0).chat.completions.create(**JUDGE)
    refusal = refusal_from_error(info.value)
    assert refusal is not None
    assert refusal.code == "price_unknown"
    assert [(s.method, s.path) for s in wire.sent] == [("GET", "/v1/models")]  # the chat never left
    receipt = gw.last_receipt
    assert receipt is not None
    assert (receipt.status, receipt.cost, receipt.reserved, receipt.payment) == (402, 0, 0, None)


# --- x402_probe -----------------------------------------------------------------------------------------------------


@uses_cassette("aisa_compute/x402_probe")
def test_x402_probe_quotes_without_paying(wallet: Wallet, wire: WireLog, vcr: Any) -> None:
    quote = pay_per_call(wallet).quote(JUDGE)
    assert quote.amount == PRICE
    assert quote.challenge.dialect is Dialect.V1
    assert quote.challenge.error == "X-PAYMENT header is required"
    described = quote.to_dict()
    assert (described["network"], described["asset"], described["pay_to"]) == (BASE_MAINNET, BASE_USDC, AISA_PAYEE)
    assert described["amount_usd"] == "$0.002500"
    assert quote.valid_until == pytest.approx(quote.quoted_at + 60)
    assert [s.headers.get("authorization") for s in wire.sent] == [None]
    assert wire.paid() == []
    assert vcr.all_played


@uses_cassette("aisa_compute/x402_probe")
def test_x402_probe_above_the_max_ticket_is_a_typed_refusal(wallet: Wallet, wire: WireLog) -> None:
    """'The same Vyper-mirrored policy that caps a tip at max_ticket_minor...': a quote above the ticket."""
    with pytest.raises(PolicyRefusal) as info:
        pay_per_call(wallet, policy=policy(max_payment_usd="0.001")).quote(JUDGE)
    assert info.value.code == "payment_over_ticket"
    assert info.value.details == {"requested": PRICE, "cap": 1000}
    assert wire.paid() == []


# --- negotiate, settle, replay: llm402 signs -----------------------------------------------------------------------


@uses_cassette("aisa_compute/x402_external_settle")
def test_402_envelope_is_signed_once_and_replayed_with_x_payment(wallet: Wallet, wire: WireLog, vcr: Any) -> None:
    gw = pay_per_call(wallet)
    raw = client_for(gw).chat.completions.with_raw_response.create(**JUDGE)
    reply = raw.parse()
    assert reply.choices[0].message.content == "Round two goes to the challenger."
    assert raw.headers["x-should-retry"] == "false"  # nothing after a payment is retried
    assert raw.headers["llm402-cost"] == str(PRICE)
    first, replay = wire.sent
    assert "x-payment" not in first.headers
    assert "authorization" not in first.headers  # the SDK's placeholder key never reaches the wire
    assert first.body == replay.body
    payment = replay.payment()
    assert payment is not None
    assert_x402_v1_payment(payment, wallet.address)
    receipt = gw.last_receipt
    assert receipt is not None
    assert receipt.payment is not None
    assert (receipt.cost, receipt.payment.amount, receipt.payment.network) == (PRICE, PRICE, BASE_MAINNET)
    assert (receipt.payment.payer, receipt.payment.payee, receipt.payment.asset) == (
        wallet.address,
        AISA_PAYEE,
        BASE_USDC,
    )
    assert (receipt.agent, receipt.intent) == ("judge.krump.eth", "judging")
    assert vcr.all_played


@uses_cassette("aisa_compute/x402_external_settle")
async def test_async_client_pays_the_same_way(wallet: Wallet, wire: WireLog, vcr: Any) -> None:
    gw = pay_per_call(wallet)
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.async_http_client())
    reply = await client.chat.completions.create(**JUDGE)
    assert reply.choices[0].message.content == "Round two goes to the challenger."
    payment = wire.sent[1].payment()
    assert payment is not None
    assert_x402_v1_payment(payment, wallet.address)
    assert vcr.all_played


@uses_cassette("aisa_compute/x402_external_settle")
def test_langchain_pays_per_call_and_reports_the_payment(wallet: Wallet, wire: WireLog) -> None:
    chat = ChatGateway(model="gpt-5.2", gateway=pay_per_call(wallet), max_tokens=256)
    answer = chat.invoke("Judge this round in one line.")
    assert answer.content == "Round two goes to the challenger."
    assert answer.response_metadata["cost"] == "0.002500"
    payment = answer.response_metadata["payment"]
    assert (payment["network"], payment["amount"], payment["payee"]) == (BASE_MAINNET, PRICE, AISA_PAYEE)
    assert len(wire.paid()) == 1


@uses_cassette("aisa_compute/x402_external_settle")
def test_llama_index_pays_per_call_and_reports_the_cost(wallet: Wallet, wire: WireLog) -> None:
    # LlamaIndex turns max_tokens into max_completion_tokens for gpt-5 models, a field the AIsa documents do not
    # list; additional_kwargs sends the documented max_tokens as is.
    llm = GatewayLLM(
        model="gpt-5.2", gateway=pay_per_call(wallet), fetch_prices=False, additional_kwargs={"max_tokens": 256}
    )
    response = llm.chat([ChatMessage(role="user", content="Judge this round in one line.")])
    assert response.message.content == "Round two goes to the challenger."
    assert response.additional_kwargs["cost_micro_usdc"] == PRICE
    assert response.additional_kwargs["payment"]["payee"] == AISA_PAYEE
    assert len(wire.paid()) == 1


# --- x402_external_settle: the settlement header comes from elsewhere ----------------------------------------------


@uses_cassette("aisa_compute/x402_external_settle")
def test_external_settle_replays_a_header_obtained_elsewhere(wire: WireLog, vcr: Any) -> None:
    treasury = Wallet.create()  # a separate service (treasury, hardware wallet) signs; this gateway has no wallet
    proposals: list[PaymentProposal] = []

    def settle_elsewhere(proposal: PaymentProposal) -> Approval:
        proposals.append(proposal)
        challenge = Challenge(proposal.dialect, (proposal.requirement,), None, None)
        return Approval.external(sign_payment(challenge, proposal.requirement, treasury, proposal.url).header_value)

    gw = Gateway(
        AISA_URL, profile="aisa", intent="judging", policy=policy(), ledger="memory://", approver=settle_elsewhere
    )
    reply = client_for(gw).chat.completions.create(**JUDGE)
    assert reply.choices[0].message.content == "Round two goes to the challenger."
    (proposal,) = proposals
    assert (proposal.amount, proposal.dialect, proposal.kind) == (PRICE, Dialect.V1, "call")
    payment = wire.sent[1].payment()
    assert payment is not None
    assert_x402_v1_payment(payment, treasury.address)
    receipt = gw.last_receipt
    assert receipt is not None
    assert receipt.payment is not None
    assert (receipt.payment.payer, receipt.cost) == (treasury.address, PRICE)
    assert vcr.all_played


@uses_cassette("aisa_compute/x402_external_settle")
def test_an_approver_that_denies_signs_nothing(wallet: Wallet, wire: WireLog) -> None:
    gw = pay_per_call(wallet, approver=lambda proposal: Approval.deny("treasury closed"))
    with pytest.raises(openai.APIStatusError) as info:
        client_for(gw).chat.completions.create(**JUDGE)
    refusal = refusal_from_error(info.value)
    assert refusal is not None
    assert refusal.code == "approval_denied"
    assert wire.paid() == []


# --- the lifecycle's policy gates: refused before any traffic, or before signing ---------------------------------


@uses_cassette("aisa_compute/x402_probe")
def test_an_intent_outside_the_allow_list_never_reaches_aisa(wallet: Wallet, wire: WireLog, vcr: Any) -> None:
    gw = pay_per_call(wallet, intent="trading")
    with pytest.raises(openai.APIStatusError) as info:
        client_for(gw).chat.completions.create(**JUDGE)
    refusal = refusal_from_error(info.value)
    assert refusal is not None
    assert refusal.code == "intent_not_allowed"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert wire.sent == []
    assert vcr.play_count == 0
    with pytest.raises(GatewayIntentNotAllowed):
        ChatGateway(model="gpt-5.2", gateway=gw).invoke("Judge this round in one line.")


@uses_cassette("aisa_compute/x402_probe")
def test_when_the_daily_compute_cap_is_gone_nothing_is_signed(wallet: Wallet, wire: WireLog) -> None:
    """'When the budget's gone, AIsa returns a clean 402': the quote (2500) does not fit the cap left (1000)."""
    gw = pay_per_call(wallet, policy=policy(daily_cap_usd="0.001"))
    with pytest.raises(GatewayBudgetExceeded) as info:
        ChatGateway(model="gpt-5.2", gateway=gw, max_tokens=256).invoke("Judge this round in one line.")
    assert info.value.code == "budget_exceeded"
    assert len(wire.sent) == 1  # the unpaid request and its 402; no replay
    assert wire.paid() == []
    receipt = gw.last_receipt
    assert receipt is not None
    assert (receipt.cost, receipt.payment) == (0, None)
