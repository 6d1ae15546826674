"""Live recording against real gateways: opt-in, never in CI.

    LLM402_LIVE=1 LLM402_PRIVATE_KEY=0x... AISA_API_KEY=... \\
        .venv/bin/pytest tests/contract -m live --record-mode=once

Each test drives the same flow as its replay test, against the real gateway, and records it into
``cassettes/live/<name>.yaml`` through the same filters (no key, signature, SIWE credential or settlement report
is stored; ``test_contract_cassettes`` scans the result). The assertions are the documents' claims that hold for any
account (shapes, units, who pays whom), not the documents' example values. Spending is bounded by the policy below:
at most one top-up of ``LLM402_LIVE_TOPUP_USD`` (default $1, the Token Kiosk minimum) and max_tokens 16 per call.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from contract_support import AISA_URL, BASE_MAINNET, KIOSK_URL, WireLog, uses_cassette

from llm402 import Gateway, Policy, Wallet

pytestmark = pytest.mark.live
ARBITRUM = "eip155:42161"


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        pytest.skip(f"live recording needs {name}")
    return value


@uses_cassette("live/token_kiosk_first_call")
def test_live_token_kiosk_first_call(wire: WireLog, tmp_path: Path) -> None:
    wallet = Wallet.from_env() if env("LLM402_PRIVATE_KEY") else None
    topup = env("LLM402_LIVE_TOPUP_USD", "1")
    policy = Policy(
        max_payment_usd=topup,
        topup_max_usd=topup,
        daily_cap_usd=str(Decimal(topup) + 1),
        allowed_networks={BASE_MAINNET, ARBITRUM},
    )
    gw = Gateway(
        env("LLM402_KIOSK_URL", KIOSK_URL),
        wallet=wallet,
        profile="token-kiosk",
        policy=policy,
        ledger="memory://",
        key_store=str(tmp_path / "kiosk.key"),
    )
    assert len(gw.load_prices()) > 0  # List Models: prices per 1M tokens
    client = openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client())
    reply = client.chat.completions.create(
        model=env("LLM402_KIOSK_MODEL", "gemini/gemini-2.5-flash"),
        messages=[{"role": "user", "content": "What is x402?"}],
        max_tokens=16,
    )
    assert reply.usage is not None
    assert (tmp_path / "kiosk.key").read_text().startswith("sk-")
    for receipt in gw.receipts():
        if receipt.payment is not None:  # a top-up was needed: USDC on an allowed network, to the quoted payee
            assert receipt.payment.kind == "topup"
            assert receipt.payment.network in policy.allowed_networks  # type: ignore[operator]
    with gw.credit_account() as account:
        usage: dict[str, Any] = account.usage()
        assert usage["available_usdc"] == usage["balance_usdc"] - usage["locked_usdc"]
        assert isinstance(account.balance()["available_usdc"], int)
        assert "topups" in account.topups()
        assert account.list_keys()


@uses_cassette("live/aisa_router_chat_and_stream")
def test_live_aisa_router_usage_cost(wire: WireLog) -> None:
    env("AISA_API_KEY")
    gw = Gateway(env("LLM402_AISA_URL", AISA_URL), profile="aisa", ledger="memory://")
    client = openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client())
    model = env("LLM402_AISA_MODEL", "gpt-4.1")
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=16)
    extra = reply.usage.model_dump() if reply.usage else {}
    assert "cost" in extra, "Pricing: 'Every response includes usage.cost and usage.credits_remaining'"
    assert gw.last_receipt is not None
    assert gw.last_receipt.cost > 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a poem about AI."}], max_tokens=16, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert gw.last_receipt is not None
    assert gw.last_receipt.streamed


@uses_cassette("live/aisa_compute_x402_probe")
def test_live_aisa_x402_probe(wire: WireLog) -> None:
    """x402_probe against a pay-per-call AIsa endpoint: a quote, nothing paid."""
    gw = Gateway(env("LLM402_AISA_X402_URL"), profile="aisa", wallet=Wallet.create(), ledger="memory://")
    quote = gw.quote(
        {
            "model": env("LLM402_AISA_MODEL", "gpt-5.2"),
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 16,
        }
    )
    assert quote.amount > 0
    assert wire.paid() == []
