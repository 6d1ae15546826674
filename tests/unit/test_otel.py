"""`llm402.otel`: a span and metric points per receipt, through the global OpenTelemetry providers, exported by the SDK's
in-memory exporter and reader; a real paid call and a refused one against the sandbox. No prompt, completion or secret
in any attribute."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llm402.engine
from llm402 import Gateway, Policy, Wallet, otel
from llm402.receipts import PaymentRecord, Receipt
from llm402.sandbox import SandboxServer
from llm402.x402 import SignedPayment

PROMPT = "Summarise the secret plan of the otel test in one line"
MESSAGES = [{"role": "user", "content": PROMPT}]


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()

    def finished(self, agent: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if (s.attributes or {}).get("llm402.agent") == agent]

    def points(self, name: str, agent: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += [
                            p for p in metric.data.data_points if (p.attributes or {}).get("llm402.agent") == agent
                        ]
        return found


@pytest.fixture(scope="module")
def telemetry() -> Iterator[Telemetry]:
    """The global providers, set AFTER `instrument` when nothing set them before (so that a later provider is shown to
    be honoured); the SDK allows setting them once per process."""
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider), "another test set the global provider"
    otel.instrument()
    sink = Telemetry()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(sink.spans))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[sink.reader]))
    yield sink
    otel.uninstrument()


@pytest.fixture
def signed(monkeypatch: pytest.MonkeyPatch) -> list[SignedPayment]:
    """Every payment the engine signs, to check that no part of it reaches a span."""
    seen: list[SignedPayment] = []
    real = llm402.engine.sign_payment  # type: ignore[attr-defined]

    def spy(*args: Any) -> SignedPayment:
        payment = real(*args)
        seen.append(payment)
        return payment

    monkeypatch.setattr(llm402.engine, "sign_payment", spy)
    return seen


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a decoded JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _secrets(wallet: Wallet, gw: Gateway, payments: list[SignedPayment]) -> list[str]:
    key = wallet.export_private_key()
    found = [key, key.removeprefix("0x"), gw.api_key]
    for payment in payments:
        found.append(payment.header_value)
        decoded = json.loads(base64.b64decode(payment.header_value))
        found += [s for s in _strings(decoded) if len(s) > 100]  # the signature
    return [s for s in found if s]


def _assert_clean(span: ReadableSpan, forbidden: list[str]) -> None:
    attributes = dict(span.attributes or {})
    for name, value in attributes.items():
        assert not any(word in name for word in ("signature", "header", "authorization", "prompt", "completion")), name
        text = str(value)
        assert len(text) < 100, (name, text)  # no payload, message or envelope fits in an attribute
        for secret in forbidden:
            assert secret not in text, name
            assert text not in secret or len(text) < 16, name
    assert not span.events and not span.links


def _gateway(sandbox: SandboxServer, wallet: Wallet, agent: str, policy: Policy) -> Gateway:
    return Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=policy, agent=agent, intent="judging")


def _client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), max_retries=0)


def test_paid_call_span_and_metrics(
    telemetry: Telemetry, sandbox: SandboxServer, wallet: Wallet, signed: list[SignedPayment]
) -> None:
    agent = "paid.otel.eth"
    gw = _gateway(sandbox, wallet, agent, Policy(max_payment_usd="0.05"))
    caller = trace.get_tracer("the-agent")
    with caller.start_as_current_span("agent step") as parent:
        completion = _client(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    answer = completion.choices[0].message.content
    assert answer
    (receipt,) = gw.receipts()
    payment = receipt.payment
    assert payment is not None and payment.transaction and receipt.cost > 0 and receipt.prompt_tokens > 0

    (span,) = telemetry.finished(agent)
    assert span.name == "chat sandbox/small"
    assert span.kind is trace.SpanKind.CLIENT
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id, "child of the caller"
    assert span.context is not None and span.context.trace_id == parent.get_span_context().trace_id
    assert span.status.status_code is trace.StatusCode.UNSET
    assert span.start_time == int(receipt.started_at * 1e9)
    assert span.end_time is not None and span.end_time - span.start_time == int(receipt.latency_ms * 1e6)
    attributes = dict(span.attributes or {})
    host, port = sandbox.url.removeprefix("http://").split(":")
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "sandbox/small",
        "gen_ai.usage.input_tokens": receipt.prompt_tokens,
        "gen_ai.usage.output_tokens": receipt.completion_tokens,
        "gen_ai.usage.cost.amount": float(receipt.cost_usd),
        "gen_ai.usage.cost.currency": "USD",
        "gen_ai.usage.cost.source": "provider",
        "server.address": host,
        "server.port": int(port),
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "llm402.call_id": receipt.call_id,
        "llm402.agent": agent,
        "llm402.intent": "judging",
        "llm402.streamed": False,
        "llm402.cache_hit": False,
        "llm402.outcome": "ok",
        "llm402.cost.atomic": receipt.cost,
        "llm402.reserved.atomic": receipt.reserved,
        "llm402.payment.kind": "call",
        "llm402.payment.scheme": payment.scheme,
        "llm402.payment.network": payment.network,
        "llm402.payment.asset": payment.asset,
        "llm402.payment.amount": payment.amount,
        "llm402.payment.settled": True,
        "llm402.payment.reused": False,
        "llm402.payment.transaction": payment.transaction,
        "llm402.payment.payee": payment.payee,
        "llm402.payment.payer": wallet.address,
        **({} if payment.settled_amount is None else {"llm402.payment.settled_amount": payment.settled_amount}),
        **({} if receipt.route is None else {"llm402.route": receipt.route}),
    }
    assert isinstance(attributes["llm402.cost.atomic"], int) and isinstance(attributes["llm402.payment.amount"], int)
    assert len(signed) == 1
    _assert_clean(span, [PROMPT, answer, *_secrets(wallet, gw, signed)])

    expected = {
        "llm402.agent": agent,
        "llm402.intent": "judging",
        "gen_ai.request.model": "sandbox/small",
        "gen_ai.operation.name": "chat",
        "llm402.gateway": sandbox.url,
        "llm402.outcome": "ok",
    }
    (calls,) = telemetry.points("llm402.calls", agent)
    assert dict(calls.attributes) == expected and calls.value == 1
    (cost,) = telemetry.points("llm402.cost", agent)
    assert dict(cost.attributes) == expected and cost.value == pytest.approx(float(receipt.cost_usd))
    tokens = {p.attributes["gen_ai.token.type"]: p for p in telemetry.points("gen_ai.client.token.usage", agent)}
    assert set(tokens) == {"input", "output"}
    assert (tokens["input"].count, tokens["input"].sum) == (1, receipt.prompt_tokens)
    assert (tokens["output"].count, tokens["output"].sum) == (1, receipt.completion_tokens)
    assert {k: v for k, v in tokens["input"].attributes.items() if k != "gen_ai.token.type"} == expected
    (duration,) = telemetry.points("gen_ai.client.operation.duration", agent)
    assert duration.count == 1 and duration.sum == pytest.approx(receipt.latency_ms / 1000)


def test_refused_call_span_and_metrics(
    telemetry: Telemetry, sandbox: SandboxServer, wallet: Wallet, signed: list[SignedPayment]
) -> None:
    agent = "refused.otel.eth"
    gw = _gateway(sandbox, wallet, agent, Policy(max_payment_usd="0.000001"))
    with pytest.raises(openai.APIStatusError) as refused:
        _client(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert refused.value.status_code == 402
    (receipt,) = gw.receipts()
    assert receipt.error == "payment_over_ticket" and receipt.cost == 0 and not signed

    (span,) = telemetry.finished(agent)
    assert span.name == "chat sandbox/small"
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.status.description == "payment_over_ticket"
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "payment_over_ticket"
    assert attributes["llm402.outcome"] == "refused"
    assert attributes["http.response.status_code"] == 402
    assert attributes["gen_ai.usage.cost.amount"] == 0.0 and attributes["llm402.cost.atomic"] == 0
    assert attributes["gen_ai.usage.cost.currency"] == "USD" and "gen_ai.usage.cost.source" not in attributes
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (0, 0)
    assert not any(name.startswith("llm402.payment.") for name in attributes), "nothing was paid"
    _assert_clean(span, [PROMPT, *_secrets(wallet, gw, signed)])

    (calls,) = telemetry.points("llm402.calls", agent)
    assert calls.value == 1
    assert dict(calls.attributes) == {
        "llm402.agent": agent,
        "llm402.intent": "judging",
        "gen_ai.request.model": "sandbox/small",
        "gen_ai.operation.name": "chat",
        "llm402.gateway": sandbox.url,
        "llm402.outcome": "refused",
        "error.type": "payment_over_ticket",
    }
    assert telemetry.points("llm402.cost", agent) == []
    assert telemetry.points("gen_ai.client.token.usage", agent) == []


def test_uninstrument_stops_and_instrument_again_resumes(telemetry: Telemetry, sandbox: SandboxServer) -> None:
    """A refusal by intent never reaches the network: a cheap call that still leaves a receipt."""
    agent = "switch.otel.eth"
    gw = Gateway(
        f"{sandbox.url}/v1", ledger="memory://", policy=Policy(allowed_intents={"judging"}), agent=agent, intent="chat"
    )
    client = _client(gw)
    otel.uninstrument()
    try:
        assert not otel.instrumented()
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
        assert telemetry.finished(agent) == []
    finally:
        otel.instrument()
        otel.instrument()  # twice: still one span per call
    assert otel.instrumented()
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    (span,) = telemetry.finished(agent)
    assert (span.attributes or {})["error.type"] == "intent_not_allowed"


def test_explicit_providers_then_back_to_the_global_ones(telemetry: Telemetry) -> None:
    agent = "explicit.otel.eth"
    own = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(own))
    receipt = _receipt(agent, path="/v1/embeddings", model="text-embed")
    try:
        otel.instrument(tracer_provider=provider, meter_provider=MeterProvider())
        otel.record(receipt)
    finally:
        otel.instrument()
    assert [s.name for s in own.get_finished_spans()] == ["embeddings text-embed"]
    assert telemetry.finished(agent) == []
    otel.record(receipt)
    assert [s.name for s in telemetry.finished(agent)] == ["embeddings text-embed"]


def _receipt(agent: str, **fields: Any) -> Receipt:
    base: dict[str, Any] = {
        "call_id": "c1",
        "agent": agent,
        "intent": None,
        "gateway": "https://user:pw@gateway.example",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "m",
        "status": 200,
        "streamed": False,
        "started_at": 1_700_000_000.25,
        "latency_ms": 12.5,
    }
    return Receipt(**{**base, **fields})


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/v1/chat/completions", "chat"),
        ("/v1/responses", "chat"),
        ("/v1/messages", "chat"),
        ("/v1/completions", "text_completion"),
        ("/v1/embeddings", "embeddings"),
        ("/v1beta/models/gemini-2.5-flash:generateContent", "generate_content"),
        ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", "generate_content"),
        ("/v1/images/generations", "image_generation"),
        ("/v1/audio/speech", "speech"),
    ],
)
def test_operation_names(path: str, operation: str) -> None:
    assert otel.operation_name(_receipt("a", path=path)) == operation


def test_topup_and_origin_without_user_info() -> None:
    topup = _receipt(
        "a",
        path="/v1/topup",
        model=None,
        cost=5_000_000,
        payment=PaymentRecord(
            "exact", "eip155:8453", "0xasset", 5_000_000, "0xpayer", "0xpayee", "0xtx", True, kind="topup"
        ),
    )
    assert otel.operation_name(topup) == "topup"
    attributes = otel.span_attributes(topup)
    assert "gen_ai.operation.name" not in attributes and "gen_ai.usage.input_tokens" not in attributes
    assert attributes["gen_ai.usage.cost.amount"] == 5.0 and attributes["llm402.payment.kind"] == "topup"
    assert (attributes["server.address"], attributes["server.port"]) == ("gateway.example", 443)
    assert otel.metric_attributes(topup)["llm402.gateway"] == "https://gateway.example"
    assert not any("pw" in str(v) for v in attributes.values())


def test_llm402_never_imports_opentelemetry() -> None:
    """Only the adapter imports OpenTelemetry; ``import llm402`` and the gateway stack never load it."""
    code = (
        "import sys, llm402, llm402.gateway, llm402.engine, llm402.transport, llm402.openai; "
        "from llm402 import Gateway, Policy, Wallet; "
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'opentelemetry']; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    source = Path(llm402.engine.__file__).parent
    importers = sorted(
        str(p.relative_to(source)) for p in source.rglob("*.py") if "opentelemetry" in p.read_text(encoding="utf-8")
    )
    assert importers == ["otel.py"]
