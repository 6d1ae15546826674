"""The Anthropic SDK built from a `Gateway` (``base_url`` the origin, ``http_client=gw.httpx2_client()``; on a
key-based gateway the key as ``auth_token=``) against the sandbox: a tool loop, streamed and not, one payment per
model call, receipts == what the sandbox charged, the cost the SDK shows (the ``llm402-cost`` header of its raw
response, ``llm402.current_receipt``) == the receipts, and a cap refusal typed and not retried."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import anthropic
import httpx
import pytest

from framework_books import capped_gateway, check_books, paid
from llm402 import BudgetExceeded, Gateway, Policy, Wallet, current_receipt
from llm402.errors_any import retryable, typed_error, typed_errors
from llm402.pricing import ModelPrice
from llm402.sandbox import SandboxServer
from sandbox_view import FUNDS, SandboxView

TOOL: Any = {
    "name": "get_weather",
    "description": "The weather of a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def client_of(gw: Gateway, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gw.base_url.removesuffix("/v1"), api_key=gw.api_key, http_client=gw.httpx2_client(), **kwargs
    )


def tool_loop(client: anthropic.Anthropic, stream: bool) -> tuple[str, list[tuple[int, int]]]:
    """Ask, run the tool the model calls, answer; the final text and each call's (input, output) tokens."""
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    tokens: list[tuple[int, int]] = []
    for _ in range(3):
        kw: Any = {"model": "sandbox/small", "max_tokens": 64, "tools": [TOOL], "messages": messages}
        if stream:
            with client.messages.stream(**kw) as events:
                message = events.get_final_message()
        else:
            message = client.messages.create(**kw)
        tokens.append((message.usage.input_tokens, message.usage.output_tokens))
        uses = [block for block in message.content if block.type == "tool_use"]
        if not uses:
            return "".join(block.text for block in message.content if block.type == "text"), tokens
        messages += [
            {"role": "assistant", "content": message.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"}]},
        ]
    raise AssertionError("the tool loop did not end")


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop_pays_each_model_call_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, stream: bool
) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    text, tokens = tool_loop(client_of(gw, max_retries=0), stream)
    assert text == "The tool returned: sunny"
    check_books(view, wallet, [gw], model_calls=2)
    receipts = paid(gw)
    assert [(r.prompt_tokens, r.completion_tokens) for r in receipts] == tokens
    price = ModelPrice.from_usd("0.15", "0.60")  # upto settles the metered cost
    assert [r.cost for r in receipts] == [price.cost(*t) for t in tokens]
    assert current_receipt.get() == receipts[-1]  # the cost of the last call, in the caller's context


def test_the_cost_on_the_sdks_raw_response_is_the_receipts(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    raw = client_of(gw).messages.with_raw_response.create(
        model="sandbox/small", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().content[0].text.startswith("Echo:")
    charged = check_books(view, wallet, [gw], model_calls=1)
    assert int(raw.headers["llm402-cost"]) == charged == gw.last_receipt.cost  # type: ignore[union-attr]


def test_a_key_based_gateway_takes_the_key_as_auth_token(sandbox: SandboxServer, monkeypatch: Any) -> None:
    key = str(httpx.post(f"{sandbox.url}/sandbox/aisa/keys", json={"credits_usd": "1"}).json()["key"])
    monkeypatch.setenv("AISA_API_KEY", key)
    gw = Gateway(f"{sandbox.url}/aisa/v1", profile="aisa", ledger="memory://", policy=Policy(daily_cap_usd="5"))
    client = anthropic.Anthropic(
        base_url=gw.base_url.removesuffix("/v1"), auth_token=gw.api_key, http_client=gw.httpx2_client()
    )
    text, tokens = tool_loop(client, stream=True)
    assert text == "The tool returned: sunny"
    receipts = paid(gw)
    assert [(r.prompt_tokens, r.completion_tokens) for r in receipts] == tokens
    spent = sum(r.cost for r in receipts)
    assert Decimal(receipts[-1].credits_remaining or "0") == Decimal(1) - Decimal(spent) / 1_000_000


@pytest.mark.parametrize("stream", [False, True])
def test_a_cap_refusal_is_typed_and_not_retried(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, stream: bool
) -> None:
    gw = capped_gateway(sandbox, wallet)
    client = client_of(gw, max_retries=3)
    with pytest.raises(anthropic.APIStatusError) as caught:
        tool_loop(client, stream)
    assert caught.value.status_code == 402
    refusal = typed_error(caught.value)
    assert isinstance(refusal, BudgetExceeded) and refusal.code == "budget_exceeded"
    assert retryable(caught.value) is False
    with pytest.raises(BudgetExceeded), typed_errors():
        tool_loop(client, stream)
    assert len([r for r in gw.receipts() if r.error == "budget_exceeded"]) == 2  # max_retries=3: none taken
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS
