"""The OpenAI Responses API and Anthropic Messages through llm402 against the sandbox: an unchanged
``openai.OpenAI(...).responses.create`` (streamed and not) and Anthropic Messages by raw httpx POSTs (and through the
``anthropic`` SDK) on a paid mount (exact and upto), an AIsa key, and a plain gateway with
prices. Receipts carry the exact tokens the answer reported; their cost is what the sandbox charged, to the atomic
unit (its balances are the independent side); a plain gateway's daily cap binds on the metered costs."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from e2e_support import FUNDS, SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.openai import typed_error
from llm402.pricing import ModelPrice, estimate_cost
from llm402.receipts import Receipt
from llm402.sandbox import SandboxServer

PROMPT = "word " * 2000  # 2,000 sandbox tokens, 10,000 bytes
INSTRUCTIONS = "Answer in one line."
PRICE = ModelPrice.from_usd("0.15", "0.60")  # the sandbox's own price of sandbox/small
RESPONSES_KW: dict[str, Any] = {
    "model": "sandbox/small",
    "instructions": INSTRUCTIONS,
    "input": "Explain x402 in one line",
    "max_output_tokens": 16,
}
MESSAGES_BODY: dict[str, Any] = {
    "model": "sandbox/small",
    "system": INSTRUCTIONS,
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "Explain x402 in one line"}],
}


def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), max_retries=0)


def respond(client: openai.OpenAI, stream: bool, **kw: Any) -> tuple[int, int]:
    """One ``responses.create`` call; the (input, output) tokens the answer itself reported."""
    if not stream:
        response = client.responses.create(**{**RESPONSES_KW, **kw})
        assert response.output_text.startswith("Echo:")
        assert response.usage is not None
        return response.usage.input_tokens, response.usage.output_tokens
    events = list(client.responses.create(**{**RESPONSES_KW, **kw}, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    usage = events[-1].response.usage
    assert usage is not None
    return usage.input_tokens, usage.output_tokens


def sse_events(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[5:]) for block in text.split("\n\n") for line in block.splitlines() if line.startswith("data:")
    ]


class Refused(Exception):
    """llm402 answered a call with its own 402 refusal envelope."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.text)
        self.code = response.json()["error"]["code"]


def post_message(
    client: httpx.Client, url: str, stream: bool, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, int]:
    """One Anthropic Messages call by raw httpx; the (input, output) tokens the answer reported."""
    body = {**MESSAGES_BODY, **kw, "stream": stream}
    headers = {"anthropic-version": "2023-06-01", **(headers or {})}
    if not stream:
        response = client.post(url, json=body, headers=headers)
        if response.status_code == 402:
            raise Refused(response)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        return usage["input_tokens"], usage["output_tokens"]
    with client.stream("POST", url, json=body, headers=headers) as response:
        body_bytes = response.read()
        if response.status_code == 402:
            raise Refused(response)
        assert response.status_code == 200
        events = sse_events(body_bytes.decode())
    start = next(e for e in events if e["type"] == "message_start")["message"]["usage"]
    delta = next(e for e in events if e["type"] == "message_delta")["usage"]
    assert events[-1]["type"] == "message_stop"
    return start["input_tokens"], delta["output_tokens"]


def only_receipt(gw: Gateway, streamed: bool) -> Receipt:
    receipt = gw.last_receipt
    assert receipt is not None and receipt.status == 200 and receipt.error is None
    assert receipt.streamed is streamed
    return receipt


def ledger_total(gw: Gateway) -> int:
    totals = gw.ledger.totals(gw.agent, time.strftime("%Y-%m-%d", time.gmtime()))
    return int(totals.day_spent + totals.day_reserved)


# --- paid per call ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_responses_paid_exact(sandbox: SandboxServer, view: SandboxView, wallet: Wallet, stream: bool) -> None:
    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    tokens = respond(sdk(gw), stream)
    receipt = only_receipt(gw, stream)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == tokens
    assert receipt.payment is not None and receipt.payment.scheme == "exact"
    assert receipt.path == "/v1/responses"
    assert receipt.cost == FUNDS - view.balance(wallet.address) > 0
    assert ledger_total(gw) == receipt.cost


@pytest.mark.parametrize("stream", [False, True])
def test_responses_paid_upto_settle_the_metered_cost(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, stream: bool
) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    tokens = respond(sdk(gw), stream, max_output_tokens=400)
    receipt = only_receipt(gw, stream)
    charged = FUNDS - view.balance(wallet.address)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == tokens
    assert receipt.payment is not None and receipt.payment.scheme == "upto"
    assert receipt.cost == receipt.payment.settled_amount == charged == PRICE.cost(*tokens)
    assert charged < receipt.payment.amount, "a short answer settles below the 400-token ceiling"
    assert ledger_total(gw) == charged


def test_a_responses_tool_loop_pays_each_model_call_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    client = sdk(gw)
    tool: Any = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    }
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.responses.create(model="sandbox/small", input=history, tools=[tool], max_output_tokens=64)
    [call] = [item for item in first.output if item.type == "function_call"]
    history += [
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    events = list(
        client.responses.create(model="sandbox/small", input=history, tools=[tool], max_output_tokens=64, stream=True)
    )
    final = events[-1].response  # type: ignore[union-attr]
    assert first.usage is not None and final.usage is not None
    assert final.output_text == "The tool returned: sunny"
    receipts = gw.receipts()
    assert len(receipts) == 2 and all(r.payment is not None for r in receipts)
    assert [(r.prompt_tokens, r.completion_tokens) for r in receipts] == [
        (first.usage.input_tokens, first.usage.output_tokens),
        (final.usage.input_tokens, final.usage.output_tokens),
    ]
    assert sum(r.cost for r in receipts) == FUNDS - view.balance(wallet.address) == ledger_total(gw)
    assert len(view.settlements(wallet.address)) == 2


@pytest.mark.parametrize("mount", ["/v1", "/upto/v1"])
@pytest.mark.parametrize("stream", [False, True])
def test_messages_paid_by_raw_httpx(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, mount: str, stream: bool
) -> None:
    gw = Gateway(f"{sandbox.url}{mount}", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    with gw.http_client() as client:
        tokens = post_message(client, f"{gw.base_url}/messages", stream, max_tokens=400 if "upto" in mount else 16)
    receipt = only_receipt(gw, stream)
    charged = FUNDS - view.balance(wallet.address)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == tokens
    assert receipt.cost == charged > 0
    if "upto" in mount:
        assert receipt.payment is not None and receipt.payment.scheme == "upto"
        assert charged == PRICE.cost(*tokens)
    assert ledger_total(gw) == charged


def test_messages_through_the_anthropic_sdk(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    import anthropic  # in the dev extra: never skipped

    gw = Gateway(f"{sandbox.url}/upto/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
    client = anthropic.Anthropic(
        base_url=gw.base_url.removesuffix("/v1"), api_key=gw.api_key, http_client=gw.httpx2_client(), max_retries=0
    )
    kw = {k: v for k, v in MESSAGES_BODY.items() if k != "max_tokens"}
    message = client.messages.create(**kw, max_tokens=400)
    assert message.content[0].text.startswith("Echo:")
    first = only_receipt(gw, False)
    assert (first.prompt_tokens, first.completion_tokens) == (message.usage.input_tokens, message.usage.output_tokens)
    with client.messages.stream(**kw, max_tokens=400) as stream:
        final = stream.get_final_message()
    second = only_receipt(gw, True)
    assert (second.prompt_tokens, second.completion_tokens) == (final.usage.input_tokens, final.usage.output_tokens)
    assert first.cost + second.cost == FUNDS - view.balance(wallet.address)
    free = plain(sandbox)
    client = anthropic.Anthropic(
        base_url=free.base_url.removesuffix("/v1"), api_key=free.api_key, http_client=free.httpx2_client()
    )
    events = list(
        client.messages.create(**{**kw, "messages": [{"role": "user", "content": PROMPT}]}, max_tokens=16, stream=True)
    )
    receipt = only_receipt(free, True)
    tokens = (events[0].message.usage.input_tokens, events[-2].usage.output_tokens)
    assert tokens[0] > 2000 and (receipt.prompt_tokens, receipt.completion_tokens) == tokens
    assert receipt.cost == PRICE.cost(*tokens)


# --- AIsa: the cost in each API's usage -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_aisa_usage_cost_of_responses_and_messages(
    sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    key = str(httpx.post(f"{sandbox.url}/sandbox/aisa/keys", json={"credits_usd": "1"}).json()["key"])
    monkeypatch.setenv("AISA_API_KEY", key)
    gw = Gateway(f"{sandbox.url}/aisa/v1", profile="aisa", ledger="memory://", policy=Policy(daily_cap_usd="5"))
    tokens = respond(sdk(gw), stream)
    receipt = only_receipt(gw, stream)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == tokens
    assert receipt.cost == PRICE.cost(*tokens) > 0  # from usage.cost, the sandbox's charge
    assert receipt.credits_remaining is not None
    spent = receipt.cost
    with gw.http_client() as client:
        # a raw POST sends the key itself, as the OpenAI SDK does (the Anthropic SDK: auth_token=)
        tokens = post_message(client, f"{gw.base_url}/messages", stream, {"authorization": f"Bearer {key}"})
    receipt = only_receipt(gw, stream)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == tokens
    assert receipt.cost == PRICE.cost(*tokens)
    assert receipt.credits_remaining is not None
    assert Decimal(receipt.credits_remaining) == Decimal(1) - Decimal(spent + receipt.cost) / 1_000_000


# --- a plain gateway: metered, and its cap binds -----------------------------------------------------------------------


def plain(sandbox: SandboxServer, cap_usd: str | None = "5") -> Gateway:
    return Gateway(
        f"{sandbox.url}/free/v1",
        ledger="memory://",
        prices={"sandbox/small": PRICE},
        policy=Policy(daily_cap_usd=cap_usd),
    )


@pytest.mark.parametrize("stream", [False, True])
def test_plain_responses_are_metered_by_usage(sandbox: SandboxServer, stream: bool) -> None:
    gw = plain(sandbox)
    tokens = respond(sdk(gw), stream, input=PROMPT)
    receipt = only_receipt(gw, stream)
    assert tokens[0] > 2000
    assert (receipt.prompt_tokens, receipt.completion_tokens) == tokens
    assert receipt.payment is None
    assert receipt.cost == PRICE.cost(*tokens) < receipt.reserved, "the usage, not the reservation"
    assert receipt.reserved == estimate_cost(PRICE, {**RESPONSES_KW, "input": PROMPT})  # max_output_tokens: 16


@pytest.mark.parametrize("stream", [False, True])
def test_plain_messages_count_the_input_of_message_start(sandbox: SandboxServer, stream: bool) -> None:
    gw = plain(sandbox)
    with gw.http_client() as client:
        tokens = post_message(client, f"{gw.base_url}/messages", stream, messages=[{"role": "user", "content": PROMPT}])
    receipt = only_receipt(gw, stream)
    assert tokens[0] > 2000
    assert (receipt.prompt_tokens, receipt.completion_tokens) == tokens
    assert receipt.cost == PRICE.cost(*tokens) < receipt.reserved


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["responses", "messages"])
def test_a_plain_daily_cap_binds_on_the_metered_costs(sandbox: SandboxServer, api: str, stream: bool) -> None:
    """Each call reserves ~1,500 micro-USDC (10,000 prompt bytes) and costs ~305 by its usage: under a 2,000 cap two
    calls fit (counting a stream by its reservation, or the input as 0, would admit one, or too many)."""
    gw = plain(sandbox, cap_usd="0.002")
    client = sdk(gw)
    messages = [{"role": "user", "content": PROMPT}]
    if api == "responses":
        reserved = estimate_cost(PRICE, {**RESPONSES_KW, "input": PROMPT})
    else:
        reserved = estimate_cost(PRICE, {**MESSAGES_BODY, "messages": messages})
    admitted: list[tuple[int, int]] = []
    code = None
    with gw.http_client() as raw:
        for _ in range(10):
            try:
                if api == "responses":
                    admitted.append(respond(client, stream, input=PROMPT))
                else:
                    admitted.append(post_message(raw, f"{gw.base_url}/messages", stream, messages=messages))
            except openai.APIStatusError as exc:  # the OpenAI SDK: a typed refusal
                refused = typed_error(exc)
                code = refused.code if refused is not None else None
                break
            except Refused as exc:
                code = exc.code
                break
    assert code == "budget_exceeded"
    cost = PRICE.cost(*admitted[0])
    expected, spent = 0, 0
    while spent + reserved <= 2000:
        spent, expected = spent + cost, expected + 1
    assert len(admitted) == expected == 2
    receipts = [r for r in gw.receipts() if r.status == 200]
    assert [r.cost for r in receipts] == [cost] * expected
    assert ledger_total(gw) == cost * expected <= 2000
