"""OpenTelemetry for every call llm402 makes: ``llm402.otel.instrument()`` (the ``llm402[otel]`` extra).

Once switched on, the receipt of every call through any gateway of the process becomes a span and metric points on the
global tracer and meter providers (or the ones passed to `instrument`), read again on each call, so a provider set after
`instrument` is honoured. Nothing else in llm402 imports OpenTelemetry; ``import llm402`` does not load it.

The span, a ``CLIENT`` span named as the GenAI conventions name them (``chat {model}``, ``embeddings {model}``, ...),
starts and ends when the call did (it is recorded after the call, in the call's context, so it is a child of the
caller's current span) and carries:

- the GenAI attributes ``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.output_tokens``, ``server.address``, ``server.port``, ``http.request.method``,
  ``http.response.status_code``, and ``error.type`` (with an error status) when the call failed or was refused;
- the cost as the open GenAI cost proposal names it (``gen_ai.usage.cost.*``, open-telemetry/semantic-conventions-genai
  pull request 443, implementing issue 287): ``gen_ai.usage.cost.amount`` (a float in USD),
  ``gen_ai.usage.cost.currency`` (``"USD"``) and ``gen_ai.usage.cost.source`` (``"provider"`` when the cost is what
  the gateway quoted and was paid; absent when the receipt cannot tell). The exact amount stays an integer in
  ``llm402.cost.atomic`` (micro-USD): a float is never used for money anywhere else;
- llm402's own: ``llm402.call_id``, ``llm402.agent``, ``llm402.intent``, ``llm402.route``, ``llm402.cache_hit``,
  ``llm402.streamed``, ``llm402.outcome``, ``llm402.reserved.atomic``, ``llm402.saved.atomic``,
  ``llm402.credits_remaining`` and the payment: ``llm402.payment.kind`` (``call`` or ``topup``), ``.scheme``,
  ``.network``, ``.asset``, ``.amount`` and ``.settled_amount`` (atomic integers), ``.settled``, ``.reused``,
  ``.transaction``, ``.payee`` and ``.payer``.

The payer is the wallet's public address: it is on the receipt and on chain beside the transaction hash already
exported, and "which wallet spent this" is the first question a fleet asks, so spans carry it. Metrics do not (one
series per wallet is not worth it). Spans carry nothing a receipt does not hold: never a prompt or completion, an API
key, a payment header or a signature.

Metrics (attributes ``llm402.agent``, ``llm402.intent``, ``gen_ai.request.model``, ``llm402.gateway`` (the origin),
``gen_ai.operation.name``, ``llm402.outcome`` (``ok``, ``refused`` or ``error``) and ``error.type``):
``llm402.cost`` (a counter, ``{USD}``), ``llm402.calls`` (a counter, ``{call}``), ``gen_ai.client.token.usage`` (a
histogram by ``gen_ai.token.type``, ``input`` or ``output``; calls that used no gateway tokens, such as cache hits and
refusals, record none) and ``gen_ai.client.operation.duration`` (a histogram, seconds).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

try:
    from opentelemetry import metrics, trace
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("llm402.otel needs the OpenTelemetry API: pip install 'llm402[otel]'") from exc

from ._version import __version__
from .engine import add_process_listener, remove_process_listener
from .money import atomic_to_usd
from .receipts import Receipt

__all__ = ["instrument", "instrumented", "record", "uninstrument"]

SCOPE = "llm402"
CURRENCY = "USD"
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
"""The bucket boundaries the GenAI conventions advise for ``gen_ai.client.token.usage``."""
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
"""The bucket boundaries the GenAI conventions advise for ``gen_ai.client.operation.duration``."""

_CHAT_SUFFIXES = ("/chat/completions", "/responses", "/messages")
_OPERATIONS = (
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/images/generations", "image_generation"),
    ("/topup", "topup"),
)


@dataclass(frozen=True, slots=True)
class _Instruments:
    """The tracer and instruments of one pair of providers."""

    tracer_provider: trace.TracerProvider
    meter_provider: metrics.MeterProvider
    tracer: trace.Tracer
    cost: metrics.Counter
    calls: metrics.Counter
    tokens: metrics.Histogram
    duration: metrics.Histogram

    def serves(self, tracer_provider: trace.TracerProvider, meter_provider: metrics.MeterProvider) -> bool:
        return self.tracer_provider is tracer_provider and self.meter_provider is meter_provider

    @classmethod
    def of(cls, tracer_provider: trace.TracerProvider, meter_provider: metrics.MeterProvider) -> _Instruments:
        tracer = tracer_provider.get_tracer(SCOPE, __version__)
        meter = meter_provider.get_meter(SCOPE, __version__)
        return cls(
            tracer_provider,
            meter_provider,
            tracer,
            meter.create_counter("llm402.cost", unit="{USD}", description="What llm402's calls cost, in USD."),
            meter.create_counter("llm402.calls", unit="{call}", description="Calls through llm402, by outcome."),
            meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
            ),
            meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
            ),
        )


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.on = False
        self.tracer_provider: trace.TracerProvider | None = None  # None: the global one, read on each call
        self.meter_provider: metrics.MeterProvider | None = None
        self.instruments: _Instruments | None = None  # replaced, never mutated: read without the lock

    def resolve(self) -> _Instruments:
        """The instruments of the current providers, made again when a provider changed."""
        tracer_provider = self.tracer_provider or trace.get_tracer_provider()
        meter_provider = self.meter_provider or metrics.get_meter_provider()
        current = self.instruments
        if current is not None and current.serves(tracer_provider, meter_provider):
            return current
        with self.lock:
            current = self.instruments
            if current is None or not current.serves(tracer_provider, meter_provider):
                current = self.instruments = _Instruments.of(tracer_provider, meter_provider)
            return current


_state = _State()


def instrument(
    *, tracer_provider: trace.TracerProvider | None = None, meter_provider: metrics.MeterProvider | None = None
) -> None:
    """Record a span and metric points for every call through any gateway of this process, from now on.

    By default through the global providers (``opentelemetry.trace`` / ``opentelemetry.metrics``), read again on each
    call; pass ``tracer_provider`` / ``meter_provider`` to use others. Calling it again only changes the providers."""
    with _state.lock:
        _state.tracer_provider = tracer_provider
        _state.meter_provider = meter_provider
        _state.on = True
    _state.resolve()
    add_process_listener(record)  # a second add is a no-op


def uninstrument() -> None:
    """Stop recording (spans already recorded stay)."""
    remove_process_listener(record)
    with _state.lock:
        _state.on = False
        _state.tracer_provider = None
        _state.meter_provider = None
        _state.instruments = None


def instrumented() -> bool:
    """Whether `instrument` is in effect."""
    return _state.on


def record(receipt: Receipt) -> None:
    """Record one receipt as a span and metric points (what `instrument` does for every call; also usable to export
    receipts read back from a ledger). Runs in the caller's context: the span is a child of the current span."""
    instruments = _state.resolve()
    operation = operation_name(receipt)
    start = int(receipt.started_at * 1_000_000_000)
    end = start + max(0, int(receipt.latency_ms * 1_000_000))
    span = instruments.tracer.start_span(
        f"{operation} {receipt.model}" if receipt.model else operation,
        kind=trace.SpanKind.CLIENT,
        attributes=span_attributes(receipt),
        start_time=start,
    )
    if receipt.error is not None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, receipt.error))
    span.end(end_time=end)

    attributes = metric_attributes(receipt)
    instruments.calls.add(1, attributes)
    if receipt.cost:
        instruments.cost.add(float(atomic_to_usd(receipt.cost)), attributes)
    instruments.duration.record(receipt.latency_ms / 1000, attributes)
    if _used_tokens(receipt):
        instruments.tokens.record(receipt.prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
        instruments.tokens.record(receipt.completion_tokens, {**attributes, "gen_ai.token.type": "output"})


# --- what a receipt becomes --------------------------------------------------------------------------------------


def operation_name(receipt: Receipt) -> str:
    """The GenAI operation name of a call: ``chat`` (chat completions, responses, messages), ``text_completion``,
    ``embeddings``, ``generate_content`` (Gemini), ``image_generation``, ``topup`` (a credit top-up), else the last
    segment of its path."""
    if receipt.payment is not None and receipt.payment.kind == "topup":
        return "topup"
    path = receipt.path.rstrip("/")
    if path.endswith(_CHAT_SUFFIXES):
        return "chat"
    if ":generatecontent" in path.lower() or ":streamgeneratecontent" in path.lower():
        return "generate_content"
    for suffix, name in _OPERATIONS:
        if path.endswith(suffix):
            return name
    return path.rsplit("/", 1)[-1].split(":", 1)[-1] or receipt.method.lower()


def outcome(receipt: Receipt) -> str:
    """``ok``, ``refused`` (a 402 answer: a refusal by the policy, the budget or the gateway) or ``error``."""
    if receipt.error is None:
        return "ok"
    return "refused" if receipt.status == 402 else "error"


def _server(origin: str) -> tuple[str | None, int | None, str]:
    """Host, port and the origin without any user info."""
    parts = urlsplit(origin)
    host = parts.hostname
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"https": 443, "http": 80}.get(parts.scheme)
    shown = host if host is None or ":" not in host else f"[{host}]"
    netloc = shown or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return host, port, f"{parts.scheme}://{netloc}"


def _used_tokens(receipt: Receipt) -> bool:
    return not receipt.cache_hit and (receipt.prompt_tokens > 0 or receipt.completion_tokens > 0)


def span_attributes(receipt: Receipt) -> dict[str, Any]:
    """A receipt's span attributes (see the module's documentation); never ``None`` values."""
    host, port, _ = _server(receipt.gateway)
    operation = operation_name(receipt)
    attributes: dict[str, Any] = {
        "llm402.call_id": receipt.call_id,
        "llm402.agent": receipt.agent,
        "llm402.streamed": receipt.streamed,
        "llm402.cache_hit": receipt.cache_hit,
        "llm402.outcome": outcome(receipt),
        "http.request.method": receipt.method,
        "gen_ai.usage.cost.amount": float(atomic_to_usd(receipt.cost)),
        "gen_ai.usage.cost.currency": CURRENCY,
        "llm402.cost.atomic": receipt.cost,
        "llm402.reserved.atomic": receipt.reserved,
    }
    if operation != "topup":
        attributes["gen_ai.operation.name"] = operation
        attributes["gen_ai.usage.input_tokens"] = receipt.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = receipt.completion_tokens
    optional: dict[str, Any] = {
        "gen_ai.request.model": receipt.model,
        "server.address": host,
        "server.port": port,
        "http.response.status_code": receipt.status,
        "error.type": receipt.error,
        "llm402.intent": receipt.intent,
        "llm402.route": receipt.route,
        "llm402.credits_remaining": receipt.credits_remaining,
        "llm402.saved.atomic": receipt.saved or None,
    }
    payment = receipt.payment
    if payment is not None:
        if receipt.cost and not payment.reused:
            attributes["gen_ai.usage.cost.source"] = "provider"  # the price the gateway quoted, paid
        optional.update(
            {
                "llm402.payment.kind": payment.kind,
                "llm402.payment.scheme": payment.scheme,
                "llm402.payment.network": payment.network,
                "llm402.payment.asset": payment.asset,
                "llm402.payment.amount": payment.amount,
                "llm402.payment.settled_amount": payment.settled_amount,
                "llm402.payment.settled": payment.settled,
                "llm402.payment.reused": payment.reused,
                "llm402.payment.transaction": payment.transaction,
                "llm402.payment.payee": payment.payee,
                "llm402.payment.payer": payment.payer,
            }
        )
    attributes.update((key, value) for key, value in optional.items() if value is not None)
    return attributes


def metric_attributes(receipt: Receipt) -> dict[str, Any]:
    """A receipt's metric attributes: low cardinality only (no call id, transaction or payer)."""
    _, _, origin = _server(receipt.gateway)
    attributes: dict[str, Any] = {
        "llm402.agent": receipt.agent,
        "llm402.gateway": origin,
        "gen_ai.operation.name": operation_name(receipt),
        "llm402.outcome": outcome(receipt),
    }
    if receipt.intent is not None:
        attributes["llm402.intent"] = receipt.intent
    if receipt.model is not None:
        attributes["gen_ai.request.model"] = receipt.model
    if receipt.error is not None:
        attributes["error.type"] = receipt.error
    return attributes
