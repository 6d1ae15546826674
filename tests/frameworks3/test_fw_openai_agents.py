"""The OpenAI Agents SDK (Responses and chat-completions models, ``Runner.run`` and ``Runner.run_streamed``) through
llm402 against the sandbox: a tool loop, one payment per model call, receipts == what the sandbox charged, the cost
per model call and per run from `GatewayCostHooks` == the receipts, and a cap refusal typed and not retried."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled

from framework_books import capped_gateway, check_books, paid
from llm402 import BudgetExceeded, Gateway, Policy, Wallet
from llm402.errors_any import retryable, typed_error, typed_errors
from llm402.openai_agents import GatewayCostHooks, chat_completions_model, responses_model
from llm402.sandbox import SandboxServer
from sandbox_view import FUNDS, SandboxView

set_tracing_disabled(True)  # the SDK's traces go to OpenAI's servers, never from a test

BUILDERS = {"responses": responses_model, "chat": chat_completions_model}


@function_tool
def get_weather(city: str) -> str:
    """The weather of a city."""
    return "sunny"


def weather_agent(model: Any, include_usage: bool | None = None) -> Agent[Any]:
    settings = ModelSettings(max_tokens=64, include_usage=include_usage)
    return Agent(
        name="weather", instructions="Use the tool.", model=model, tools=[get_weather], model_settings=settings
    )


async def run(agent: Agent[Any], prompt: str, hooks: GatewayCostHooks, streamed: bool) -> Any:
    if not streamed:
        return await Runner.run(agent, prompt, hooks=hooks)
    result = Runner.run_streamed(agent, prompt, hooks=hooks)
    async for _event in result.stream_events():
        pass
    return result


@pytest.mark.parametrize("kind", ["responses", "chat"])
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_tool_loop_pays_each_model_call_once_and_hooks_show_its_cost(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, kind: str, streamed: bool
) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    agent = weather_agent(BUILDERS[kind](gw, "sandbox/small"), include_usage=True)
    hooks = GatewayCostHooks()
    result = await run(agent, "Weather in Paris?", hooks, streamed)
    assert result.final_output == "The tool returned: sunny"
    assert len(result.raw_responses) == 2
    charged = check_books(view, wallet, [gw], model_calls=2)
    # the cost per model call and per run == the receipts == what the sandbox charged
    assert hooks.receipts == list(paid(gw))
    assert [call.agent for call in hooks.calls] == ["weather", "weather"]
    assert hooks.total == charged
    assert hooks.total_usd * 1_000_000 == charged
    usage = result.context_wrapper.usage
    assert usage.requests == 2
    assert usage.input_tokens == sum(r.prompt_tokens for r in hooks.receipts)
    assert usage.output_tokens == sum(r.completion_tokens for r in hooks.receipts)


async def test_a_chat_stream_that_did_not_ask_for_usage_is_left_without_it(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    """llm402 asks for usage to meter the stream and removes that chunk again; the hooks still have the cost."""
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    hooks = GatewayCostHooks()
    result = await run(weather_agent(chat_completions_model(gw, "sandbox/small")), "Weather in Rome?", hooks, True)
    assert result.final_output == "The tool returned: sunny"
    assert result.context_wrapper.usage.output_tokens == 0  # as without llm402: the SDK did not ask
    assert all(r.completion_tokens > 0 for r in hooks.receipts)
    assert hooks.total == check_books(view, wallet, [gw], model_calls=2)


@pytest.mark.parametrize("kind", ["responses", "chat"])
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_cap_refusal_is_typed_and_not_retried(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, kind: str, streamed: bool
) -> None:
    gw = capped_gateway(sandbox, wallet)
    agent = weather_agent(BUILDERS[kind](gw, "sandbox/small", max_retries=3))
    hooks = GatewayCostHooks()
    with pytest.raises(openai.APIStatusError) as caught:
        await run(agent, "Weather in Paris?", hooks, streamed)
    assert caught.value.status_code == 402
    refusal = typed_error(caught.value)
    assert isinstance(refusal, BudgetExceeded) and refusal.code == "budget_exceeded"
    assert retryable(caught.value) is False
    with pytest.raises(BudgetExceeded), typed_errors():
        await run(agent, "Weather in Paris?", hooks, streamed)
    assert hooks.calls == []
    assert len([r for r in gw.receipts() if r.error == "budget_exceeded"]) == 2  # the SDK's 3 retries: none taken
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS
