"""Token Kiosk (shared/seeds/002): the documented examples replayed through llm402 and the OpenAI SDK.

Each test names the cassette it replays; the cassette names the document section of every answer.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from contract_support import (
    BASE_MAINNET,
    BASE_USDC,
    KIOSK_PAYEE,
    KIOSK_URL,
    KIOSK_USDT,
    Sent,
    WireLog,
    cassette_marks,
    eip3009_signer,
    siwe_signer,
    uses_cassette,
)
from siwe import SiweMessage

from llm402 import Gateway, Policy, Wallet
from llm402.budget.base import receipt_day
from llm402.credit import CreditProfile
from llm402.errors import (
    GatewayAuthError,
    GatewayRateLimited,
    GatewayServerError,
    GatewayValidationError,
    InsufficientCredits,
    PaymentRequiredError,
)
from llm402.openai import refusal_from_error, typed_error
from llm402.pricing import ModelPrice, estimate_cost, max_completion_tokens

FLASH = "gemini/gemini-2.5-flash"
DOC_KEY = "sk-a3f9e2b1c4d5..."  # API Keys > Create API Key: the document's own example key
API_KEY = "sk-your-api-key"  # the placeholder key of every inference example
# Quickstart > Available models: "These are the rates you're billed at."
QUICKSTART_PRICES = {
    "gemini/gemini-2.5-flash": ModelPrice.from_usd("0.15", "0.60"),
    "gemini/gemini-2.5-pro": ModelPrice.from_usd("1.25", "10.00"),
    "kimi/kimi-k2.5": ModelPrice.from_usd("0.60", "3.00"),
    "minimax/MiniMax-M2.5": ModelPrice.from_usd("0.118", "0.95"),
    "bedrock/nova-pro": ModelPrice.from_usd("0.80", "3.20"),
    "bedrock/qwen3-32b": ModelPrice.from_usd("0.155", "0.618"),
}
BOTH_ASSETS = Policy(allowed_networks={BASE_MAINNET}, allowed_assets={BASE_USDC, KIOSK_USDT}, max_payment_usd="5")


def kiosk(wallet: Wallet | None = None, **kw: Any) -> Gateway:
    kw.setdefault("ledger", "memory://")
    kw.setdefault("policy", Policy(allow_unpriced=True))  # examples whose model has no price in the fixture
    return Gateway(KIOSK_URL, wallet=wallet, profile="token-kiosk", **kw)


def client_for(gw: Gateway, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), **kw)


def micro(usd_per_1m_prompt: str, usd_per_1m_completion: str, prompt: int, completion: int) -> int:
    """Cost in micro-USDC, rounded up (the billing rule of Pricing > What you're charged, in integers)."""
    exact = (Decimal(usd_per_1m_prompt) * prompt + Decimal(usd_per_1m_completion) * completion) / 1_000_000
    return int((exact * 1_000_000).to_integral_value(rounding="ROUND_CEILING"))


def shape(sent: list[Sent]) -> list[tuple[str, str, bool, bool]]:
    return [(s.method, s.path, "authorization" in s.headers, "x-payment" in s.headers) for s in sent]


def assert_siwe(sent: Sent, wallet: Wallet, body: dict[str, Any] | None = None) -> None:
    """Authentication > Verification Rules and Client onboarding > SIWE message alignment."""
    data = body if body is not None else sent.json()
    message = SiweMessage.from_message(data["message"])
    assert message.domain == "agent-router.gaib.ai"
    assert message.uri == "https://agent-router.gaib.ai/v1/auth/keys"
    assert message.chain_id == 8453  # Base mainnet, as the gateway's 402 presents it
    assert message.version == "1"
    assert message.statement == "Sign in to the AI Gateway"
    assert message.address == wallet.address  # checksummed EIP-55
    issued = datetime.fromisoformat(message.issued_at.replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - issued).total_seconds()) < 300  # "issuedAt must be within the last 5 minutes"
    assert re.fullmatch(r"[0-9a-zA-Z]{8,}", message.nonce)
    assert siwe_signer(data["message"], data["signature"]) == wallet.address


def assert_usdc_topup(sent: Sent, wallet: Wallet, amount: int) -> None:
    """The X-Payment of a top-up: an x402 v2 payload over the USDC requirement, EIP-3009 signed by the wallet."""
    payment = sent.payment()
    assert payment is not None
    assert payment["x402Version"] == 2
    accepted = payment["accepted"]
    assert (accepted["network"], accepted["asset"], accepted["payTo"]) == (BASE_MAINNET, BASE_USDC, KIOSK_PAYEE)
    assert accepted["extra"]["assetTransferMethod"] == "eip3009"  # USDC (ERC-3009), not USDT (Permit2)
    auth = payment["payload"]["authorization"]
    assert (auth["from"], auth["to"], int(auth["value"])) == (wallet.address, KIOSK_PAYEE, amount)
    assert int(auth["validBefore"]) > time.time() > int(auth["validAfter"])
    signature = payment["payload"]["signature"]
    assert re.fullmatch(r"0x[0-9a-f]{130}", signature)
    assert eip3009_signer(auth, signature, chain_id=8453, asset=BASE_USDC) == wallet.address


# --- Quickstart / Client onboarding: the 3-step flow, driven by one OpenAI SDK call -------------------------------


@uses_cassette("token_kiosk/onboarding")
def test_first_call_mints_a_key_tops_up_and_replays(wallet: Wallet, wire: WireLog, vcr: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "kiosk.key"
    policy = Policy(topup_min_usd="5", topup_max_usd="5", daily_cap_usd="10", allowed_networks={BASE_MAINNET})
    gw = kiosk(wallet, agent="kiosk-agent", policy=policy, key_store=str(key_file))
    catalog = gw.load_prices()  # List Models: the rates you're billed at
    price = catalog.lookup(FLASH)
    assert price == ModelPrice.from_usd("0.15", "0.60", context_length=1048576)

    reply = client_for(gw).chat.completions.create(
        model=FLASH, messages=[{"role": "user", "content": "What is x402?"}], max_tokens=256
    )
    assert reply.choices[0].message.content.startswith("x402 is an open protocol")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (20, 9)

    chat = "/v1/chat/completions"
    assert shape(wire.sent) == [
        ("GET", "/v1/models", False, False),  # no auth required
        ("POST", "/v1/topup", False, False),  # the chain to sign in on, from the $1 top-up 402
        ("POST", "/v1/auth/keys", False, False),  # Step 2: SIWE in the body, no Bearer
        ("POST", chat, True, False),  # Step 3: Bearer sk-... -> 402 INSUFFICIENT_BALANCE
        ("POST", "/v1/topup", False, False),  # Step 1: {amount: 5} -> 402 accepts
        ("POST", "/v1/topup", False, True),  # ... replayed with X-Payment
        ("POST", chat, True, False),  # the call, replayed once
    ]
    assert_siwe(wire.sent[2], wallet)
    assert wire.sent[2].json()["label"] == "llm402 kiosk-agent"
    assert {s.headers["authorization"] for s in wire.to(chat)} == {f"Bearer {DOC_KEY}"}
    assert key_file.read_text().strip() == DOC_KEY  # "shown only once": kept where the user said
    assert wire.sent[4].json() == {"amount": 5.0} == wire.sent[5].json()
    assert_usdc_topup(wire.sent[5], wallet, 5_000_000)

    topup, call = list(gw.receipts())
    assert topup.payment is not None
    assert topup.payment.kind == "topup"
    assert (topup.payment.network, topup.payment.asset, topup.payment.amount) == (BASE_MAINNET, BASE_USDC, 5_000_000)
    assert (topup.payment.payer, topup.payment.payee) == (wallet.address, KIOSK_PAYEE)
    assert call.payment is None and call.status == 200
    assert (call.prompt_tokens, call.completion_tokens) == (20, 9)
    assert call.cost == price.cost(20, 9) == micro("0.15", "0.60", 20, 9) == 9  # metered at the catalog's rates
    # a top-up is money out of the wallet, booked in its own account (<agent>#topup, under the daily top-up limit),
    # never as consumption: the agent's day and the global sum count only the call's metered 9
    assert topup.cost == 5_000_000
    day = receipt_day(call.started_at)
    consumed, bought = gw.ledger.totals("kiosk-agent", day), gw.ledger.totals("kiosk-agent#topup", day)
    assert (consumed.day_spent, consumed.agent_spent, consumed.global_spent) == (9, 9, 9)
    assert (bought.day_spent, bought.day_reserved) == (5_000_000, 0)

    with gw.credit_account() as account:  # Quickstart > Step 4; Usage; Balance; Top-up History
        usage = account.usage()
        assert (usage["balance_usdc"], usage["locked_usdc"], usage["available_usdc"]) == (4950000, 0, 4950000)
        assert usage["keys"][0]["request_count"] == 3
        assert account.balance() == {"wallet": "0xabc...", "available_usdc": 4950000}
        history = account.topups()
        assert history["network"] == "Base (Mainnet)"
        assert history["topups"][0]["amount_usdc"] == 5_000_000
    account_calls = wire.sent[7:]
    assert [s.path for s in account_calls] == [
        f"/v1/usage/{wallet.address}",
        f"/v1/balance/{wallet.address}",
        f"/v1/topups/{wallet.address}",
    ]
    assert [s.headers.get("authorization") for s in account_calls] == [f"Bearer {DOC_KEY}", None, f"Bearer {DOC_KEY}"]
    assert vcr.all_played


# --- Top Up: USDC is chosen over USDT, and the replay carries an EIP-3009 signature -------------------------------


@pytest.mark.parametrize(
    "policy", [Policy(topup_max_usd="5"), BOTH_ASSETS], ids=["usdc-only-topup-limit", "usdc-and-usdt-allowed"]
)
@uses_cassette("token_kiosk/topup")
def test_topup_pays_usdc_with_one_signature(wallet: Wallet, wire: WireLog, vcr: Any, policy: Policy) -> None:
    """A $5 top-up needs a top-up limit of $5: ``topup_max_usd``, or a max ticket of $5 (its default)."""
    gw = kiosk(wallet, policy=policy)
    with gw.credit_account() as account:
        receipt = account.topup("5")
    assert receipt.payment is not None
    assert (receipt.payment.asset, receipt.payment.amount, receipt.payment.kind) == (BASE_USDC, 5_000_000, "topup")
    assert receipt.status == 200
    assert shape(wire.sent) == [("POST", "/v1/topup", False, False), ("POST", "/v1/topup", False, True)]
    assert_usdc_topup(wire.sent[1], wallet, 5_000_000)
    assert vcr.all_played


@uses_cassette("token_kiosk/topup_concepts")
def test_topup_402_with_max_amount_required_only(wallet: Wallet, wire: WireLog, vcr: Any) -> None:
    """Top up (x402) > Step 1 prints a requirement with ``maxAmountRequired`` and no ``amount``."""
    with kiosk(wallet, policy=Policy(topup_max_usd="5")).credit_account() as account:
        receipt = account.topup("5")
    assert receipt.payment is not None
    assert receipt.payment.amount == 5_000_000
    assert_usdc_topup(wire.sent[1], wallet, 5_000_000)
    assert vcr.all_played


@pytest.mark.parametrize(
    "policy", [Policy(topup_max_usd="1"), Policy()], ids=["topup-limit", "default-limit-is-the-max-ticket"]
)
@uses_cassette("token_kiosk/topup")
def test_topup_above_the_policy_limit_is_never_signed(wallet: Wallet, wire: WireLog, vcr: Any, policy: Policy) -> None:
    """The top-up limit is ``topup_max_usd``, else the max ticket ($1 by default): a $5 top-up is refused unsent."""
    account = kiosk(wallet, policy=policy).credit_account()
    with account, pytest.raises(PaymentRequiredError) as info:
        account.topup("5")
    assert info.value.code == "topup_refused"
    assert wire.sent == []
    assert vcr.play_count == 0


# --- API Keys: create, list, revoke; a revoked key is rejected ----------------------------------------------------


@uses_cassette("token_kiosk/api_keys")
def test_api_keys_create_list_revoke(wallet: Wallet, wire: WireLog, vcr: Any, tmp_path: Path) -> None:
    gw = kiosk(wallet, credit=CreditProfile(chain_id=8453))  # Quickstart > Step 2: chainId 8453 (Base mainnet)
    store = tmp_path / "keys" / "kiosk.key"
    with gw.credit_account() as account:
        created = account.create_key("my-app", store=str(store))
        assert created == {"id": 1, "key": DOC_KEY, "label": "my-app", "created_at": "2026-04-07T12:00:00.000Z"}
        assert store.read_text().strip() == DOC_KEY
        assert account.list_keys() == [
            {"id": 1, "label": "my-app", "created_at": "2026-04-07T12:00:00.000Z", "revoked_at": None}
        ]
        assert account.revoke_key(1) is True
    create, listing, revoke = wire.sent
    assert (create.method, create.path) == ("POST", "/v1/auth/keys")
    assert_siwe(create, wallet)
    assert (listing.method, listing.path) == ("GET", "/v1/auth/keys")  # SIWE as query parameters
    from urllib.parse import parse_qs, urlsplit

    query = {k: v[0] for k, v in parse_qs(urlsplit(listing.url).query).items()}
    assert_siwe(listing, wallet, query)
    assert (revoke.method, revoke.path) == ("DELETE", "/v1/auth/keys/1")
    assert_siwe(revoke, wallet)
    assert len({create.json()["message"], query["message"], revoke.json()["message"]}) == 3  # each one fresh

    revoked = kiosk(api_key=DOC_KEY)
    with pytest.raises(openai.AuthenticationError) as info:
        client_for(revoked).chat.completions.create(model=FLASH, messages=[{"role": "user", "content": "Hello!"}])
    error = info.value.response.json()["error"]
    assert error["code"] == "api_key_rejected"
    assert "llm402 keys create" in error["message"]
    assert DOC_KEY not in info.value.response.text
    assert info.value.response.headers["x-should-retry"] == "false"
    assert vcr.all_played


@uses_cassette("token_kiosk/errors/unauthorized")
def test_typed_error_names_a_rejected_key() -> None:
    gw = kiosk(api_key=API_KEY)
    with pytest.raises(openai.AuthenticationError) as info:
        client_for(gw).chat.completions.create(model=FLASH, messages=[{"role": "user", "content": "Hello!"}])
    error = typed_error(info.value)
    assert error is not None
    assert error.code == "api_key_rejected"


# --- public endpoints ---------------------------------------------------------------------------------------------


@uses_cassette("token_kiosk/public_endpoints")
def test_health_models_and_an_unknown_wallets_balance(wallet: Wallet, wire: WireLog, vcr: Any) -> None:
    public = kiosk()  # no wallet: with one, the kiosk profile would first mint a key for any request
    with public.http_client() as http:
        assert http.get(f"{public.origin}/health").json() == {"status": "ok"}
    assert FLASH in public.load_prices()
    with kiosk(wallet).credit_account() as account:
        assert account.balance()["available_usdc"] == 0  # "rather than a 404"
    assert all("authorization" not in s.headers for s in wire.sent)  # public: no auth
    assert vcr.all_played


# --- Chat Completions, OpenAI SDK integration, For AI Agents, Anthropic --------------------------------------------

CHAT_EXAMPLES = [
    pytest.param(
        {
            "model": FLASH,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello!"},
            ],
            "max_tokens": 512,
        },
        "Hello! How can I help?",
        (20, 9),
        id="chat-completions-curl",
    ),
    pytest.param(
        {"model": FLASH, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 512},
        "Hello! How can I help?",
        (20, 9),
        id="openai-sdk-python",
    ),
    pytest.param(
        {"model": FLASH, "messages": [{"role": "user", "content": "Hello"}]},
        "Hello! How can I help?",
        (8, 6),
        id="agents-python",
    ),
    pytest.param(
        {"model": "kimi/kimi-k2.5", "messages": [{"role": "user", "content": "Hello"}]},
        "Hello! What can I do for you?",
        (8, 8),
        id="agents-typescript-kimi",
    ),
    pytest.param(
        {
            "model": "bedrock/claude-haiku-4-5-20251001",
            "messages": [{"role": "user", "content": "Explain x402 in one sentence."}],
            "max_tokens": 512,
        },
        "x402 lets a client pay",
        (14, 22),
        id="anthropic-claude-haiku",
    ),
]


@pytest.mark.parametrize(("body", "answer", "tokens"), CHAT_EXAMPLES)
@uses_cassette("token_kiosk/chat_completions")
def test_chat_completion_examples(body: dict[str, Any], answer: str, tokens: tuple[int, int], wire: WireLog) -> None:
    gw = kiosk(api_key=API_KEY, prices=QUICKSTART_PRICES)
    reply = client_for(gw).chat.completions.create(**body)
    assert reply.choices[0].message.content.startswith(answer)
    assert reply.choices[0].finish_reason == "stop"
    receipt = gw.last_receipt
    assert receipt is not None
    assert (receipt.prompt_tokens, receipt.completion_tokens) == tokens
    price = QUICKSTART_PRICES.get(body["model"])
    assert receipt.cost == (price.cost(*tokens) if price else 0)
    # Credits & Billing: reserved before the call from max_tokens (Limits: default 1024), reconciled to usage
    assert receipt.reserved == estimate_cost(price, body)
    assert max_completion_tokens(body) == body.get("max_tokens", 1024)
    assert receipt.payment is None
    (chat,) = wire.to("/chat/completions")  # an unpriced model is looked up in GET /models first
    assert chat.headers["authorization"] == f"Bearer {API_KEY}"
    assert [(s.method, s.path) for s in wire.sent if s is not chat] == ([] if price else [("GET", "/v1/models")])


@uses_cassette("token_kiosk/chat_completions")
def test_reasoning_fields_are_stripped_before_the_gateway(wire: WireLog) -> None:
    """Chat Completions: 'Requests with thinking or reasoning_effort parameters return HTTP 400. Strip these fields
    before calling the gateway.' The token-kiosk profile strips them, so the documented plain request is sent."""
    gw = kiosk(api_key=API_KEY, prices=QUICKSTART_PRICES)
    reply = client_for(gw).chat.completions.create(
        model=FLASH, messages=[{"role": "user", "content": "Hello!"}], max_tokens=512, reasoning_effort="low"
    )
    assert reply.choices[0].message.content == "Hello! How can I help?"
    (sent,) = wire.sent  # the price is known: no catalog request first
    assert "reasoning_effort" not in sent.json()


@uses_cassette("token_kiosk/chat_completions")
def test_streaming_meters_the_usage_chunk_and_hides_it(wire: WireLog) -> None:
    gw = kiosk(api_key=API_KEY, prices=QUICKSTART_PRICES)
    stream = client_for(gw).chat.completions.create(
        model=FLASH, messages=[{"role": "user", "content": "Tell me a story"}], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello!"
    assert all(c.choices for c in chunks), "the usage chunk llm402 asked for must not reach a caller who did not"
    assert wire.sent[0].json()["stream_options"] == {"include_usage": True}
    receipt = gw.last_receipt
    assert receipt is not None
    assert receipt.streamed
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (12, 2)
    assert receipt.cost == micro("0.15", "0.60", 12, 2)


@uses_cassette("token_kiosk/chat_completions")
async def test_async_streaming_gives_usage_to_a_caller_who_asks(wire: WireLog) -> None:
    gw = kiosk(api_key=API_KEY, prices=QUICKSTART_PRICES)
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.async_http_client())
    stream = await client.chat.completions.create(
        model=FLASH,
        messages=[{"role": "user", "content": "Tell me a story"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (12, 2)
    assert gw.last_receipt is not None
    assert gw.last_receipt.cost == micro("0.15", "0.60", 12, 2)


@uses_cassette("token_kiosk/chat_completions")
def test_a_documented_stream_without_usage_is_not_metered_as_free(wire: WireLog) -> None:
    gw = kiosk(api_key=API_KEY, prices=QUICKSTART_PRICES)
    stream = client_for(gw).chat.completions.create(
        model=FLASH, messages=[{"role": "user", "content": "Hello!"}], max_tokens=512, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello!"
    receipt = gw.last_receipt
    assert receipt is not None
    assert receipt.reserved > 0
    assert receipt.cost == receipt.reserved  # no usage: the estimate stands (as for an aborted stream)


@uses_cassette("token_kiosk/chat_completions")
def test_tool_calling_returns_standard_openai_shapes() -> None:
    gw = kiosk(api_key=API_KEY)
    reply = client_for(gw).chat.completions.create(
        model=FLASH,
        messages=[{"role": "user", "content": "What is the weather in Tokyo?"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                },
            }
        ],
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather", '{"city":"Tokyo"}')


# --- Errors: every row of the error table ----------------------------------------------------------------------------


def _kiosk_error(
    name: str, profile: str = "token-kiosk", policy: Policy | None = None
) -> tuple[Gateway, openai.APIStatusError]:
    """The unknown model has no price: ``allow_unpriced`` lets it reach the gateway (else it is refused locally)."""
    policy = policy or Policy(allow_unpriced=True)
    gw = Gateway(
        KIOSK_URL, profile=profile, api_key=API_KEY, ledger="memory://", prices=QUICKSTART_PRICES, policy=policy
    )
    body: dict[str, Any] = {"model": FLASH, "messages": [{"role": "user", "content": "Hello!"}]}
    if name == "validation_error_thinking":
        body["reasoning_effort"] = "low"
    if name == "validation_error_unknown_model":
        body["model"] = "gemini/no-such-model"
    with pytest.raises(openai.APIStatusError) as info:
        client_for(gw, max_retries=0).chat.completions.create(**body)
    return gw, info.value


def _row(name: str, status: int, kind: type, code: str, message: str) -> Any:
    return pytest.param(name, status, kind, code, message, id=name, marks=cassette_marks(f"token_kiosk/errors/{name}"))


@pytest.mark.parametrize(
    ("name", "status", "kind", "code", "message"),
    [
        _row("validation_error_thinking", 400, GatewayValidationError, "validation_error", "Thinking/reasoning"),
        _row("validation_error_unknown_model", 400, GatewayValidationError, "validation_error", "Unknown model"),
        _row("unauthorized", 401, GatewayAuthError, "unauthorized", "Invalid API key"),
        _row("insufficient_balance", 402, InsufficientCredits, "insufficient_balance", "Top up at POST /v1/topup"),
        _row("rate_limited", 429, GatewayRateLimited, "rate_limited", "Rate limit exceeded"),
        _row("internal_error", 500, GatewayServerError, "internal_error", "Internal server error"),
        _row("upstream_error", 502, GatewayServerError, "upstream_error", "Provider returned an error"),
    ],
)
def test_error_table_maps_to_typed_errors_and_charges_nothing(
    name: str, status: int, kind: type, code: str, message: str, vcr: Any
) -> None:
    """Through a plain profile the gateway's own error reaches the caller; `typed_error` maps it by the table, and
    the receipt charges nothing ('no balance deducted')."""
    gw, exc = _kiosk_error(name, profile="plain")
    assert exc.status_code == status
    error = typed_error(exc)
    assert isinstance(error, kind)
    assert error.code == code
    assert message in error.message
    receipt = gw.last_receipt
    assert receipt is not None
    assert (receipt.status, receipt.cost, receipt.payment) == (status, 0, None)
    assert vcr.all_played


@pytest.mark.parametrize("profile", ["plain", "token-kiosk"])
@uses_cassette("token_kiosk/errors/validation_error_unknown_model")
def test_an_unpriced_model_under_the_default_cap_is_refused_before_the_call(profile: str, wire: WireLog) -> None:
    """A metered gateway under a cap (here the default $10 a day): a model without a known price is refused locally,
    after one look at the catalog (``GET /models``, unanswered here), and the chat is never sent."""
    gw, exc = _kiosk_error("validation_error_unknown_model", profile=profile, policy=Policy())
    assert exc.status_code == 402
    refusal = refusal_from_error(exc)
    assert refusal is not None
    assert refusal.code == "price_unknown"
    assert [(s.method, s.path) for s in wire.sent] == [("GET", "/v1/models")]
    receipt = gw.last_receipt
    assert receipt is not None
    assert (receipt.status, receipt.cost, receipt.reserved, receipt.payment) == (402, 0, 0, None)


@uses_cassette("token_kiosk/errors/validation_error_unknown_model")
def test_an_unpriced_model_without_any_cap_reaches_the_gateway(wire: WireLog) -> None:
    """An explicit ``None`` lifts the default daily cap: with no cap to bind, the unpriced call is sent."""
    _, exc = _kiosk_error("validation_error_unknown_model", profile="plain", policy=Policy(daily_cap_usd=None))
    assert isinstance(exc, openai.BadRequestError)
    assert [(s.method, s.path) for s in wire.sent] == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]


@uses_cassette("token_kiosk/errors/insufficient_balance")
def test_insufficient_balance_tops_up_only_within_the_policy(wallet: Wallet, wire: WireLog, vcr: Any) -> None:
    """Billing: 'A 402 with {"error":"INSUFFICIENT_BALANCE"} means top up'. A top-up above the policy's limit is
    refused before anything is signed, and the caller gets llm402's typed refusal."""
    gw = kiosk(wallet, api_key=API_KEY, policy=Policy(topup_max_usd="0.50"), prices=QUICKSTART_PRICES)
    with pytest.raises(openai.APIStatusError) as info:
        client_for(gw).chat.completions.create(model=FLASH, messages=[{"role": "user", "content": "Hello!"}])
    refusal = refusal_from_error(info.value)
    assert refusal is not None
    assert refusal.code == "topup_refused"
    assert wire.paid() == []
    assert len(wire.sent) == 1
    assert vcr.all_played


@uses_cassette("token_kiosk/errors/validation_error_thinking")
def test_reasoning_effort_through_a_plain_profile_is_the_documented_400(wire: WireLog) -> None:
    _, exc = _kiosk_error("validation_error_thinking", profile="plain")
    assert isinstance(exc, openai.BadRequestError)
    assert wire.sent[0].json()["reasoning_effort"] == "low"  # not stripped: only the token-kiosk profile strips it


@uses_cassette("token_kiosk/errors/validation_error_topup_minimum")
def test_topup_below_the_minimum_is_the_documented_400(wallet: Wallet, wire: WireLog) -> None:
    """Error handling behavior > 'Top-up below minimum: Return 400 before issuing 402': nothing to sign."""
    gw = kiosk(wallet, credit=CreditProfile(min_topup=500_000))
    with gw.credit_account() as account, pytest.raises(PaymentRequiredError) as info:
        account.topup("0.5")
    assert info.value.code == "topup_failed"
    assert "VALIDATION_ERROR" in info.value.message
    assert wire.paid() == []


@uses_cassette("token_kiosk/errors/unauthorized_siwe")
def test_an_invalid_siwe_signature_is_the_documented_401(wallet: Wallet) -> None:
    account = kiosk(wallet, credit=CreditProfile(chain_id=8453)).credit_account()
    with account, pytest.raises(PaymentRequiredError) as info:
        account.create_key("my-app")
    assert info.value.code == "unauthorized"
    assert info.value.details["status"] == 401


@uses_cassette("token_kiosk/errors/not_found")
def test_revoking_an_unknown_key_is_the_documented_404(wallet: Wallet) -> None:
    account = kiosk(wallet, credit=CreditProfile(chain_id=8453)).credit_account()
    with account, pytest.raises(PaymentRequiredError) as info:
        account.revoke_key(999)
    assert info.value.code == "not_found"
    assert info.value.details["status"] == 404


@uses_cassette("token_kiosk/errors/unauthorized")
def test_a_rejected_key_on_the_kiosk_profile_names_the_fix(wire: WireLog) -> None:
    gw = kiosk(api_key=API_KEY, prices=QUICKSTART_PRICES)
    with pytest.raises(openai.AuthenticationError) as info:
        client_for(gw).chat.completions.create(model=FLASH, messages=[{"role": "user", "content": "Hello!"}])
    assert info.value.response.json()["error"]["code"] == "api_key_rejected"
    assert len(wire.sent) == 1  # never retried: a rejected key stays rejected
