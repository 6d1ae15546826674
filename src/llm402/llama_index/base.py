"""`GatewayLLM`: LlamaIndex's `OpenAILike` paying through an llm402 `Gateway`, with the defaults a paid gateway needs.

A plain ``OpenAILike(..., http_client=gw.http_client(), async_http_client=gw.async_http_client())`` already pays
once per call. This subclass only changes what differs:

- **Retries.** LlamaIndex stacks its own tenacity layer on top of the OpenAI SDK's retries; tenacity ignores
  ``x-should-retry`` and multiplies attempts. `GatewayLLM` calls the upstream methods without that layer and gives
  ``max_retries`` to the SDK alone, which obeys the ``x-should-retry: false`` llm402 puts on every response that
  followed a payment, and whose retries after a lost answer re-send the same signed payment (never a new one).
- **Cost.** Each response carries ``cost`` (USD string), ``cost_micro_usdc`` and ``payment`` in its
  ``additional_kwargs``, and every receipt is dispatched as a `GatewayPaymentEvent`. Receipts are collected in the
  caller's own context while the SDK call (or the stream) runs, so concurrent calls never see each other's.
- **Clients.** ``reuse_client=False`` makes LlamaIndex close the http client after each call, so it gets a fresh
  gateway client per call; with a client the caller passed in, it is refused rather than closing that client.
- **Secrets.** The wallet and the gateway's API key live in the `Gateway` (a private attribute); the ``api_key``
  field only ever holds a placeholder, so ``to_dict()`` and ``repr`` have nothing to leak.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import openai
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_serializer
from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]  # no __all__
from llama_index.core.instrumentation.span import active_span_id
from llama_index.llms.openai_like import OpenAILike

from ..errors import ConfigurationError
from ..gateway import PLACEHOLDER_API_KEY, Gateway
from ..money import atomic_to_usd
from ..openai import refusal_from_error
from ..receipts import Receipt, payment_view
from ..wallet import ENV_KEYSTORE, ENV_PRIVATE_KEY, Wallet
from .events import GatewayPaymentEvent

if TYPE_CHECKING:
    from ..budget import Ledger
    from ..policy import Policy
    from ..wallet import Signer

log = logging.getLogger("llm402")
dispatcher = get_dispatcher(__name__)

DEFAULT_CONTEXT_WINDOW = 8192
"""Used when the gateway's catalog does not give the model's context length: the smallest window of current chat
models. LlamaIndex's own 3900 would truncate retrieval context for no reason; a larger guess risks a 400."""
DEFAULT_MAX_RETRIES = 2  # the OpenAI SDK's default
DEFAULT_TIMEOUT = 600.0  # the OpenAI SDK's default: a paid call is worth waiting for
PRICE_FETCH_TIMEOUT = 5.0
REDACTED = "<redacted>"
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"})
_SECRET_HEADER_PARTS = ("payment", "token", "secret", "key")

_R = TypeVar("_R", ChatResponse, CompletionResponse)

# --- receipts of the call running in this context ----------------------------------------------------------------

_receipts_here: ContextVar[list[Receipt] | None] = ContextVar("llm402_llama_index_receipts", default=None)


def _collect(receipt: Receipt) -> None:
    """Engine listener: keep the receipt for the LlamaIndex call running in this context, if there is one.

    The engine finishes a call in the caller's context (the transport runs inside the SDK call, and a stream's
    last step runs inside the consumer's ``next``), so each call only ever sees its own receipts."""
    bucket = _receipts_here.get()
    if bucket is not None:
        bucket.append(receipt)


@contextmanager
def _collecting(into: list[Receipt]) -> Iterator[None]:
    """Collect the receipts finished in this block; turn llm402's local 402 refusals into its typed errors."""
    token = _receipts_here.set(into)
    try:
        yield
    except openai.APIStatusError as exc:
        refusal = refusal_from_error(exc)
        if refusal is None:
            raise
        raise refusal from exc
    finally:
        _receipts_here.reset(token)


def _publish(receipts: Sequence[Receipt], span_id: str | None = None) -> None:
    for receipt in receipts:
        event = GatewayPaymentEvent.from_receipt(receipt)
        if span_id is not None:
            event.span_id = span_id
        dispatcher.event(event)


def cost_fields(receipts: Sequence[Receipt]) -> dict[str, Any]:
    """What a response carries in ``additional_kwargs`` for the receipts of its call (empty if none)."""
    if not receipts:
        return {}
    cost = sum(r.cost for r in receipts)
    payments = [r.payment for r in receipts if r.payment is not None]
    return {
        "cost": f"{atomic_to_usd(cost):f}",
        "cost_micro_usdc": cost,
        "payment": payment_view(payments[-1]) if payments else None,
        "call_id": receipts[-1].call_id,
    }


def _metered_stream(inner: Generator[_R, None, None], span_id: str | None) -> Generator[_R, None, None]:
    """Pass a LlamaIndex response stream through unchanged, then add one last response (``delta=""``, the same
    message) carrying the cost: the receipt only exists once the stream has ended. Its events go to ``span_id``,
    the LlamaIndex span the stream was opened in (it has closed by the time the stream ends)."""
    receipts: list[Receipt] = []
    last: _R | None = None
    published = False
    try:
        while True:
            with _collecting(receipts):
                item = next(inner, None)
            if item is None:
                break
            last = item
            yield item
        published = True
        _publish(receipts, span_id)
        if last is not None and receipts:
            yield _final(last, receipts)
    finally:
        if not published:  # abandoned or failed: the receipt may be finished by closing the SDK stream
            with _collecting(receipts):
                inner.close()
            _publish(receipts, span_id)


async def _ametered_stream(inner: AsyncGenerator[_R, None], span_id: str | None) -> AsyncGenerator[_R, None]:
    """The async twin of `_metered_stream`."""
    receipts: list[Receipt] = []
    last: _R | None = None
    published = False
    try:
        while True:
            with _collecting(receipts):
                item = await anext(inner, None)
            if item is None:
                break
            last = item
            yield item
        published = True
        _publish(receipts, span_id)
        if last is not None and receipts:
            yield _final(last, receipts)
    finally:
        if not published:
            with _collecting(receipts):
                await inner.aclose()
            _publish(receipts, span_id)


def _final(last: _R, receipts: Sequence[Receipt]) -> _R:
    extra = {**last.additional_kwargs, **cost_fields(receipts)}
    return last.model_copy(update={"delta": "", "additional_kwargs": extra})


def _without_retry_layer(method: Callable[..., Any]) -> Callable[..., Any]:
    """The upstream method without LlamaIndex's ``llm_retry_decorator`` (tenacity)."""
    unwrapped: Callable[..., Any] = inspect.unwrap(method)
    return unwrapped


# --- building the gateway --------------------------------------------------------------------------------------


def _wallet_in_env() -> bool:
    return bool(os.environ.get(ENV_PRIVATE_KEY) or os.environ.get(ENV_KEYSTORE))


def _real_key(api_key: str | None) -> str | None:
    """``None`` for the markers `GatewayLLM` itself puts in the ``api_key`` field (e.g. from ``to_dict()``)."""
    return None if api_key in (None, "", PLACEHOLDER_API_KEY, REDACTED) else api_key


def _context_window(gateway: Gateway, model: str, fetch: bool) -> int:
    price = gateway.prices.lookup(model)
    if price is None and fetch:
        try:
            price = gateway.load_prices(timeout=PRICE_FETCH_TIMEOUT).lookup(model)
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("llm402: no price catalog from %s (%s)", gateway.base_url, type(exc).__name__)
    if price is not None and price.context_length:
        return price.context_length
    return DEFAULT_CONTEXT_WINDOW


class GatewayLLM(OpenAILike):  # type: ignore[misc]  # llama-index-llms-openai-like ships no type information
    """An OpenAI-compatible LlamaIndex LLM whose every call is checked, paid and metered by llm402.

    ``GatewayLLM(model="sandbox/small", gateway=gw)``, or from plain settings:
    ``GatewayLLM(model=..., base_url=..., policy=Policy(...), ledger="sqlite:///...", agent=..., intent=...)``
    with the wallet from ``LLM402_PRIVATE_KEY`` (or ``LLM402_KEYSTORE``), or ``wallet=``.
    """

    max_retries: int = Field(
        default=DEFAULT_MAX_RETRIES,
        ge=0,
        description="Retries by the OpenAI SDK, which obeys llm402's `x-should-retry: false` after a payment. "
        "LlamaIndex's own retry layer is not used.",
    )
    timeout: float = Field(default=DEFAULT_TIMEOUT, ge=0, description="Seconds to wait for an API call.")
    api_key: str | None = Field(
        default=PLACEHOLDER_API_KEY,
        description="Always a placeholder: the gateway holds the real key and the wallet.",
    )
    default_headers: dict[str, str] | None = Field(
        default=None, repr=False, description="Extra request headers (secret ones are redacted when serialized)."
    )

    _gateway: Gateway = PrivateAttr()
    _injected_clients: bool = PrivateAttr(default=False)
    _owned_clients: list[httpx.Client | httpx.AsyncClient] = PrivateAttr(default_factory=list)

    def __init__(
        self,
        model: str,
        *,
        gateway: Gateway | None = None,
        base_url: str | None = None,
        wallet: Signer | None = None,
        policy: Policy | str | os.PathLike[str] | Mapping[str, Any] | None = None,
        ledger: Ledger | str | None = None,
        agent: str | None = None,
        intent: str | None = None,
        api_key: str | None = None,
        context_window: int | None = None,
        fetch_prices: bool = True,
        is_chat_model: bool = True,
        is_function_calling_model: bool = True,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout: float = DEFAULT_TIMEOUT,
        reuse_client: bool = True,
        additional_kwargs: dict[str, Any] | None = None,
        http_client: httpx.Client | None = None,
        async_http_client: httpx.AsyncClient | None = None,
        **kwargs: Any,
    ) -> None:
        for name in ("openai_client", "async_openai_client"):
            if kwargs.get(name) is not None:
                raise ConfigurationError(
                    f"GatewayLLM builds its OpenAI clients on the gateway's transport; instead of {name}=, "
                    "pass http_client=gw.http_client() / async_http_client=gw.async_http_client()"
                )
        injected = http_client is not None or async_http_client is not None
        if injected and not reuse_client:
            raise ConfigurationError(
                "reuse_client=False makes LlamaIndex close the http client after every call, which would close "
                "the client you passed in; keep reuse_client=True, or pass no client (a fresh one is made per call)"
            )
        api_base = kwargs.pop("api_base", None)
        if gateway is None:
            key = _real_key(api_key)
            url = base_url or api_base
            if url is None:
                raise ConfigurationError("GatewayLLM needs gateway=Gateway(...) or base_url='https://.../v1'")
            if wallet is None and (key is None or _wallet_in_env()):
                wallet = Wallet.from_env()
            gateway = Gateway(url, wallet=wallet, policy=policy, ledger=ledger, agent=agent, intent=intent, api_key=key)
        else:
            given = {
                "base_url": base_url,
                "wallet": wallet,
                "policy": policy,
                "ledger": ledger,
                "agent": agent,
                "intent": intent,
                "api_key": _real_key(api_key),
            }
            clashing = [name for name, value in given.items() if value is not None]
            if api_base is not None and str(api_base).rstrip("/") != gateway.base_url:
                clashing.append("api_base")
            if clashing:
                raise ConfigurationError(
                    f"pass either gateway= or plain settings, not both: {', '.join(clashing)} belong to the gateway"
                )
        additional_kwargs = dict(additional_kwargs or {})
        additional_kwargs.setdefault("stream_options", {"include_usage": True})  # usage (and cost) on streams
        owned: list[httpx.Client | httpx.AsyncClient] = []
        if reuse_client:
            if http_client is None:
                http_client = gateway.http_client()
                owned.append(http_client)
            if async_http_client is None:
                async_http_client = gateway.async_http_client()
                owned.append(async_http_client)
        super().__init__(
            model=model,
            api_base=gateway.base_url,
            api_key=PLACEHOLDER_API_KEY if gateway.api_key == PLACEHOLDER_API_KEY else REDACTED,
            context_window=context_window or _context_window(gateway, model, fetch_prices),
            is_chat_model=is_chat_model,
            is_function_calling_model=is_function_calling_model,
            max_retries=max_retries,
            timeout=timeout,
            reuse_client=reuse_client,
            additional_kwargs=additional_kwargs,
            http_client=http_client,
            async_http_client=async_http_client,
            **kwargs,
        )
        self._gateway = gateway
        self._injected_clients = injected
        self._owned_clients = owned
        gateway.engine.remove_listener(_collect)  # at most once per gateway, however many LLMs share it
        gateway.engine.add_listener(_collect)

    @classmethod
    def class_name(cls) -> str:
        """The name LlamaIndex serializes this LLM under."""
        return "GatewayLLM"

    @property
    def gateway(self) -> Gateway:
        """The llm402 gateway this LLM pays through (receipts, ledger, policy)."""
        return self._gateway

    def close(self) -> None:
        """Close the sync http client this LLM made itself (clients passed in are the caller's to close)."""
        for client in self._owned_clients:
            if isinstance(client, httpx.Client):
                client.close()

    async def aclose(self) -> None:
        """Close every http client this LLM made itself (clients passed in are the caller's to close)."""
        for client in self._owned_clients:
            if isinstance(client, httpx.AsyncClient):
                await client.aclose()
            else:
                client.close()

    @field_serializer("default_headers")
    def _redact_headers(self, headers: dict[str, str] | None) -> dict[str, str] | None:
        if not headers:
            return headers
        return {
            name: REDACTED
            if name.lower() in _SECRET_HEADERS or any(p in name.lower() for p in _SECRET_HEADER_PARTS)
            else value
            for name, value in headers.items()
        }

    def _get_credential_kwargs(self, is_async: bool = False) -> dict[str, Any]:
        credentials: dict[str, Any] = super()._get_credential_kwargs(is_async)
        credentials["api_key"] = self._gateway.api_key
        if not self.reuse_client:
            if self._injected_clients:
                raise ConfigurationError("reuse_client=False would close the http client passed to GatewayLLM")
            # LlamaIndex closes this client after the call (`with client:`): it must be one nobody else holds
            credentials["http_client"] = (
                self._gateway.async_http_client(timeout=self.timeout)
                if is_async
                else self._gateway.http_client(timeout=self.timeout)
            )
        return credentials

    # --- the upstream calls, without tenacity, with cost ---------------------------------------------------------

    def _metered(self, method: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
        receipts: list[Receipt] = []
        try:
            with _collecting(receipts):
                response: _R = _without_retry_layer(method)(self, *args, **kwargs)
        finally:
            _publish(receipts)
        response.additional_kwargs.update(cost_fields(receipts))
        return response

    async def _ametered(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        receipts: list[Receipt] = []
        try:
            with _collecting(receipts):
                response = await _without_retry_layer(method)(self, *args, **kwargs)
        finally:
            _publish(receipts)
        response.additional_kwargs.update(cost_fields(receipts))
        return response

    def _chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response: ChatResponse = self._metered(OpenAILike._chat, messages, **kwargs)
        return response

    def _complete(self, prompt: str, **kwargs: Any) -> CompletionResponse:
        response: CompletionResponse = self._metered(OpenAILike._complete, prompt, **kwargs)
        return response

    def _stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> Generator[ChatResponse, None, None]:
        inner = _without_retry_layer(OpenAILike._stream_chat)(self, messages, **kwargs)
        return _metered_stream(inner, active_span_id.get())

    def _stream_complete(self, prompt: str, **kwargs: Any) -> Generator[CompletionResponse, None, None]:
        inner = _without_retry_layer(OpenAILike._stream_complete)(self, prompt, **kwargs)
        return _metered_stream(inner, active_span_id.get())

    async def _achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response: ChatResponse = await self._ametered(OpenAILike._achat, messages, **kwargs)
        return response

    async def _acomplete(self, prompt: str, **kwargs: Any) -> CompletionResponse:
        response: CompletionResponse = await self._ametered(OpenAILike._acomplete, prompt, **kwargs)
        return response

    async def _astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> AsyncGenerator[ChatResponse, None]:
        inner = await _without_retry_layer(OpenAILike._astream_chat)(self, messages, **kwargs)
        return _ametered_stream(inner, active_span_id.get())

    async def _astream_complete(self, prompt: str, **kwargs: Any) -> AsyncGenerator[CompletionResponse, None]:
        inner = await _without_retry_layer(OpenAILike._astream_complete)(self, prompt, **kwargs)
        return _ametered_stream(inner, active_span_id.get())
