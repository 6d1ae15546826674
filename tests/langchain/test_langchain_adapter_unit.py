"""`ChatGateway` construction, serialization, typed refusals and the cost callback, without a network.

Refusals need no server: the policy and the budget refuse before any traffic, and nothing listens on port 9.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from langchain_core.exceptions import ModelError
from langchain_core.language_models import FakeListChatModel
from langchain_core.load import dumpd, load
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.prompts import ChatPromptTemplate

from llm402 import BudgetExceeded, Gateway, Policy, PolicyRefusal, Wallet
from llm402.errors import (
    InsecureGateway,
    InsufficientCredits,
    MalformedPaymentRequired,
    PaymentOutcomeUnknown,
    PaymentRejected,
    PaymentRequiredError,
    SignerError,
)
from llm402.langchain import (
    PAYMENT_ERRORS,
    ChatGateway,
    GatewayBudgetExceeded,
    GatewayCostCallbackHandler,
    GatewayInsecureGateway,
    GatewayInsufficientCredits,
    GatewayIntentNotAllowed,
    GatewayMalformedPaymentRequired,
    GatewayModelNotAllowed,
    GatewayPaymentError,
    GatewayPaymentOutcomeUnknown,
    GatewayPaymentRejected,
    GatewayPolicyRefusal,
    GatewaySignerError,
    get_gateway_cost_callback,
)
from llm402.langchain.chat_models import cost_metadata
from llm402.langchain.errors import error_from_openai, refusal_error
from llm402.pricing import ModelPrice
from llm402.receipts import PaymentRecord, Receipt

DEAD_URL = "http://127.0.0.1:9/v1"  # nothing listens: a refusal that reached the network would fail differently
KEY = "0x" + "22" * 32


def chat(**kw: Any) -> ChatGateway:
    kw.setdefault("model", "sandbox/small")
    kw.setdefault("base_url", DEAD_URL)
    kw.setdefault("ledger", "memory://")
    kw.setdefault("max_retries", 0)
    return ChatGateway(**kw)


# --- construction and serialization ---------------------------------------------------------------------------


def test_kwargs_build_a_paying_gateway_and_a_safe_serialization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM402_PRIVATE_KEY", raising=False)
    llm = chat(
        wallet_private_key=KEY,
        api_key="sk-secret-credit-key",
        policy=Policy(daily_cap_usd="1.5", allowed_intents={"judging"}),
        agent="judge",
        intent="judging",
    )
    assert llm.gateway is not None and llm.gateway.base_url == DEAD_URL
    assert llm.gateway.wallet is not None and llm.gateway.wallet.address == Wallet.from_key(KEY).address
    assert llm.gateway.policy.daily_cap_usd == Decimal("1.5") and llm.gateway.intent == "judging"
    assert llm._llm_type == "llm402-chat" and llm._get_ls_params()["ls_provider"] == "llm402"
    assert ChatGateway.get_lc_namespace() == ["llm402", "langchain"] == ChatGateway.__module__.split(".")[:2]
    serialized = json.dumps(dumpd(llm))
    for text in (serialized, repr(llm), str(llm)):
        assert KEY[2:] not in text and "sk-secret-credit-key" not in text
    assert '"id": ["LLM402_PRIVATE_KEY"]' in serialized and '"id": ["LLM402_API_KEY"]' in serialized

    loaded = load(
        json.loads(serialized),
        valid_namespaces=["llm402"],
        allowed_objects=[ChatGateway],
        secrets_map={"LLM402_PRIVATE_KEY": KEY, "LLM402_API_KEY": "sk-secret-credit-key"},
    )
    assert isinstance(loaded, ChatGateway) and loaded.gateway is not None and loaded.gateway is not llm.gateway
    assert loaded.gateway.wallet is not None and loaded.gateway.wallet.address == llm.gateway.wallet.address
    assert loaded.gateway.policy == llm.gateway.policy and loaded.gateway.api_key == "sk-secret-credit-key"


def test_from_a_gateway_the_gateway_is_not_serialized_but_described() -> None:
    wallet = Wallet.create()
    gw = Gateway(
        DEAD_URL, wallet=wallet, ledger="memory://", agent="bot", intent="qa", policy=Policy(max_payment_usd="0.05")
    )
    llm = ChatGateway(model="sandbox/small", gateway=gw)
    other = ChatGateway(model="sandbox/large", gateway=gw)
    assert llm.gateway is gw and llm.http_client is other.http_client, "models on one gateway share one pool"
    kwargs = dumpd(llm)["kwargs"]
    assert "gateway" not in kwargs and wallet.address not in json.dumps(kwargs)
    assert kwargs["gateway_base_url"] == DEAD_URL and kwargs["agent"] == "bot" and kwargs["intent"] == "qa"
    assert kwargs["policy"] == {"max_payment_usd": "0.05"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"intent": "other"}, "gateway= and also intent"),
        ({"base_url": DEAD_URL, "ledger": "memory://"}, "gateway= and also gateway_base_url, ledger"),
    ],
)
def test_gateway_and_gateway_options_conflict(kwargs: dict[str, Any], message: str) -> None:
    gw = Gateway(DEAD_URL, ledger="memory://")
    with pytest.raises(ValueError, match=message):
        ChatGateway(model="m", gateway=gw, **kwargs)


def test_configuration_errors_name_the_problem_and_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM402_BASE_URL", raising=False)
    monkeypatch.delenv("LLM402_MODEL", raising=False)
    with pytest.raises(ValueError, match="needs model"):
        ChatGateway(base_url=DEAD_URL, ledger="memory://")
    with pytest.raises(ValueError, match="needs base_url"):
        ChatGateway(model="m", ledger="memory://", wallet_private_key=KEY)
    with pytest.raises(ValueError, match="own http clients") as info:
        chat(http_client=httpx.Client(), wallet_private_key=KEY)
    assert KEY[2:] not in str(info.value)
    with pytest.raises(ValueError, match="LLM402_LEDGER"):
        chat(ledger="redis://:hunter2@localhost:6379/0")
    with pytest.raises(Exception, match="invalid private key") as bad:
        chat(wallet_private_key="0x" + "zz" * 32)
    assert "zz" * 4 not in str(bad.value)


def test_request_payload_keeps_max_tokens_and_the_system_role() -> None:
    llm = chat(model="o3-mini", max_tokens=7)
    payload = llm._get_request_payload([("system", "be brief"), ("user", "hi")])
    assert payload["max_tokens"] == 7 and "max_completion_tokens" not in payload
    assert [m["role"] for m in payload["messages"]] == ["system", "user"]
    assert chat(model="openai/gpt-5-codex")._use_responses_api({}) is False
    assert chat().stream_usage is True


# --- refusals: typed, before any network traffic ----------------------------------------------------------------


def test_intent_refusal_is_typed_and_falls_back() -> None:
    llm = chat(policy={"allowed_intents": ["judging"]}, intent="chitchat")
    with pytest.raises(GatewayIntentNotAllowed) as info:
        llm.invoke("hi")
    error = info.value
    assert isinstance(error, PolicyRefusal) and isinstance(error, ModelError) and not error.is_retryable
    assert error.code == "intent_not_allowed" and "'chitchat'" in str(error) and "judging" in str(error)
    assert isinstance(error.__cause__, openai.APIStatusError) and error.__cause__.status_code == 402
    assert len(error.receipts) == 1 and error.receipts[0].cost == 0

    backup = FakeListChatModel(responses=["from the backup"])
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | llm.with_fallbacks(
        [backup], exceptions_to_handle=(GatewayPolicyRefusal,)
    )
    assert chain.invoke({"q": "hi"}).content == "from the backup"


async def test_model_refusal_is_typed_in_every_call_style() -> None:
    llm = chat(model="sandbox/large", policy={"allowed_models": ["sandbox/small"]})
    with pytest.raises(GatewayModelNotAllowed, match="sandbox/large"):
        await llm.ainvoke("hi")
    with pytest.raises(GatewayModelNotAllowed):
        list(llm.stream("hi"))
    with pytest.raises(GatewayModelNotAllowed):
        [c async for c in llm.astream("hi")]
    with pytest.raises(GatewayModelNotAllowed, match="sandbox/medium"):
        llm.invoke("hi", model="sandbox/medium")


def test_budget_refusal_is_typed_and_names_the_amounts() -> None:
    gw = Gateway(
        DEAD_URL,
        ledger="memory://",
        policy=Policy(daily_cap_usd="0.000010"),
        prices={"sandbox/small": ModelPrice.from_usd("100", "100")},
    )
    llm = ChatGateway(model="sandbox/small", gateway=gw, max_tokens=1000, max_retries=0)
    with pytest.raises(GatewayBudgetExceeded) as info:
        llm.invoke("hi")
    assert isinstance(info.value, BudgetExceeded) and info.value.code == "budget_exceeded"
    assert "cap" in str(info.value)


@pytest.mark.parametrize(
    ("refusal", "expected"),
    [
        (BudgetExceeded("over", requested=5, cap=1), GatewayBudgetExceeded),
        (InsecureGateway("http"), GatewayInsecureGateway),
        (PolicyRefusal("no", code="intent_not_allowed"), GatewayIntentNotAllowed),
        (PolicyRefusal("no", code="model_not_allowed"), GatewayModelNotAllowed),
        (PolicyRefusal("no", code="payment_over_ticket"), GatewayPolicyRefusal),
        (MalformedPaymentRequired("bad"), GatewayMalformedPaymentRequired),
        (PaymentRejected("no"), GatewayPaymentRejected),
        (PaymentOutcomeUnknown("lost"), GatewayPaymentOutcomeUnknown),
        (SignerError("no wallet", code="no_wallet"), GatewaySignerError),
        (PaymentRequiredError("?"), GatewayPaymentError),
    ],
)
def test_every_refusal_maps_to_a_class_that_is_both_kinds(
    refusal: PaymentRequiredError, expected: type[GatewayPaymentError]
) -> None:
    error = refusal_error(refusal, model="m")
    assert type(error) is expected
    assert isinstance(error, type(refusal)) and isinstance(error, ModelError)
    assert error.code == refusal.code and error.details == refusal.details and "'m'" in str(error)


def test_a_gateways_own_402_is_insufficient_credits() -> None:
    request = httpx.Request("POST", "http://gw/v1/chat/completions")
    response = httpx.Response(402, json={"error": "INSUFFICIENT_BALANCE", "message": "top up"}, request=request)
    exc = openai.APIStatusError("Error code: 402", response=response, body=None)
    error = error_from_openai(exc, model="m", receipts=[receipt(0, paid=False)])
    assert type(error) is GatewayInsufficientCredits and isinstance(error, InsufficientCredits | ModelError)
    assert isinstance(error, PAYMENT_ERRORS) and error.code == "insufficient_balance" and "top up" in str(error)
    assert len(error.receipts) == 1
    assert error_from_openai(ValueError("x")) is None


# --- cost metadata and the cost callback ------------------------------------------------------------------------


def receipt(cost: int, model: str = "sandbox/small", agent: str = "a", paid: bool = True, **kw: Any) -> Receipt:
    payment = PaymentRecord("exact", "eip155:84532", "0xasset", cost, "0xpayer", "0xpayee", "0xtx") if paid else None
    return Receipt(
        call_id=f"c{cost}",
        agent=agent,
        intent="i",
        gateway="http://gw",
        method="POST",
        path="/v1/chat/completions",
        model=model,
        status=200,
        streamed=False,
        started_at=0.0,
        latency_ms=1.0,
        cost=cost,
        payment=payment,
        **kw,
    )


def test_cost_metadata_is_exact_and_names_the_payment() -> None:
    assert cost_metadata([]) == {}
    metadata = cost_metadata([receipt(0, paid=False), receipt(1234)])
    assert metadata["cost"] == "0.001234" and Decimal(metadata["cost"]) * 10**6 == 1234
    assert {k: metadata["payment"][k] for k in ("scheme", "network", "asset", "amount", "payer", "payee")} == {
        "scheme": "exact",
        "network": "eip155:84532",
        "asset": "0xasset",
        "amount": 1234,
        "payer": "0xpayer",
        "payee": "0xpayee",
    }
    assert metadata["payment"]["transaction"] == "0xtx"
    assert metadata["payment"]["amount_usd"] == "0.001234"  # the public receipt view: integers beside USD strings
    assert metadata["payment"]["kind"] == "call"
    assert metadata["llm402"] == {"call_id": "c1234", "agent": "a", "intent": "i"}
    assert "payment" not in cost_metadata([receipt(5, paid=False)])


def answer(receipts: list[Receipt], model: str, tokens: int = 10, cached: bool = False) -> LLMResult:
    usage: dict[str, int] = {"input_tokens": tokens, "output_tokens": tokens, "total_tokens": 2 * tokens}
    if cached:
        usage["total_cost"] = 0
    message = AIMessage("x", response_metadata={"model_name": model, **cost_metadata(receipts)}, usage_metadata=usage)
    return LLMResult(generations=[[ChatGeneration(message=message)]])


def test_cost_callback_sums_micro_usdc_per_model_and_agent() -> None:
    with get_gateway_cost_callback() as outer:
        handler = GatewayCostCallbackHandler(parent=outer)
        handler.on_llm_end(answer([receipt(1000)], "sandbox/small"))
        handler.on_llm_end(answer([receipt(2500, agent="b")], "sandbox/large", tokens=5))
        handler.on_llm_end(answer([receipt(1000)], "sandbox/small", cached=True))  # a cache hit costs nothing
        handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=AIMessage("not ours"))]]))
        failed = openai.InternalServerError(
            "boom", response=httpx.Response(500, request=httpx.Request("POST", "http://gw")), body=None
        )
        failed.llm402_receipts = (receipt(700),)  # type: ignore[attr-defined]
        handler.on_llm_error(failed)
        handler.on_llm_error(refusal_error(PolicyRefusal("no", code="intent_not_allowed"), receipts=[receipt(0)]))
    assert handler.total_cost == 4200 and handler.total_cost_usd == Decimal("0.0042")
    assert handler.total.calls == 4 and handler.total.failed_calls == 2
    assert handler.by_model["sandbox/small"].cost == 1700 and handler.by_model["sandbox/large"].total_tokens == 10
    assert handler.by_agent["b"].cost == 2500 and handler.by_agent["a"].calls == 3
    assert outer.total_cost == 4200, "a nested handler counts into its parent"
    assert "$0.004200" in repr(handler)
