"""`GatewayLLM` over an in-memory x402 gateway: defaults, cost propagation, retries, client ownership, secrets."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai_like import OpenAILike
from llama_index_fakes import AMOUNTS, BASE_URL, FakeGateway, clients, fake_gateway

from llm402 import Gateway, Policy, Wallet
from llm402.errors import ConfigurationError, PolicyRefusal
from llm402.llama_index import GatewayCostHandler, GatewayLLM, GatewayPaymentEvent, track_gateway_costs

MESSAGES = [ChatMessage(role="user", content="Explain x402 in one line")]


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.fixture
def fake() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def gw() -> Gateway:
    return fake_gateway()


def make_llm(gw: Gateway, fake: FakeGateway, model: str = "fake/small", **kw: object) -> GatewayLLM:
    http, ahttp = clients(gw, fake)
    return GatewayLLM(model=model, gateway=gw, http_client=http, async_http_client=ahttp, **kw)  # type: ignore[arg-type]


# --- shape and defaults -------------------------------------------------------------------------------------------


def test_is_an_openai_like_llm_named_gateway_llm(gw: Gateway, fake: FakeGateway) -> None:
    assert BaseLLM.__name__ in [b.__name__ for b in GatewayLLM.__mro__]
    assert OpenAILike in GatewayLLM.__mro__
    assert GatewayLLM.class_name() == "GatewayLLM"
    assert make_llm(gw, fake).to_dict()["class_name"] == "GatewayLLM"


def test_defaults_for_a_paid_gateway(gw: Gateway, fake: FakeGateway) -> None:
    llm = make_llm(gw, fake, model="fake/large")
    meta = llm.metadata
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.context_window == 128_000, "the context window comes from the gateway's catalog"
    assert llm.additional_kwargs["stream_options"] == {"include_usage": True}
    assert llm.api_base == gw.base_url
    client = llm._get_client()
    assert client.max_retries == 2 == llm.max_retries, "max_retries belongs to the SDK (x-should-retry aware)"
    assert llm.timeout == 600.0
    assert llm.gateway is gw


def test_context_window_falls_back_or_loads_the_catalog(
    gw: Gateway, fake: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert make_llm(gw, fake, model="other/model", fetch_prices=False).context_window == 8192
    assert make_llm(gw, fake, model="other/model", context_window=1000).context_window == 1000
    loads: list[float] = []

    def load_prices(timeout: float = 10.0) -> object:
        loads.append(timeout)
        raise httpx.ConnectError("gateway unreachable")

    monkeypatch.setattr(gw, "load_prices", load_prices)
    assert make_llm(gw, fake, model="other/model").context_window == 8192
    assert len(loads) == 1, "an unknown model triggers one catalog fetch, whose failure is not fatal"
    assert make_llm(gw, fake, model="fake/small").context_window == 32_000 and len(loads) == 1


# --- cost propagation ---------------------------------------------------------------------------------------------


def test_chat_pays_once_and_reports_its_cost(gw: Gateway, fake: FakeGateway) -> None:
    llm = make_llm(gw, fake)
    with track_gateway_costs() as costs:
        response = llm.chat(MESSAGES)
    assert response.message.content == "Paid answer."
    receipt = gw.last_receipt
    assert receipt is not None and receipt.payment is not None
    extra = response.additional_kwargs
    assert extra["cost_micro_usdc"] == receipt.cost == AMOUNTS["fake/small"] == fake.spent
    assert extra["cost"] == "0.002"
    assert extra["payment"]["payer"] == gw.wallet.address and extra["payment"]["transaction"]  # type: ignore[union-attr]
    assert extra["call_id"] == receipt.call_id
    assert extra["prompt_tokens"] == 11, "LlamaIndex's own usage fields stay"
    assert len(set(fake.signatures)) == 1
    assert costs.total_micro_usdc == receipt.cost and costs.calls == costs.payments == 1
    assert costs.by_model == {"fake/small": receipt.cost} and costs.by_agent == {gw.agent: receipt.cost}


def test_stream_ends_with_a_response_carrying_the_cost(gw: Gateway, fake: FakeGateway) -> None:
    llm = make_llm(gw, fake)
    with track_gateway_costs() as costs:
        responses = list(llm.stream_chat(MESSAGES))
    assert "".join(r.delta or "" for r in responses) == "Paid stream answer."
    last = responses[-1]
    assert last.delta == "" and last.message.content == "Paid stream answer."
    assert last.additional_kwargs["cost_micro_usdc"] == AMOUNTS["fake/small"] == fake.spent
    assert last.additional_kwargs["completion_tokens"] == 3, "usage arrives on streams (include_usage)"
    assert all("cost" not in r.additional_kwargs for r in responses[:-1])
    assert costs.total_micro_usdc == fake.spent and costs.calls == 1
    receipt = gw.last_receipt
    assert receipt is not None and receipt.streamed and receipt.completion_tokens == 3


async def test_async_chat_and_stream(gw: Gateway, fake: FakeGateway) -> None:
    llm = make_llm(gw, fake)
    with track_gateway_costs() as costs:
        response = await llm.achat(MESSAGES)
        stream = await llm.astream_chat(MESSAGES)
        responses = [r async for r in stream]
    assert response.additional_kwargs["cost_micro_usdc"] == AMOUNTS["fake/small"]
    assert responses[-1].additional_kwargs["cost_micro_usdc"] == AMOUNTS["fake/small"]
    assert responses[-1].message.content == "Paid stream answer."
    assert costs.total_micro_usdc == fake.spent == sum(r.cost for r in gw.receipts()) == 2 * AMOUNTS["fake/small"]


async def test_completions_carry_the_cost_too(gw: Gateway, fake: FakeGateway) -> None:
    llm = make_llm(gw, fake)
    assert llm.complete("hi").additional_kwargs["cost_micro_usdc"] == AMOUNTS["fake/small"]
    assert list(llm.stream_complete("hi"))[-1].additional_kwargs["cost_micro_usdc"] == AMOUNTS["fake/small"]
    assert (await llm.acomplete("hi")).additional_kwargs["cost_micro_usdc"] == AMOUNTS["fake/small"]
    chunks = [c async for c in await llm.astream_complete("hi")]
    assert chunks[-1].text == "Paid stream answer." and chunks[-1].additional_kwargs["cost_micro_usdc"] > 0
    assert len(set(fake.signatures)) == 4 == len(fake.signatures)


def test_tool_calling(gw: Gateway, fake: FakeGateway) -> None:
    llm = make_llm(gw, fake)
    tool = FunctionTool.from_defaults(add)
    response = llm.chat_with_tools([tool], user_msg="What is 2 + 2?")
    calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("add", {"a": 2, "b": 2})]
    assert response.additional_kwargs["cost_micro_usdc"] == AMOUNTS["fake/small"]
    output = llm.predict_and_call([tool], user_msg="What is 2 + 2?")
    assert output.response == "4"
    assert len(set(fake.signatures)) == 2 == len(gw.receipts())


def test_chat_end_event_sees_the_cost(gw: Gateway, fake: FakeGateway) -> None:
    """LlamaIndex's own LLMChatEndEvent carries the response with its cost (what tracing tools record)."""
    from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler

    seen: list[object] = []

    class Capture(BaseEventHandler):
        def handle(self, event: object, **kwargs: object) -> None:
            seen.append(event)

    root = get_dispatcher()
    capture = Capture()
    root.add_event_handler(capture)
    try:
        llm = make_llm(gw, fake)
        llm.chat(MESSAGES)
        list(llm.stream_chat(MESSAGES))
    finally:
        root.event_handlers = [h for h in root.event_handlers if h is not capture]
    ends = [e for e in seen if isinstance(e, LLMChatEndEvent)]
    payments = [e for e in seen if isinstance(e, GatewayPaymentEvent)]
    assert [e.response.additional_kwargs["cost_micro_usdc"] for e in ends] == [2000, 2000]  # type: ignore[union-attr]
    assert [p.cost_micro_usdc for p in payments] == [2000, 2000]
    assert all(p.span_id for p in payments), "payment events belong to the LLM call's span"


# --- concurrency -----------------------------------------------------------------------------------------------


async def test_concurrent_async_calls_never_mix_receipts(gw: Gateway, fake: FakeGateway) -> None:
    small, large = make_llm(gw, fake, "fake/small"), make_llm(gw, fake, "fake/large")
    llms = [small if i % 2 else large for i in range(24)]

    async def one(i: int) -> tuple[str, dict[str, object]]:
        llm = llms[i]
        if i % 3 == 0:
            stream = await llm.astream_chat(MESSAGES)
            responses = [r async for r in stream]
            return llm.model, responses[-1].additional_kwargs
        return llm.model, (await llm.achat(MESSAGES)).additional_kwargs

    with track_gateway_costs() as costs:
        results = await asyncio.gather(*(one(i) for i in range(24)))
    by_id = {r.call_id: r for r in gw.receipts()}
    assert len({extra["call_id"] for _, extra in results}) == 24
    for model, extra in results:
        assert extra["cost_micro_usdc"] == AMOUNTS[model]
        assert by_id[extra["call_id"]].model == model  # type: ignore[index]
    assert costs.total_micro_usdc == fake.spent == sum(r.cost for r in gw.receipts())
    assert costs.by_model == {"fake/small": 12 * AMOUNTS["fake/small"], "fake/large": 12 * AMOUNTS["fake/large"]}


def test_concurrent_threads_never_mix_receipts(gw: Gateway, fake: FakeGateway) -> None:
    small, large = make_llm(gw, fake, "fake/small"), make_llm(gw, fake, "fake/large")

    def one(i: int) -> tuple[str, dict[str, object]]:
        llm = small if i % 2 else large
        if i % 3 == 0:
            return llm.model, list(llm.stream_chat(MESSAGES))[-1].additional_kwargs
        return llm.model, llm.chat(MESSAGES).additional_kwargs

    with track_gateway_costs() as costs, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    by_id = {r.call_id: r for r in gw.receipts()}
    for model, extra in results:
        assert extra["cost_micro_usdc"] == AMOUNTS[model] and by_id[extra["call_id"]].model == model  # type: ignore[index]
    assert costs.total_micro_usdc == fake.spent


# --- retries: one layer, payment-aware --------------------------------------------------------------------------


def test_failure_after_settlement_is_not_retried(gw: Gateway, fake: FakeGateway) -> None:
    llm = make_llm(gw, fake, default_headers={"x-fake-fault": "fail_after_settle"})
    started = time.monotonic()
    with track_gateway_costs() as costs, pytest.raises(openai.InternalServerError):
        llm.chat(MESSAGES)
    assert time.monotonic() - started < 1.0, "no tenacity back-off"
    assert len(fake.signatures) == 1 and len(fake.requests) == 2, "one 402, one paid attempt, nothing more"
    assert costs.total_micro_usdc == fake.spent == sum(r.cost for r in gw.receipts()) == AMOUNTS["fake/small"]


def test_plain_openai_like_tenacity_retry_resends_the_same_signature(gw: Gateway, fake: FakeGateway) -> None:
    """The unchanged OpenAILike (max_retries=3: tenacity on top of the SDK) still signs only once."""
    http, _ = clients(gw, fake)
    llm = OpenAILike(
        model="fake/small",
        api_base=gw.base_url,
        api_key=gw.api_key,
        is_chat_model=True,
        http_client=http,
        default_headers={"x-fake-fault": "fail_after_settle"},
    )
    with pytest.raises(openai.APIStatusError):
        llm.chat(MESSAGES)
    assert len(set(fake.signatures)) == 1, "tenacity's retry re-sent the same authorization"
    assert fake.spent == AMOUNTS["fake/small"] == sum(r.cost for r in gw.receipts())


def test_retries_before_payment_stay_with_the_sdk(gw: Gateway, fake: FakeGateway) -> None:
    llm = make_llm(gw, fake, max_retries=2, default_headers={"x-fake-fault": "busy=2"})
    with track_gateway_costs() as costs:
        response = llm.chat(MESSAGES)
    assert len(fake.requests) == 4, "503, 503 (SDK retries, nothing signed), then 402 and the paid replay"
    assert len(fake.signatures) == 1
    assert response.additional_kwargs["cost_micro_usdc"] == AMOUNTS["fake/small"] == costs.total_micro_usdc
    assert costs.calls == 3 and costs.payments == 1, "every attempt is a receipt; only one was paid"


def test_refusals_are_typed_and_unsigned(fake: FakeGateway) -> None:
    gw = fake_gateway(Policy(max_payment_usd="0.001"))
    llm = make_llm(gw, fake)
    with pytest.raises(PolicyRefusal) as info:
        llm.chat(MESSAGES)
    assert info.value.code == "payment_over_ticket"
    with pytest.raises(PolicyRefusal):
        list(llm.stream_chat(MESSAGES))
    assert fake.signatures == []


# --- client ownership --------------------------------------------------------------------------------------------


async def test_injected_clients_are_never_closed(gw: Gateway, fake: FakeGateway) -> None:
    http, ahttp = clients(gw, fake)
    llm = GatewayLLM(model="fake/small", gateway=gw, http_client=http, async_http_client=ahttp)
    llm.chat(MESSAGES)
    list(llm.stream_chat(MESSAGES))
    await llm.achat(MESSAGES)
    [r async for r in await llm.astream_chat(MESSAGES)]
    llm.chat(MESSAGES)
    assert not http.is_closed and not ahttp.is_closed


async def test_close_closes_only_the_clients_it_made(gw: Gateway, fake: FakeGateway) -> None:
    http, _ = clients(gw, fake)
    llm = GatewayLLM(model="fake/small", gateway=gw, http_client=http)
    made = llm._async_http_client
    assert made is not None and made is not http
    llm.close()
    await llm.aclose()
    assert made.is_closed and not http.is_closed


def test_reuse_client_false_refuses_an_injected_client(gw: Gateway, fake: FakeGateway) -> None:
    with pytest.raises(ConfigurationError, match="reuse_client=False"):
        make_llm(gw, fake, reuse_client=False)


async def test_reuse_client_false_gets_a_fresh_client_per_call(
    gw: Gateway, fake: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[httpx.Client | httpx.AsyncClient] = []

    def fresh(**kw: object) -> httpx.Client:
        made.append(clients(gw, fake)[0])
        return made[-1]  # type: ignore[return-value]

    def afresh(**kw: object) -> httpx.AsyncClient:
        made.append(clients(gw, fake)[1])
        return made[-1]  # type: ignore[return-value]

    monkeypatch.setattr(gw, "http_client", fresh)
    monkeypatch.setattr(gw, "async_http_client", afresh)
    llm = GatewayLLM(model="fake/small", gateway=gw, reuse_client=False)
    assert made == [], "nothing is built until a call needs it"
    for _ in range(2):
        assert llm.chat(MESSAGES).additional_kwargs["cost_micro_usdc"] > 0
        assert (await llm.achat(MESSAGES)).additional_kwargs["cost_micro_usdc"] > 0
    assert len(made) == 4 and all(c.is_closed for c in made), "each call closed only the client made for it"
    assert len(set(fake.signatures)) == 4


def test_openai_clients_are_refused(gw: Gateway) -> None:
    with pytest.raises(ConfigurationError, match="http_client"):
        GatewayLLM(model="fake/small", gateway=gw, openai_client=openai.OpenAI(api_key="x", base_url=BASE_URL))


# --- construction and secrets ---------------------------------------------------------------------------------------


def test_built_from_plain_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    wallet = Wallet.create()
    monkeypatch.setenv("LLM402_PRIVATE_KEY", wallet.export_private_key())
    llm = GatewayLLM(
        model="fake/small",
        base_url=BASE_URL,
        policy=Policy(daily_cap_usd="1"),
        ledger="memory://",
        agent="judge",
        intent="judging",
        fetch_prices=False,
    )
    gw = llm.gateway
    assert gw.wallet is not None and gw.wallet.address == wallet.address
    assert (gw.agent, gw.intent, gw.policy.daily_cap) == ("judge", "judging", 1_000_000)
    assert gw.base_url == BASE_URL and llm.api_base == BASE_URL


def test_plain_settings_and_a_gateway_do_not_mix(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="agent"):
        GatewayLLM(model="fake/small", gateway=gw, agent="other")
    with pytest.raises(ConfigurationError, match="base_url"):
        GatewayLLM(model="fake/small")
    monkeypatch.delenv("LLM402_PRIVATE_KEY", raising=False)
    monkeypatch.delenv("LLM402_KEYSTORE", raising=False)
    with pytest.raises(Exception, match="LLM402_PRIVATE_KEY"):
        GatewayLLM(model="fake/small", base_url=BASE_URL, ledger="memory://", fetch_prices=False)
    keyed = GatewayLLM(model="m", base_url=BASE_URL, api_key="sk-plain", ledger="memory://", fetch_prices=False)
    assert keyed.gateway.wallet is None, "a plain API-key gateway needs no wallet"


def test_no_secret_in_to_dict_or_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    wallet = Wallet.create()
    key = wallet.export_private_key()
    api_key = "sk-credit-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-env-secret")
    llm = GatewayLLM(
        model="fake/small",
        base_url=BASE_URL,
        wallet=wallet,
        api_key=api_key,
        ledger="memory://",
        fetch_prices=False,
        default_headers={"Authorization": "Bearer sk-header-secret", "X-Trace": "visible"},
    )
    texts = [json.dumps(llm.to_dict()), llm.to_json(), repr(llm), str(llm), repr(llm.metadata), repr(llm.gateway)]
    blob = "\n".join(texts)
    for secret in (key, key[2:], api_key, "sk-header-secret", "sk-openai-env-secret"):
        assert secret not in blob
    assert llm.to_dict()["default_headers"] == {"Authorization": "<redacted>", "X-Trace": "visible"}
    assert llm._get_credential_kwargs()["api_key"] == api_key, "the real key still reaches the SDK"


def test_to_dict_round_trip(gw: Gateway, fake: FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM402_PRIVATE_KEY", Wallet.create().export_private_key())
    monkeypatch.setenv("LLM402_LEDGER", "memory://")
    original = make_llm(gw, fake, temperature=0.3, max_retries=4)
    again = GatewayLLM.from_dict({**original.to_dict(), "fetch_prices": False})
    assert isinstance(again, GatewayLLM)
    for field in ("model", "api_base", "temperature", "max_retries", "context_window", "additional_kwargs"):
        assert getattr(again, field) == getattr(original, field), field


def test_cost_handler_ignores_other_events_and_resets() -> None:
    handler = GatewayCostHandler()
    handler.handle(LLMChatEndEvent(messages=[], response=None))
    assert handler.calls == 0
    event = GatewayPaymentEvent(call_id="c", agent="a", gateway="g", cost_micro_usdc=5, model="m")
    handler.handle(event)
    assert (handler.total_micro_usdc, handler.total, handler.calls) == (5, event.cost, 1)
    handler.reset()
    assert handler.total_micro_usdc == 0 and handler.by_model == {}
