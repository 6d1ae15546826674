"""PydanticAI on llm402: OpenAI chat and Responses models paid through a `Gateway`, with the cost where PydanticAI
reads a gateway's cost, so ``UsageLimits(cost_limit=...)`` is enforced.

PydanticAI reads a cost a gateway reported from the answer's ``usage`` (``usage.logfire_ai_gateway.cost``, a USD
decimal string), and enforces ``cost_limit`` only when a cost is known (otherwise a ``CostNotFoundWarning``). The
models built here talk through ``gw.async_httpx2_client()`` with two event hooks that, on a successful answer, put
the cost of llm402's receipt into that field: in the JSON body, or in the one stream event that carries the usage
(the final usage chunk of a chat stream, ``response.completed`` of a Responses stream). That event is held back
until the stream has ended, when the receipt is final (an ``upto`` stream settles after its content), so it arrives
a few bytes later than it would; nothing else in the answer changes. With ``report_cost_in_usage=False`` (or an
unchanged ``OpenAIProvider(http_client=gw.async_httpx2_client())``) answers are passed through as the gateway sent
them.

Streamed usage: PydanticAI's chat model asks for it (``stream_options.include_usage``), so the usage chunk llm402
would inject anyway is the caller's own and is passed through, with the cost on it.

``pip install "llm402[frameworks3]"`` (PydanticAI needs openai 3.x).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import httpx2

from .receipts import Receipt, current_receipt, usd_string

if TYPE_CHECKING:
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    from .gateway import Gateway

__all__ = [
    "COST_BLOCK",
    "chat_model",
    "cost_reporting_client",
    "provider",
    "responses_model",
    "with_cost",
]

COST_BLOCK = "logfire_ai_gateway"
"""The ``usage`` entry PydanticAI reads a gateway's cost from: ``{"cost": "<USD decimal string>"}``."""

MAX_JSON_BYTES = 16 * 1024 * 1024
"""A JSON answer larger than this is passed through unchanged (its cost is still on the receipt)."""

_FINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_before_call: ContextVar[Receipt | None] = ContextVar("llm402_pydantic_ai_before", default=None)


# --- where the cost goes -----------------------------------------------------------------------------------------


def _usage_of(data: Any) -> dict[str, Any] | None:
    """The usage object of an answer or of a stream event (chat: ``usage``; Responses events: ``response.usage``)."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if isinstance(usage, dict):
        return usage
    response = data.get("response")
    if data.get("type") in _FINAL_RESPONSE_EVENTS and isinstance(response, dict):
        inner = response.get("usage")
        if isinstance(inner, dict):
            return inner
    return None


def with_cost(data: Any, receipt: Receipt) -> bool:
    """Put ``receipt``'s cost into the usage of ``data`` (an answer or a stream event); whether it had one."""
    usage = _usage_of(data)
    if usage is None:
        return False
    usage[COST_BLOCK] = {"cost": usd_string(receipt.cost)}
    return True


def _split_event(buffer: bytes) -> tuple[bytes, bytes] | None:
    """The first complete SSE event (with its blank-line terminator) and the rest, or ``None``."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := buffer.find(sep)) >= 0]
    if not ends:
        return None
    index, size = min(ends)
    return buffer[: index + size], buffer[index + size :]


def _event_data(event: bytes) -> Any:
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not lines or b'"usage"' not in event:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None


def _rewritten_event(event: bytes, data: Any) -> bytes:
    """``event`` with its data lines replaced by one line of ``data`` (the other lines kept, in order)."""
    newline = b"\r\n" if event.endswith(b"\r\n\r\n") else b"\n"
    out: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            if not any(o.startswith(b"data:") for o in out):
                out.append(b"data: " + json.dumps(data, separators=(",", ":")).encode())
        elif line:
            out.append(line)
    return newline.join(out) + newline + newline


class _CostStream(httpx2.AsyncByteStream):
    """The answer's body with the receipt's cost put into its usage: a JSON body is read whole (bounded) and
    rewritten; a stream passes through event by event until the event carrying the usage, which is held back (with
    whatever follows it) until the stream has ended and the receipt is final."""

    def __init__(self, inner: httpx2.AsyncByteStream, streaming: bool, receipt: Callable[[], Receipt | None]) -> None:
        self._inner = inner
        self._streaming = streaming
        self._receipt = receipt

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._streaming:
            async for chunk in self._sse():
                yield chunk
        else:
            async for chunk in self._json():
                yield chunk

    async def _json(self) -> AsyncIterator[bytes]:
        parts: list[bytes] = []
        size = 0
        async for chunk in self._inner:
            if size > MAX_JSON_BYTES:
                yield chunk  # too large to rewrite: passed through
                continue
            parts.append(chunk)
            size += len(chunk)
            if size > MAX_JSON_BYTES:
                yield b"".join(parts)
        if size > MAX_JSON_BYTES:
            return
        body = b"".join(parts)
        receipt = self._receipt()
        if receipt is not None:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if with_cost(data, receipt):
                body = json.dumps(data, separators=(",", ":")).encode()
        yield body

    async def _sse(self) -> AsyncIterator[bytes]:
        pending = b""
        held: list[bytes] = []
        async for chunk in self._inner:
            if held:
                held.append(chunk)
                continue
            pending += chunk
            while (split := _split_event(pending)) is not None:
                event, pending = split
                if held or _usage_of(_event_data(event)) is not None:
                    held.append(event)
                else:
                    yield event
            if held:
                held.append(pending)
                pending = b""
        if not held:
            if pending:
                yield pending
            return
        receipt = self._receipt()
        first, rest = held[0], b"".join(held[1:])
        data = _event_data(first)
        if receipt is not None and with_cost(data, receipt):
            first = _rewritten_event(first, data)
        yield first + rest + pending

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _remember_receipt(request: httpx2.Request) -> None:
    _before_call.set(current_receipt.get())


async def _report_cost(response: httpx2.Response) -> None:
    if not 200 <= response.status_code < 300:
        return
    if response.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
        return  # llm402 asks for identity; a body the gateway encoded anyway is passed through
    kind = response.headers.get("content-type", "").lower()
    streaming = "text/event-stream" in kind
    if not streaming and "json" not in kind:
        return
    before = _before_call.get()

    def receipt() -> Receipt | None:
        after = current_receipt.get()  # set in this context when the body ended
        return after if after is not before and after is not None and after.error is None else None

    stream = response.stream
    if isinstance(stream, httpx2.AsyncByteStream):
        response.stream = _CostStream(stream, streaming, receipt)
        if not streaming:
            response.headers.pop("content-length", None)


# --- what PydanticAI users build ---------------------------------------------------------------------------------


def cost_reporting_client(gateway: Gateway, **kwargs: Any) -> httpx2.AsyncClient:
    """``gateway.async_httpx2_client(**kwargs)`` whose successful answers carry the receipt's cost in their usage
    (``usage.logfire_ai_gateway.cost``), where PydanticAI reads a gateway's cost. Event hooks given in ``kwargs``
    run before llm402's."""
    hooks: dict[str, list[Any]] = {k: list(v) for k, v in (kwargs.pop("event_hooks", None) or {}).items()}
    hooks.setdefault("request", []).append(_remember_receipt)
    hooks.setdefault("response", []).append(_report_cost)
    return gateway.async_httpx2_client(event_hooks=hooks, **kwargs)


def provider(gateway: Gateway, *, report_cost_in_usage: bool = True, **client_kwargs: Any) -> OpenAIProvider:
    """An ``OpenAIProvider`` paying through ``gateway``; with ``report_cost_in_usage`` (the default) its answers
    carry llm402's cost where PydanticAI reads it, so ``UsageLimits(cost_limit=...)`` is enforced."""
    from pydantic_ai.providers.openai import OpenAIProvider

    client = (
        cost_reporting_client(gateway, **client_kwargs)
        if report_cost_in_usage
        else gateway.async_httpx2_client(**client_kwargs)
    )
    return OpenAIProvider(base_url=gateway.base_url, api_key=gateway.api_key, http_client=client)


def chat_model(
    gateway: Gateway, model_name: str, *, report_cost_in_usage: bool = True, **kwargs: Any
) -> OpenAIChatModel:
    """``OpenAIChatModel(model_name)`` (chat completions) paying through ``gateway``; ``kwargs`` go to the model."""
    from pydantic_ai.models.openai import OpenAIChatModel

    return OpenAIChatModel(model_name, provider=provider(gateway, report_cost_in_usage=report_cost_in_usage), **kwargs)


def responses_model(
    gateway: Gateway, model_name: str, *, report_cost_in_usage: bool = True, **kwargs: Any
) -> OpenAIResponsesModel:
    """``OpenAIResponsesModel(model_name)`` (the Responses API) paying through ``gateway``."""
    from pydantic_ai.models.openai import OpenAIResponsesModel

    return OpenAIResponsesModel(
        model_name, provider=provider(gateway, report_cost_in_usage=report_cost_in_usage), **kwargs
    )
