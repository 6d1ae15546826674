"""LiteLLM through llm402 (``client=`` and ``litellm.client_session``) against the sandbox: a tool loop and a
stream, one payment per model call, receipts == what the sandbox charged, LiteLLM's own response cost (read from
``x-litellm-response-cost``) == the receipts, and a cap refusal typed; ``num_retries`` retries it (refused again
locally, never paid) while ``retry_policy`` does not."""

from __future__ import annotations

import json
import time
from typing import Any

import litellm
import pytest
from litellm import RetryPolicy
from litellm.integrations.custom_logger import CustomLogger

from framework_books import capped_gateway, check_books, paid
from llm402 import BudgetExceeded, Gateway, Policy, Wallet
from llm402.errors_any import retryable, typed_error, typed_errors
from llm402.litellm import async_openai_client, cost_reporting_client, openai_client
from llm402.sandbox import SandboxServer
from sandbox_view import FUNDS, SandboxView

MODEL = "openai/sandbox/small"
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def tool_loop(**kw: Any) -> list[Any]:
    """Ask, run the tool the model calls, answer; every response."""
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = litellm.completion(model=MODEL, messages=messages, tools=TOOLS, max_tokens=64, **kw)
    call = first.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments)["city"]
    messages += [first.choices[0].message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    final = litellm.completion(model=MODEL, messages=messages, tools=TOOLS, max_tokens=64, **kw)
    assert final.choices[0].message.content == "The tool returned: sunny"
    return [first, final]


class CostLog(CustomLogger):  # type: ignore[misc]
    """The ``response_cost`` LiteLLM's logging callbacks see, per call."""

    def __init__(self) -> None:
        super().__init__()
        self.costs: list[float] = []

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self.costs.append(kwargs["response_cost"])


def usd_of(response: Any) -> int:
    """LiteLLM's response cost, in micro-USDC."""
    cost = response._hidden_params["response_cost"]
    assert isinstance(cost, float)
    return round(cost * 1_000_000)


@pytest.mark.parametrize("mount", ["/v1", "/upto/v1"])
def test_a_tool_loop_through_client_shows_llm402s_cost(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, mount: str
) -> None:
    gw = Gateway(f"{sandbox.url}{mount}", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    responses = tool_loop(client=openai_client(gw, max_retries=0))
    check_books(view, wallet, [gw], model_calls=2)
    assert [usd_of(r) for r in responses] == [r.cost for r in paid(gw)]
    assert [r.usage.prompt_tokens for r in responses] == [r.prompt_tokens for r in paid(gw)]


def test_client_session_and_a_stream(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    monkeypatch.setattr(litellm, "client_session", cost_reporting_client(gw))
    logged = CostLog()
    monkeypatch.setattr(litellm, "callbacks", [logged])
    responses = tool_loop(api_base=gw.base_url, api_key=gw.api_key)
    chunks = list(
        litellm.completion(
            model=MODEL,
            messages=[{"role": "user", "content": "Explain x402 in one line"}],
            max_tokens=64,
            api_base=gw.base_url,
            api_key=gw.api_key,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    built = litellm.stream_chunk_builder(chunks)
    assert built is not None and built.choices[0].message.content.startswith("Echo:")
    check_books(view, wallet, [gw], model_calls=3)
    receipts = paid(gw)
    assert [usd_of(r) for r in responses] == [r.cost for r in receipts[:2]]
    # a stream paid by an exact payment: its cost was final with the headers, LiteLLM's stream cost is it: on the
    # built response's usage and in what its logging callbacks see
    assert round(built.usage.cost * 1_000_000) == receipts[2].cost
    deadline = time.monotonic() + 10
    while len(logged.costs) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [round(c * 1_000_000) for c in logged.costs] == [r.cost for r in receipts]
    assert (built.usage.prompt_tokens, built.usage.completion_tokens) == (
        receipts[2].prompt_tokens,
        receipts[2].completion_tokens,
    )


async def test_acompletion_through_an_async_client(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    response = await litellm.acompletion(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=64, client=async_openai_client(gw)
    )
    assert usd_of(response) == check_books(view, wallet, [gw], model_calls=1)


def test_an_unchanged_client_keeps_litellms_own_cost(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    import openai

    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    client = openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client())
    response = litellm.completion(model=MODEL, messages=[{"role": "user", "content": "hi"}], client=client)
    assert "llm_provider-x-litellm-response-cost" not in response._hidden_params["additional_headers"]
    check_books(view, wallet, [gw], model_calls=1)


def test_a_cap_refusal_is_typed_num_retries_retries_it_retry_policy_does_not(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = capped_gateway(sandbox, wallet)
    client = openai_client(gw)
    with pytest.raises(litellm.APIError) as caught:
        tool_loop(client=client, num_retries=2)
    assert caught.value.status_code == 402
    refusal = typed_error(caught.value)
    assert isinstance(refusal, BudgetExceeded) and refusal.code == "budget_exceeded"
    assert retryable(caught.value) is False
    refused = [r for r in gw.receipts() if r.error == "budget_exceeded"]
    assert len(refused) == 3  # LiteLLM's num_retries retries any openai.APIError: 1 + 2, each refused locally
    with pytest.raises(BudgetExceeded), typed_errors():
        tool_loop(client=client, retry_policy=RetryPolicy(RateLimitErrorRetries=3, InternalServerErrorRetries=3))
    assert len([r for r in gw.receipts() if r.error == "budget_exceeded"]) == 4  # retried by type: not this one
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS
