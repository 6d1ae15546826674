"""`ChatGateway` against the sandbox: paid answers carry their cost once, refusals never reach the network, and the
cost callback, llm402's ledger and the sandbox's books agree to the micro-USDC."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from decimal import Decimal
from typing import Any

import openai
import pytest
from langchain_core.exceptions import ModelAPIError
from langchain_core.language_models import FakeListChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_support import FUNDS, SandboxView
from pydantic import BaseModel

from llm402 import Gateway, Policy, Wallet
from llm402.langchain import (
    ChatGateway,
    GatewayBudgetExceeded,
    GatewayIntentNotAllowed,
    GatewayPaymentRejected,
    get_gateway_cost_callback,
)
from llm402.money import usd_to_atomic
from llm402.sandbox import SandboxServer

PROMPT = ChatPromptTemplate.from_messages([("system", "You are terse."), ("user", "{question}")])


def paid_model(sandbox: SandboxServer, wallet: Wallet, **kw: Any) -> ChatGateway:
    """A model from plain keyword arguments, as a user would write it."""
    kw.setdefault("model", "sandbox/small")
    kw.setdefault("policy", {"max_payment_usd": "0.05", "daily_cap_usd": "2"})
    return ChatGateway(
        base_url=f"{sandbox.url}/v1", wallet_private_key=wallet.export_private_key(), ledger="memory://", **kw
    )


def receipts_of(llm: ChatGateway) -> list[Any]:
    assert llm.gateway is not None
    return list(llm.gateway.receipts())


def cost_of(message: BaseMessage) -> int:
    return usd_to_atomic(message.response_metadata["cost"])


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


class Verdict(BaseModel):
    """A judge's verdict."""

    winner: str
    score: int


def test_invoke_is_paid_and_the_message_carries_cost_and_payment(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    llm = paid_model(sandbox, wallet, agent="judge", intent="judging")
    message = llm.invoke("Explain x402 in one line")
    (receipt,) = receipts_of(llm)
    assert isinstance(message, AIMessage) and message.content and message.usage_metadata
    assert isinstance(message.response_metadata["cost"], str), "cost is a decimal string, never a float"
    assert cost_of(message) == receipt.cost > 0
    payment = message.response_metadata["payment"]
    assert payment["payer"] == wallet.address and payment["transaction"] and payment["amount"] >= receipt.cost
    assert payment["network"] == "eip155:84532" and payment["scheme"] == "exact"
    assert message.response_metadata["llm402"] == {"call_id": receipt.call_id, "agent": "judge", "intent": "judging"}
    assert FUNDS - view.balance(wallet.address) == receipt.cost
    assert view.stats(wallet.address)["signatures_seen"] == 1


@pytest.mark.parametrize("stream_usage", [True, False])
def test_streaming_yields_usage_and_cost_exactly_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, stream_usage: bool
) -> None:
    llm = paid_model(sandbox, wallet, model="sandbox/medium", stream_usage=stream_usage)
    chunks = list(llm.stream("Tell a short story about a paid robot"))
    (receipt,) = receipts_of(llm)
    with_usage = [c for c in chunks if c.usage_metadata]
    with_cost = [c for c in chunks if "cost" in c.response_metadata]
    with_payment = [c for c in chunks if "payment" in c.response_metadata]
    assert len(with_cost) == 1 and len(with_payment) == 1 and with_cost[0] is with_payment[0]
    if stream_usage:
        assert len(with_usage) == 1 and with_usage[0] is with_cost[0], "the cost rides on the usage chunk"
        assert receipt.completion_tokens == with_usage[0].usage_metadata["output_tokens"]  # type: ignore[index]
    else:
        assert not with_usage
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert isinstance(full, AIMessageChunk) and full.content and full.chunk_position == "last"
    assert cost_of(full) == receipt.cost == FUNDS - view.balance(wallet.address) > 0


async def test_async_streaming_yields_usage_and_cost_exactly_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    llm = paid_model(sandbox, wallet)
    chunks = [chunk async for chunk in llm.astream("Write a haiku about invoices")]
    (receipt,) = receipts_of(llm)
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    (costed,) = [c for c in chunks if "cost" in c.response_metadata]
    assert costed.usage_metadata and cost_of(costed) == receipt.cost == FUNDS - view.balance(wallet.address)


def test_intent_the_policy_refuses_fails_typed_before_any_traffic(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    llm = paid_model(sandbox, wallet, policy={"allowed_intents": ["judging"]}, intent="chitchat")
    chain = PROMPT | llm | StrOutputParser()
    with pytest.raises(GatewayIntentNotAllowed, match="chitchat") as info:
        chain.invoke({"question": "How are you?"})
    assert info.value.code == "intent_not_allowed" and info.value.receipts[0].status == 402
    local = info.value.__cause__
    assert isinstance(local, openai.APIStatusError), "the 402 was answered by llm402 itself, not the gateway"
    assert local.response.headers["x-llm402-refusal"] == "intent_not_allowed"
    stats = view.stats(wallet.address)
    assert stats["signatures_seen"] == 0, stats
    assert view.balance(wallet.address) == FUNDS


def test_budget_refusal_falls_back_without_paying(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    capped = paid_model(sandbox, wallet, policy={"daily_cap_usd": "0.000001"})
    backup = FakeListChatModel(responses=["the backup answers"])
    chain = PROMPT | capped.with_fallbacks([backup], exceptions_to_handle=(GatewayBudgetExceeded,)) | StrOutputParser()
    assert chain.invoke({"question": "What is a daily cap?"}) == "the backup answers"
    with pytest.raises(GatewayBudgetExceeded, match="cap"):
        capped.invoke("What is a daily cap?")
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS


def test_cost_callback_equals_the_ledger_and_the_sandbox(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = Gateway(
        f"{sandbox.url}/v1",
        wallet=wallet,
        ledger="memory://",
        policy=Policy(max_payment_usd="0.05", daily_cap_usd="2"),
        agent="accountant",
    )
    small = ChatGateway(model="sandbox/small", gateway=gw)
    large = ChatGateway(model="sandbox/large", gateway=gw)

    async def async_calls() -> None:
        await small.ainvoke("async hello")
        [c async for c in large.astream("async stream")]

    with get_gateway_cost_callback() as cb:
        (PROMPT | small | StrOutputParser()).invoke({"question": "What is x402?"})
        list(large.stream("Stream me a sentence"))
        small.batch(["one", "two", "three"])
        small.bind_tools([multiply]).invoke("What is 6 times 7?")
        small.with_structured_output(Verdict).invoke("Judge: Ann 9 vs Bob 7")
        asyncio.run(async_calls())

    receipts = list(gw.receipts())
    assert len(receipts) == cb.total.calls == 9 and cb.total.failed_calls == 0
    ledger_total = sum(r.cost for r in receipts)
    assert cb.total_cost == ledger_total == FUNDS - view.balance(wallet.address) > 0
    stats = view.stats(wallet.address)
    assert stats["settled_amount"] == ledger_total and stats["signatures_seen"] == stats["settled"] == len(receipts)
    assert cb.total_cost_usd == Decimal(ledger_total) / 10**6
    by_model: Counter[str] = Counter()
    for r in receipts:
        by_model[r.model or ""] += r.cost
    assert {model: totals.cost for model, totals in cb.by_model.items()} == dict(by_model)
    assert list(cb.by_agent) == ["accountant"] and cb.by_agent["accountant"].cost == ledger_total
    assert cb.total.total_tokens == sum(r.total_tokens for r in receipts)


async def test_concurrent_calls_on_one_model_never_mix_receipts(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    llm = paid_model(sandbox, wallet)

    async def streamed(question: str) -> BaseMessage:
        full: AIMessageChunk | None = None
        async for chunk in llm.astream(question, max_tokens=5 + len(question)):
            full = chunk if full is None else full + chunk
        assert full is not None
        return full

    questions = [f"question number {i} " + "word " * i for i in range(1, 9)]
    jobs: list[Coroutine[Any, Any, BaseMessage]] = [
        llm.ainvoke(q, model=("sandbox/small", "sandbox/medium")[i % 2]) for i, q in enumerate(questions)
    ]
    jobs += [streamed(q) for q in questions]
    messages = await asyncio.gather(*jobs)
    inputs: list[LanguageModelInput] = list(questions)
    threaded = await asyncio.to_thread(llm.batch, inputs, config={"max_concurrency": 4})
    receipts = {r.call_id: r for r in receipts_of(llm)}
    seen = set()
    for message in [*messages, *threaded]:
        receipt = receipts[message.response_metadata["llm402"]["call_id"]]
        seen.add(receipt.call_id)
        assert cost_of(message) == receipt.cost
        assert message.response_metadata["payment"]["amount"] == receipt.payment.amount
        assert (
            isinstance(message, AIMessage)
            and message.usage_metadata
            and message.usage_metadata["output_tokens"] == receipt.completion_tokens
        )
        assert message.usage_metadata["input_tokens"] == receipt.prompt_tokens
    assert len(seen) == len(receipts) == 3 * len(questions), "every call got its own receipt, once"
    assert sum(r.cost for r in receipts.values()) == FUNDS - view.balance(wallet.address)


def test_a_wallet_without_funds_fails_typed(sandbox: SandboxServer, view: SandboxView) -> None:
    broke = Wallet.create()
    llm = paid_model(sandbox, broke, max_retries=0)
    with pytest.raises(GatewayPaymentRejected, match="refused the signed payment") as info:
        llm.invoke("hello")
    assert info.value.code == "payment_rejected" and info.value.receipts[-1].cost == 0
    assert view.balance(broke.address) == 0


def test_a_paid_call_that_then_fails_still_counts_its_cost(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    llm = paid_model(sandbox, wallet, default_headers={"X-Sandbox-Fault": "fail_after_settle"})
    with get_gateway_cost_callback() as cb, pytest.raises(ModelAPIError):
        llm.invoke("hello")
    receipts = receipts_of(llm)
    charged = FUNDS - view.balance(wallet.address)
    assert view.stats(wallet.address)["signatures_seen"] == 1, "llm402 never pays twice for one call"
    assert cb.total_cost == sum(r.cost for r in receipts) == charged > 0
    assert cb.total.failed_calls == 1 and cb.total.calls == 1
