"""LangChain v1 ``create_agent`` with retry and fallback middleware through llm402 against the sandbox: a tool loop
invoked and streamed on `ChatGateway`, one payment per model call, receipts == what the sandbox charged, the cost
LangChain shows (``response_metadata["cost"]``, the cost callback) == the receipts; a cap refusal is typed, never
retried by ``ModelRetryMiddleware`` and answered by ``ModelFallbackMiddleware``'s next model. An unchanged
``ChatOpenAI``'s refusal is retried by the middleware's default, and not with ``retry_on=llm402.errors_any.retryable``."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelFallbackMiddleware, ModelRetryMiddleware
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from framework_books import check_books, paid
from llm402 import BudgetExceeded, Gateway, Policy, Wallet
from llm402.errors_any import retryable, typed_error
from llm402.langchain import ChatGateway, GatewayBudgetExceeded, get_gateway_cost_callback
from llm402.sandbox import SandboxServer
from sandbox_view import FUNDS, SandboxView

QUESTION: Any = {"messages": [{"role": "user", "content": "Weather in Paris?"}]}


@tool
def get_weather(city: str) -> str:
    """The weather of a city."""
    return "sunny"


def retry(**kw: Any) -> ModelRetryMiddleware:
    return ModelRetryMiddleware(max_retries=2, initial_delay=0.01, jitter=False, on_failure="error", **kw)


def capped(sandbox: SandboxServer, wallet: Wallet) -> Gateway:
    policy = Policy(max_payment_usd="1", daily_cap_usd="0.000001")
    return Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=policy)


def test_a_tool_loop_invoked_and_streamed(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    fallback = ChatGateway(model="sandbox/medium", gateway=gw, max_tokens=64)
    agent = create_agent(
        ChatGateway(model="sandbox/small", gateway=gw, max_tokens=64),
        tools=[get_weather],
        middleware=[ModelFallbackMiddleware(fallback), retry()],
    )
    with get_gateway_cost_callback() as costs:
        state = agent.invoke(QUESTION)
        chunks = [
            message
            for message, _meta in agent.stream(QUESTION, stream_mode="messages")
            if isinstance(message, AIMessageChunk)
        ]
    answers = [m for m in state["messages"] if isinstance(m, AIMessage)]
    assert answers[-1].content == "The tool returned: sunny" and len(answers) == 2
    assert "".join(str(c.content) for c in chunks).endswith("The tool returned: sunny")
    charged = check_books(view, wallet, [gw], model_calls=4)
    receipts = paid(gw)
    assert all(r.model == "sandbox/small" for r in receipts)  # the fallback was never needed
    # the cost LangChain shows: on each message, on the streamed chunks, and in the callback == the receipts
    assert [Decimal(m.response_metadata["cost"]) * 1_000_000 for m in answers] == [r.cost for r in receipts[:2]]
    streamed = [Decimal(c.response_metadata["cost"]) * 1_000_000 for c in chunks if "cost" in c.response_metadata]
    assert streamed == [r.cost for r in receipts[2:]]
    assert costs.total_cost == charged
    assert answers[0].usage_metadata is not None
    assert answers[0].usage_metadata["input_tokens"] == receipts[0].prompt_tokens


def test_a_cap_refusal_is_not_retried_and_falls_back(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    primary = capped(sandbox, wallet)
    spare = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    agent = create_agent(
        ChatGateway(model="sandbox/small", gateway=primary, max_tokens=64),
        tools=[get_weather],
        middleware=[ModelFallbackMiddleware(ChatGateway(model="sandbox/small", gateway=spare, max_tokens=64)), retry()],
    )
    state = agent.invoke(QUESTION)
    assert state["messages"][-1].content == "The tool returned: sunny"
    refused = [r for r in primary.receipts() if r.error == "budget_exceeded"]
    assert len(refused) == 2  # one per model call: ModelRetryMiddleware saw a final error (is_retryable False)
    check_books(view, wallet, [spare], model_calls=2)
    # without a fallback the refusal reaches the caller typed
    alone = create_agent(ChatGateway(model="sandbox/small", gateway=primary), tools=[get_weather], middleware=[retry()])
    with pytest.raises(GatewayBudgetExceeded) as caught:
        alone.invoke(QUESTION)
    assert isinstance(caught.value, BudgetExceeded) and not caught.value.is_retryable
    assert len([r for r in primary.receipts() if r.error == "budget_exceeded"]) == 3


def test_an_unchanged_chat_openai_agent_pays_each_model_call_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    model = ChatOpenAI(
        model="sandbox/small", base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), max_tokens=64
    )
    agent = create_agent(model, tools=[get_weather], middleware=[retry()])
    assert agent.invoke(QUESTION)["messages"][-1].content == "The tool returned: sunny"
    chunks = [m for m, _meta in agent.stream(QUESTION, stream_mode="messages") if isinstance(m, AIMessageChunk)]
    assert "".join(str(c.content) for c in chunks).endswith("The tool returned: sunny")
    assert all(c.usage_metadata is None for c in chunks)  # stream_usage was not asked for: none shown, as before
    check_books(view, wallet, [gw], model_calls=4)


def test_an_unchanged_chat_openai_refusal_and_the_retry_predicate(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = capped(sandbox, wallet)
    model = ChatOpenAI(model="sandbox/small", base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client())
    agent = create_agent(model, tools=[get_weather], middleware=[retry()])
    with pytest.raises(openai.APIStatusError) as caught:
        agent.invoke(QUESTION)
    assert isinstance(typed_error(caught.value), BudgetExceeded)
    assert len([r for r in gw.receipts() if r.error == "budget_exceeded"]) == 3  # the default retry_on: 1 + 2
    agent = create_agent(model, tools=[get_weather], middleware=[retry(retry_on=retryable)])
    with pytest.raises(openai.APIStatusError):
        agent.invoke(QUESTION)
    assert len([r for r in gw.receipts() if r.error == "budget_exceeded"]) == 4  # retryable() is False: once
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS
