"""A LlamaIndex ``FunctionAgent`` through llm402 against the sandbox, streamed (its default) and not: a tool loop,
one payment per model call, receipts == what the sandbox charged, the cost LlamaIndex shows (the
``GatewayPaymentEvent``s `track_gateway_costs` adds up) == the receipts, and a cap refusal typed and not retried."""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import AgentStream, FunctionAgent
from llama_index.llms.openai_like import OpenAILike

from framework_books import check_books, paid
from llm402 import BudgetExceeded, Gateway, Policy, Wallet
from llm402.errors_any import refusal_of
from llm402.llama_index import GatewayLLM, track_gateway_costs
from llm402.sandbox import SandboxServer
from sandbox_view import FUNDS, SandboxView


def get_weather(city: str) -> str:
    """The weather of a city."""
    return "sunny"


async def ask(agent: FunctionAgent) -> tuple[str, str]:
    """The agent's answer, and the text its stream events carried."""
    handler = agent.run(user_msg="Weather in Paris?")
    deltas = [event.delta async for event in handler.stream_events() if isinstance(event, AgentStream)]
    return str(await handler), "".join(deltas)


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_function_agent_pays_each_model_call_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, streaming: bool
) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    llm = GatewayLLM(model="sandbox/small", gateway=gw, max_tokens=64)
    agent = FunctionAgent(tools=[get_weather], llm=llm, streaming=streaming, system_prompt="Use the tool.")
    with track_gateway_costs() as costs:
        answer, streamed = await ask(agent)
    assert answer == "The tool returned: sunny"
    if streaming:
        assert streamed.endswith("The tool returned: sunny")
    charged = check_books(view, wallet, [gw], model_calls=2)
    assert costs.total_micro_usdc == charged and costs.payments == 2
    assert costs.calls == len(paid(gw)) and costs.by_model == {"sandbox/small": charged}


async def test_an_unchanged_openai_like_pays_each_model_call_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    llm = OpenAILike(
        model="sandbox/small",
        api_base=gw.base_url,
        api_key=gw.api_key,
        is_chat_model=True,
        is_function_calling_model=True,
        http_client=gw.http_client(),
        async_http_client=gw.async_http_client(),
    )
    answer, _ = await ask(FunctionAgent(tools=[get_weather], llm=llm, system_prompt="Use the tool."))
    assert answer == "The tool returned: sunny"
    check_books(view, wallet, [gw], model_calls=2)


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_cap_refusal_is_typed_and_not_retried(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, streaming: bool
) -> None:
    policy = Policy(max_payment_usd="1", daily_cap_usd="0.000001")
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=policy)
    llm = GatewayLLM(model="sandbox/small", gateway=gw, max_tokens=64)
    agent = FunctionAgent(tools=[get_weather], llm=llm, streaming=streaming)
    with pytest.raises(Exception) as caught:  # the workflow may wrap what the step raised
        await ask(agent)
    refusal = refusal_of(caught.value)
    assert isinstance(refusal, BudgetExceeded) and refusal.code == "budget_exceeded"
    assert len([r for r in gw.receipts() if r.error == "budget_exceeded"]) == 1
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS
