"""`ChatGateway`: a LangChain chat model that pays per call through llm402.

It is ``BaseChatOpenAI`` (the base of langchain-deepseek and langchain-xai) on llm402's http clients: streaming,
tool calling, structured output and usage are inherited; this module adds only what differs — where the clients
come from, serialization names and secrets, the cost of each call, and typed refusals.

How a call's cost reaches its message: the engine publishes every receipt to listeners. Before each call the model
puts a fresh list in a context variable; a listener (one per engine) appends each receipt to the list found in the
context where the call finished. Context variables are inherited by the tasks and executor threads a call spawns
(``asyncio.wait_for`` runs each stream chunk in a new task on Python 3.11), and never shared with a concurrent call,
so two calls on one model can never swap receipts. The cost goes on the message after the SDK call returns, and
when streaming on exactly one chunk, held back until the stream has ended.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextvars import ContextVar, Token
from decimal import Decimal
from typing import Any, NoReturn, Self

import httpx
import openai
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.utils import from_env, secret_from_env
from langchain_openai.chat_models.base import BaseChatOpenAI
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from .._version import __version__
from ..errors import ConfigurationError
from ..gateway import Gateway
from ..money import atomic_to_usd
from ..policy import Policy
from ..receipts import Receipt, payment_view
from ..wallet import ENV_KEYSTORE, ENV_PRIVATE_KEY, Wallet
from .errors import error_from_openai

ENV_API_KEY = "LLM402_API_KEY"
ENV_BASE_URL = "LLM402_BASE_URL"
ENV_MODEL = "LLM402_MODEL"
_MICRO = Decimal("0.000001")
_GATEWAY_FIELDS = ("gateway_base_url", "gateway_api_key", "wallet_private_key", "policy", "ledger", "agent", "intent")

# --- receipts of the call in flight ----------------------------------------------------------------------------

_call_receipts: ContextVar[list[Receipt] | None] = ContextVar("llm402_langchain_call_receipts", default=None)


def _collect(receipt: Receipt) -> None:
    """Engine listener: hand the receipt to the ChatGateway call running in this context, if any."""
    receipts = _call_receipts.get()
    if receipts is not None:
        receipts.append(receipt)


def _begin() -> tuple[list[Receipt], Token[list[Receipt] | None]]:
    receipts: list[Receipt] = []
    return receipts, _call_receipts.set(receipts)


def _end(token: Token[list[Receipt] | None]) -> None:
    try:
        _call_receipts.reset(token)
    except ValueError:  # a generator finished in another context than it started in (closed by the GC)
        _call_receipts.set(None)


_sync_clients: weakref.WeakKeyDictionary[Gateway, httpx.Client] = weakref.WeakKeyDictionary()
_sync_clients_lock = threading.Lock()


def _sync_client(gateway: Gateway) -> httpx.Client:
    """One paying sync client per gateway, shared by the models on it (one connection pool, and building a client
    costs an SSL context, ~50 ms); the receipt listener is registered along with it, once per gateway.

    Async clients are not shared: an ``httpx.AsyncClient``'s pooled connections belong to the event loop that opened
    them, and models outlive event loops (``asyncio.run`` twice, a test per loop)."""
    with _sync_clients_lock:
        client = _sync_clients.get(gateway)
        if client is None:
            client = _sync_clients[gateway] = gateway.http_client()
            gateway.engine.add_listener(_collect)
        return client


# --- what a call's receipts add to its message -------------------------------------------------------------------


def cost_metadata(receipts: Sequence[Receipt]) -> dict[str, Any]:
    """The ``response_metadata`` entries for one call: ``cost`` (USD, a decimal string, exact to the micro-dollar),
    ``payment`` (when a payment was made) and ``llm402`` (call id, agent, intent)."""
    if not receipts:
        return {}
    last = receipts[-1]
    total = sum(r.cost for r in receipts)  # an SDK retry leaves one receipt per attempt
    metadata: dict[str, Any] = {
        "cost": str(atomic_to_usd(total).quantize(_MICRO)),
        "llm402": {"call_id": last.call_id, "agent": last.agent, "intent": last.intent},
    }
    payment = next((r.payment for r in reversed(receipts) if r.payment is not None), None)
    if payment is not None:
        metadata["payment"] = payment_view(payment)  # the same fields as the CLI's JSON and LlamaIndex's events
    return metadata


def _has_usage(chunk: ChatGenerationChunk) -> bool:
    return isinstance(chunk.message, AIMessageChunk) and bool(chunk.message.usage_metadata)


def _policy_value(value: Any) -> Any:
    if isinstance(value, Policy):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


class ChatGateway(BaseChatOpenAI):
    """A chat model on an LLM gateway, paid per call (x402), from credit, or plain, through llm402.

    From keyword arguments (serializable)::

        ChatGateway(model="sandbox/small", base_url="http://127.0.0.1:8402/v1",   # or LLM402_BASE_URL
                    policy={"daily_cap_usd": "1"}, agent="judge", intent="judging", ledger="sqlite:///budget.db")
        # wallet: LLM402_PRIVATE_KEY (or LLM402_KEYSTORE), or wallet_private_key=...; api_key=... for credit gateways

    or from a `Gateway` you already have (shared ledger, any signer)::

        ChatGateway(model="sandbox/small", gateway=gw)

    Each answer carries ``response_metadata["cost"]`` (USD as a decimal string) and ``["payment"]``; streaming puts
    them on one chunk. A call that is not paid for raises one of ``llm402.langchain.PAYMENT_ERRORS``: a
    `GatewayPaymentError` subclass (llm402 refused it, or the payment failed) or `GatewayInsufficientCredits`.
    """

    model_config = ConfigDict(populate_by_name=True, hide_input_in_errors=True)  # inputs may hold a key

    model_name: str = Field(default_factory=from_env(ENV_MODEL, default=""), alias="model")
    """The gateway's model id, e.g. ``sandbox/small`` (``LLM402_MODEL`` if not given; required)."""
    gateway_base_url: str | None = Field(default_factory=from_env(ENV_BASE_URL, default=None), alias="base_url")
    """The gateway's OpenAI-compatible base URL (``.../v1``); ``LLM402_BASE_URL`` if not given."""
    gateway_api_key: SecretStr | None = Field(
        default_factory=secret_from_env(ENV_API_KEY, default=None), alias="api_key"
    )
    """API key of a credit or plain gateway (``LLM402_API_KEY``); none for per-call x402 gateways."""
    wallet_private_key: SecretStr | None = Field(default_factory=secret_from_env(ENV_PRIVATE_KEY, default=None))
    """The paying wallet's key (``LLM402_PRIVATE_KEY``; ``LLM402_KEYSTORE`` is used when neither is set)."""
    policy: str | dict[str, Any] | None = None
    """A policy file (TOML/JSON) or the policy's fields; ``LLM402_POLICY`` or no limits if not given."""
    ledger: str | None = None
    """Ledger URL (``memory://``, ``sqlite:///path``, ``redis://...``); ``LLM402_LEDGER`` or ``~/.llm402`` if not
    given. Credentials belong in ``LLM402_LEDGER``, never here (arguments are serialized)."""
    agent: str | None = None
    """Who spends (budgets are per agent); the wallet address if not given."""
    intent: str | None = None
    """What the calls are for; the policy may allow only some intents, and some models per intent."""
    gateway: Gateway | None = Field(default=None, exclude=True, repr=False)
    """The `Gateway` the calls go through (built from the fields above when not given; never serialized)."""

    stream_usage: bool | None = True
    """Ask for usage when streaming (gateways meter and charge by it)."""
    # Re-declared without the ``api_key``/``base_url`` aliases, which belong to the gateway fields (xAI pattern).
    openai_api_key: SecretStr | None = None
    openai_api_base: str | None = None

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_as_data(cls, value: Any) -> Any:
        return _policy_value(value)

    @field_validator("ledger")
    @classmethod
    def _ledger_without_credentials(cls, value: str | None) -> str | None:
        if value is not None and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise ConfigurationError(
                "the ledger URL carries credentials; set it in LLM402_LEDGER instead "
                "(ChatGateway arguments are serialized by LangChain)"
            )
        return value

    @model_validator(mode="after")
    def _set_llm402_version(self) -> Self:
        self._add_version("llm402", __version__)
        return self

    @model_validator(mode="after")
    def validate_environment(self) -> Self:
        """Build the OpenAI clients on the gateway's paying http clients (replaces the parent's validator)."""
        if not self.model_name:
            raise ConfigurationError(f"ChatGateway needs model=... (or {ENV_MODEL}), the gateway's model id")
        if self.n is not None and self.n < 1:
            raise ValueError("n must be at least 1.")
        if self.n is not None and self.n > 1 and self.streaming:
            raise ValueError("n must be 1 when streaming.")
        if self.client is None and (self.http_client is not None or self.http_async_client is not None):
            raise ConfigurationError(
                "ChatGateway makes its own http clients (they pay and meter every call); "
                "do not pass http_client/http_async_client"
            )
        if self.openai_proxy:
            raise ConfigurationError("ChatGateway does not take openai_proxy: its http clients come from the Gateway")
        gateway = self._resolve_gateway()
        sync_client = _sync_client(gateway)
        params: dict[str, Any] = {
            "api_key": gateway.api_key,
            "base_url": gateway.base_url,
            "timeout": self.request_timeout,
            "default_headers": self.default_headers,
            "default_query": self.default_query,
        }
        if self.max_retries is not None:
            params["max_retries"] = self.max_retries
        if self.client is None:
            self.http_client = sync_client
            self.root_client = openai.OpenAI(**params, http_client=self.http_client)
            self.client = self.root_client.chat.completions
        if self.async_client is None:
            self.http_async_client = gateway.async_http_client()
            self.root_async_client = openai.AsyncOpenAI(**params, http_client=self.http_async_client)
            self.async_client = self.root_async_client.chat.completions
        return self

    def _resolve_gateway(self) -> Gateway:
        if self.gateway is not None:
            given = [name for name in _GATEWAY_FIELDS if name in self.model_fields_set]
            if given:
                raise ConfigurationError(
                    f"ChatGateway got gateway= and also {', '.join(given)}; configure these on the Gateway instead"
                )
            gateway = self.gateway
            # Describe the gateway in serializable fields, so dumpd/load rebuilds an equivalent model.
            self.gateway_base_url = gateway.base_url
            self.agent = gateway.agent
            self.intent = gateway.intent
            self.policy = _policy_value(gateway.policy) or None
            self.wallet_private_key = None
            self.gateway_api_key = None
            return gateway
        if not self.gateway_base_url:
            raise ConfigurationError(f"ChatGateway needs base_url=... (or {ENV_BASE_URL}) or gateway=Gateway(...)")
        if self.wallet_private_key is not None:
            wallet: Wallet | None = Wallet.from_key(self.wallet_private_key.get_secret_value())
        elif os.environ.get(ENV_KEYSTORE):
            wallet = Wallet.from_env()
        else:
            wallet = None  # a credit or plain gateway; a 402 then fails with a typed "no wallet" error
        api_key = self.gateway_api_key.get_secret_value() if self.gateway_api_key is not None else None
        self.gateway = Gateway(
            self.gateway_base_url,
            wallet=wallet,
            policy=self.policy,
            agent=self.agent,
            intent=self.intent,
            ledger=self.ledger,
            api_key=api_key,
        )
        return self.gateway

    # --- identity and serialization ---------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "llm402-chat"

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"wallet_private_key": ENV_PRIVATE_KEY, "gateway_api_key": ENV_API_KEY}

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        """``["llm402", "langchain"]``: where ``load`` imports the class from."""
        return ["llm402", "langchain"]

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "llm402"
        return params

    def _use_responses_api(self, payload: dict[str, Any]) -> bool:
        # Gateways speak chat completions; the Responses API only when asked for explicitly.
        return self.use_responses_api is True

    # --- calls: cost on the message, refusals typed ------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        receipts, token = _begin()
        try:
            result = super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)
        except Exception as exc:
            self._raise(exc, receipts, kwargs)
        finally:
            _end(token)
        self._annotate(result, receipts)
        return result

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        receipts, token = _begin()
        try:
            result = await super()._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)
        except Exception as exc:
            self._raise(exc, receipts, kwargs)
        finally:
            _end(token)
        self._annotate(result, receipts)
        return result

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        receipts, token = _begin()
        try:
            held: ChatGenerationChunk | None = None
            try:
                for chunk in super()._stream(messages, stop=stop, run_manager=run_manager, **kwargs):
                    if held is not None:
                        yield held
                    held = chunk if _has_usage(chunk) else None
                    if held is None:
                        yield chunk
            except Exception as exc:
                self._raise(exc, receipts, kwargs)
            last = self._closing_chunk(held, receipts)
            if last is not None:
                yield last
        finally:
            _end(token)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        receipts, token = _begin()
        try:
            held: ChatGenerationChunk | None = None
            try:
                async for chunk in super()._astream(messages, stop=stop, run_manager=run_manager, **kwargs):
                    if held is not None:
                        yield held
                    held = chunk if _has_usage(chunk) else None
                    if held is None:
                        yield chunk
            except Exception as exc:
                self._raise(exc, receipts, kwargs)
            last = self._closing_chunk(held, receipts)
            if last is not None:
                yield last
        finally:
            _end(token)

    @staticmethod
    def _annotate(result: ChatResult, receipts: Sequence[Receipt]) -> None:
        if result.generations:  # n > 1 is one call: its cost goes on the first generation only
            result.generations[0].message.response_metadata.update(cost_metadata(receipts))

    @staticmethod
    def _closing_chunk(held: ChatGenerationChunk | None, receipts: Sequence[Receipt]) -> ChatGenerationChunk | None:
        """The usage chunk (held back until the stream ended, when the receipt exists) with the cost on it; a
        cost-only chunk if the stream carried no usage."""
        metadata = cost_metadata(receipts)
        if held is None and metadata:
            held = ChatGenerationChunk(message=AIMessageChunk(content=""))
        if held is not None:
            held.message.response_metadata.update(metadata)
        return held

    def _raise(self, exc: Exception, receipts: Sequence[Receipt], kwargs: Mapping[str, Any]) -> NoReturn:
        model = receipts[-1].model if receipts and receipts[-1].model else kwargs.get("model", self.model_name)
        error = error_from_openai(exc, model=model, receipts=receipts)
        if error is not None:
            raise error from exc
        if receipts:  # what a failed call cost (e.g. paid, then the gateway failed); the cost callback counts it
            with contextlib.suppress(AttributeError):
                exc.llm402_receipts = tuple(receipts)  # type: ignore[attr-defined]
        raise exc
