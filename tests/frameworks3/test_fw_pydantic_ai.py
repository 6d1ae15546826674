"""PydanticAI (chat completions and Responses models) through llm402 against the sandbox: a tool loop run and
streamed, one payment per model call, receipts == what the sandbox charged, PydanticAI's own ``usage.cost`` ==
the receipts, ``UsageLimits(cost_limit=)`` enforced on llm402's cost (no ``CostNotFoundWarning``), and a cap
refusal typed and not retried. An unchanged provider (``report_cost_in_usage=False``) gets the answers unchanged."""

from __future__ import annotations

import warnings
from decimal import Decimal
from typing import Any

import pytest
from pydantic_ai import Agent, CostNotFoundWarning, UsageLimitExceeded, UsageLimits
from pydantic_ai.exceptions import ModelHTTPError

from framework_books import capped_gateway, check_books, paid
from llm402 import BudgetExceeded, Gateway, Policy, Wallet
from llm402.errors_any import retryable, typed_error, typed_errors
from llm402.pydantic_ai import chat_model, responses_model
from llm402.sandbox import SandboxServer
from sandbox_view import FUNDS, SandboxView

BUILDERS = {"chat": chat_model, "responses": responses_model}
SETTINGS: Any = {"max_tokens": 64}


def weather_agent(model: Any) -> Agent[None, str]:
    agent = Agent(model, instructions="Use the tool.")

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather of a city."""
        return "sunny"

    return agent


async def ask(agent: Agent[None, str], stream: bool) -> str:
    if not stream:
        return (await agent.run("Weather in Paris?", model_settings=SETTINGS)).output
    async with agent.run_stream("Weather in Paris?", model_settings=SETTINGS) as result:
        return await result.get_output()


def usd(atomic: int) -> Decimal:
    return Decimal(atomic) / 1_000_000


@pytest.mark.parametrize("kind", ["chat", "responses"])
async def test_tool_loop_run_and_stream_pay_each_call_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, kind: str
) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    agent = weather_agent(BUILDERS[kind](gw, "sandbox/small"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CostNotFoundWarning)
        result = await agent.run("Weather in Paris?", model_settings=SETTINGS, usage_limits=UsageLimits(cost_limit=1))
        assert result.output == "The tool returned: sunny"
        first = result.usage
        assert first.requests == 2 and first.tool_calls == 1
        async with agent.run_stream("Weather in Rome?", model_settings=SETTINGS) as stream:
            texts = [text async for text in stream.stream_text()]
        streamed = stream.usage
    assert texts[-1] == "The tool returned: sunny"
    assert streamed.requests == 2
    charged = check_books(view, wallet, [gw], model_calls=4)
    receipts = paid(gw)
    assert all(r.payment is not None and r.payment.scheme == "upto" for r in receipts)
    # the cost PydanticAI shows is llm402's, per run, to the micro-dollar; so are the tokens
    assert first.cost == usd(receipts[0].cost + receipts[1].cost)
    assert streamed.cost == usd(receipts[2].cost + receipts[3].cost)
    assert first.cost + streamed.cost == usd(charged)
    assert first.input_tokens == receipts[0].prompt_tokens + receipts[1].prompt_tokens
    assert streamed.output_tokens == receipts[2].completion_tokens + receipts[3].completion_tokens


@pytest.mark.parametrize("kind", ["chat", "responses"])
async def test_cost_limit_stops_a_run_on_llm402s_cost(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, kind: str
) -> None:
    # exact: the sandbox charges the price of max_tokens up front, $0.0025 and a bit for 250 tokens of sandbox/medium
    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    agent = weather_agent(BUILDERS[kind](gw, "sandbox/medium"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CostNotFoundWarning)
        with pytest.raises(UsageLimitExceeded, match="cost_limit"):
            await agent.run(
                "Weather in Paris?",
                model_settings={"max_tokens": 250},
                usage_limits=UsageLimits(cost_limit=0.001),
            )
    charged = check_books(view, wallet, [gw], model_calls=1)  # stopped after the first call: no second one
    assert charged > 2500


async def test_an_unchanged_provider_gets_the_answer_unchanged(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    agent = weather_agent(chat_model(gw, "sandbox/medium", report_cost_in_usage=False))
    with pytest.warns(CostNotFoundWarning):
        result = await agent.run(
            "Weather in Paris?", model_settings={"max_tokens": 250}, usage_limits=UsageLimits(cost_limit=0.001)
        )
    assert result.output == "The tool returned: sunny"  # nothing to enforce the limit on: both calls ran
    assert result.usage.cost is None
    check_books(view, wallet, [gw], model_calls=2)


@pytest.mark.parametrize("kind", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_cap_refusal_is_typed_and_not_retried(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, kind: str, stream: bool
) -> None:
    gw = capped_gateway(sandbox, wallet)
    agent = weather_agent(BUILDERS[kind](gw, "sandbox/small"))
    with pytest.raises(ModelHTTPError) as caught:
        await ask(agent, stream)
    assert caught.value.status_code == 402
    refusal = typed_error(caught.value)
    assert isinstance(refusal, BudgetExceeded) and refusal.code == "budget_exceeded"
    assert retryable(caught.value) is False
    with pytest.raises(BudgetExceeded), typed_errors():
        await ask(agent, stream)
    refused = [r for r in gw.receipts() if r.error == "budget_exceeded"]
    assert len(refused) == 2  # one per run: the SDK's and PydanticAI's retries left it alone
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS
