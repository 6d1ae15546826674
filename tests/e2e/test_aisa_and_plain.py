"""The AIsa profile (api_key_proxy credits, usage.cost, the router skill's error table, x402 without a key) and a
plain gateway (no payment; metering and budgets still apply)."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest
from e2e_support import FUNDS, SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.errors import GatewayAuthError, InsufficientCredits, ModelNotFound
from llm402.openai import typed_error
from llm402.pricing import ModelPrice
from llm402.sandbox import SandboxServer

MESSAGES = [{"role": "user", "content": "Explain quantum computing in simple terms."}]


def aisa_key(sandbox: SandboxServer, credits_usd: str = "1") -> str:
    return str(httpx.post(f"{sandbox.url}/sandbox/aisa/keys", json={"credits_usd": credits_usd}).json()["key"])


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), max_retries=0)


def test_aisa_usage_cost_and_credits_reach_the_receipt(sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AISA_API_KEY", aisa_key(sandbox))
    gw = Gateway(f"{sandbox.url}/aisa/v1", profile="aisa", ledger="memory://")
    reply = client(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=64)  # type: ignore[arg-type]
    usage = reply.usage.model_dump() if reply.usage else {}
    receipt = gw.last_receipt
    assert receipt is not None
    assert receipt.cost == int(Decimal(str(usage["cost"])) * 1_000_000) > 0
    assert receipt.credits_remaining is not None
    assert Decimal(receipt.credits_remaining) == Decimal(str(usage["credits_remaining"]))
    stream = client(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES, stream=True)  # type: ignore[call-overload]
    assert all(chunk.choices for chunk in stream)
    assert gw.last_receipt is not None
    assert gw.last_receipt.cost > 0
    assert gw.last_receipt.streamed


def test_aisa_error_table_maps_to_typed_errors(sandbox: SandboxServer) -> None:
    bad = Gateway(f"{sandbox.url}/aisa/v1", profile="aisa", api_key="sk-" + "0" * 64, ledger="memory://")
    with pytest.raises(openai.AuthenticationError) as auth:
        client(bad).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert isinstance(typed_error(auth.value), GatewayAuthError)
    good = Gateway(f"{sandbox.url}/aisa/v1", profile="aisa", api_key=aisa_key(sandbox, "0"), ledger="memory://")
    with pytest.raises(openai.APIStatusError) as broke:
        client(good).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert isinstance(typed_error(broke.value), InsufficientCredits)
    with pytest.raises(openai.APIStatusError) as unpriced:  # under the default daily cap: no price, no traffic
        client(good).chat.completions.create(model="xyz", messages=MESSAGES)  # type: ignore[arg-type]
    assert unpriced.value.status_code == 402
    refused = typed_error(unpriced.value)
    assert refused is not None and refused.code == "price_unknown"
    lenient = Gateway(
        f"{sandbox.url}/aisa/v1",
        profile="aisa",
        api_key=aisa_key(sandbox, "0"),
        ledger="memory://",
        policy=Policy(allow_unpriced=True),
    )
    with pytest.raises(openai.NotFoundError) as missing:
        client(lenient).chat.completions.create(model="xyz", messages=MESSAGES)  # type: ignore[arg-type]
    error = typed_error(missing.value)
    assert isinstance(error, ModelNotFound)
    assert error.code == "model_not_found"


def test_aisa_without_a_key_pays_per_call_and_probe_quotes(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AISA_API_KEY", raising=False)
    gw = Gateway(f"{sandbox.url}/aisa/v1", profile="aisa", wallet=wallet, ledger="memory://")
    quote = gw.quote({"model": "sandbox/small", "messages": MESSAGES, "max_tokens": 32})
    client(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=32)  # type: ignore[arg-type]
    assert gw.last_receipt is not None
    assert gw.last_receipt.cost == quote.amount == FUNDS - view.balance(wallet.address)


def test_plain_gateway_meters_and_budgets_without_paying(sandbox: SandboxServer) -> None:
    price = ModelPrice.from_usd("0.15", "0.60")
    gw = Gateway(
        f"{sandbox.url}/free/v1",
        ledger="memory://",
        prices={"sandbox/small": price},
        policy=Policy(daily_cap_usd="0.0004"),
    )
    c = client(gw)
    reply = c.chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]
    assert reply.usage is not None
    receipt = gw.last_receipt
    assert receipt is not None
    assert receipt.payment is None
    assert receipt.cost == price.cost(reply.usage.prompt_tokens, reply.usage.completion_tokens) > 0
    # the reservation for a big max_tokens does not fit the cap: refused before any traffic
    with pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=4000)  # type: ignore[arg-type]
    error = typed_error(info.value)
    assert error is not None
    assert error.code == "budget_exceeded"
