"""LiteLLM on llm402: http clients whose answers carry llm402's cost where LiteLLM reads a provider's cost.

LiteLLM takes a response cost (USD) from an ``x-litellm-response-cost`` response header: it becomes
``response._hidden_params["response_cost"]`` and the ``response_cost`` its callbacks and logs see, in place of its
own price map (which does not know a gateway's models). The clients built here are ``gw.http_client()`` /
``gw.async_http_client()`` with two event hooks that add that header, so they are opt-in and nothing else changes:

```python
import litellm, openai
from llm402.litellm import cost_reporting_client, openai_client

litellm.completion(model="openai/sandbox/small", messages=..., client=openai_client(gw))     # client=
litellm.client_session = cost_reporting_client(gw)                                           # or the session
litellm.completion(model="openai/sandbox/small", messages=..., api_base=gw.base_url, api_key=gw.api_key)
```

When the header can be known: LiteLLM reads the headers when they arrive, before the body. A JSON answer is read
by the hook first (so its receipt, and the cost, are final); a stream's cost is known then only when it was paid by
an ``exact`` x402 payment (``llm402-cost``). A stream paid by an ``upto`` ceiling settles after its content and a
metered stream (credit, plain gateways) is priced from its final usage, so for those the header is left out (a
guess would be wrong) and the cost is on llm402's receipt (``llm402.current_receipt`` after the stream,
``gw.on_receipt(...)``).

Streamed usage: LiteLLM asks for it only when the caller passes ``stream_options={"include_usage": True}``;
llm402 removes the usage chunk it injected when the caller did not ask, as for every unchanged client.

Retries: LiteLLM's ``num_retries`` retries every ``openai.APIError``, a 402 refusal included (each retry is refused
again locally, nothing is paid; the refusal is typed by ``llm402.errors_any.typed_error``). Its ``retry_policy``
retries by error type, and a refusal (an ``APIError`` 402) is none of its types, so it is not retried.
"""

from __future__ import annotations

from contextvars import ContextVar
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx

from .money import atomic_to_usd
from .receipts import Receipt, current_receipt

if TYPE_CHECKING:
    import openai

    from .gateway import Gateway

__all__ = [
    "COST_HEADER",
    "async_cost_reporting_client",
    "async_openai_client",
    "cost_reporting_client",
    "openai_client",
]

COST_HEADER = "x-litellm-response-cost"
"""The response header LiteLLM reads a response's cost from (USD)."""

_before_call: ContextVar[Receipt | None] = ContextVar("llm402_litellm_before", default=None)


def _usd(atomic: int) -> str:
    return str(atomic_to_usd(atomic).quantize(Decimal("0.000001")))


def _streaming(response: httpx.Response) -> bool:
    return "text/event-stream" in response.headers.get("content-type", "").lower()


def _header_of_stream(response: httpx.Response) -> None:
    paid = response.headers.get("llm402-cost")  # an exact payment: final when the headers arrive
    if paid is not None and paid.isdigit():
        response.headers[COST_HEADER] = _usd(int(paid))


def _header_of_answer(response: httpx.Response) -> None:
    receipt = current_receipt.get()  # set in this context now that the body was read
    if receipt is not None and receipt is not _before_call.get() and receipt.error is None:
        response.headers[COST_HEADER] = _usd(receipt.cost)


def _remember(request: httpx.Request) -> None:
    _before_call.set(current_receipt.get())


def _report(response: httpx.Response) -> None:
    if not 200 <= response.status_code < 300:
        return
    if _streaming(response):
        _header_of_stream(response)
        return
    response.read()
    _header_of_answer(response)


async def _aremember(request: httpx.Request) -> None:
    _before_call.set(current_receipt.get())


async def _areport(response: httpx.Response) -> None:
    if not 200 <= response.status_code < 300:
        return
    if _streaming(response):
        _header_of_stream(response)
        return
    await response.aread()
    _header_of_answer(response)


def _hooks(kwargs: dict[str, Any], request: Any, response: Any) -> dict[str, list[Any]]:
    hooks: dict[str, list[Any]] = {k: list(v) for k, v in (kwargs.pop("event_hooks", None) or {}).items()}
    hooks.setdefault("request", []).append(request)
    hooks.setdefault("response", []).append(response)
    return hooks


def cost_reporting_client(gateway: Gateway, **kwargs: Any) -> httpx.Client:
    """``gateway.http_client(**kwargs)`` whose successful answers carry ``x-litellm-response-cost`` (USD): for
    ``litellm.client_session``, or an ``openai.OpenAI`` given to ``litellm.completion(client=...)``."""
    return gateway.http_client(event_hooks=_hooks(kwargs, _remember, _report), **kwargs)


def async_cost_reporting_client(gateway: Gateway, **kwargs: Any) -> httpx.AsyncClient:
    """`cost_reporting_client`, async: for ``litellm.aclient_session`` and ``litellm.acompletion``."""
    return gateway.async_http_client(event_hooks=_hooks(kwargs, _aremember, _areport), **kwargs)


def openai_client(gateway: Gateway, **kwargs: Any) -> openai.OpenAI:
    """``openai.OpenAI`` on `cost_reporting_client`, for ``litellm.completion(..., client=...)``."""
    import openai

    return openai.OpenAI(
        base_url=gateway.base_url, api_key=gateway.api_key, http_client=cost_reporting_client(gateway), **kwargs
    )


def async_openai_client(gateway: Gateway, **kwargs: Any) -> openai.AsyncOpenAI:
    """``openai.AsyncOpenAI`` on `async_cost_reporting_client`, for ``litellm.acompletion(..., client=...)``."""
    import openai

    return openai.AsyncOpenAI(
        base_url=gateway.base_url,
        api_key=gateway.api_key,
        http_client=async_cost_reporting_client(gateway),
        **kwargs,
    )
