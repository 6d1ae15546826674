"""`Gateway`: one object that composes wallet, identity, policy, ledger and prices, and makes the http clients."""

from __future__ import annotations

import functools
import os
import ssl
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from .alerts import AlertListener
from .approval import Approver
from .budget import Ledger, open_ledger
from .core import CurrentKey, FlowConfig, PaymentMemory, ResponseCache
from .credit import CreditProfile, load_key
from .engine import Engine, ReceiptListener
from .errors import ConfigurationError
from .identity import Identity, gateway_identity, identity_headers
from .kiosk import CreditAccount
from .policy import Policy
from .policy_sources import PolicySource
from .pricing import ModelPrice, PriceCatalog
from .quotes import Quote
from .receipts import Receipt
from .transport import AsyncPaymentTransport, PaymentTransport, default_limits
from .wallet import Signer

if TYPE_CHECKING:
    import httpx2

PROFILES = ("auto", "x402", "token-kiosk", "aisa", "plain")
KIOSK_REJECTED_FIELDS = frozenset({"thinking", "reasoning_effort"})
PLACEHOLDER_API_KEY = "llm402-pay-per-call"
"""Sent as the SDK's api_key when a gateway is paid per call; the transport removes it before the wire."""
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # the OpenAI SDK's defaults


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One default TLS context for every client (building one costs ~50 ms)."""
    return httpx.create_ssl_context()


def _response_cache(setting: bool | int) -> ResponseCache | None:
    """``True`` for the default size, a number of entries, or off."""
    if setting is False or setting == 0:
        return None
    return ResponseCache() if setting is True else ResponseCache(int(setting))


def _policy(value: Policy | str | os.PathLike[str] | Mapping[str, Any] | None) -> Policy:
    if value is None:
        policy = Policy.from_env()
        if policy.default_limits:
            warnings.warn(
                "llm402: no policy given, so the safe defaults apply: at most $1 a payment and $10 per agent per "
                "UTC day (pass Policy(max_payment_usd=..., daily_cap_usd=...) to change them)",
                UserWarning,
                stacklevel=3,
            )
        return policy
    if isinstance(value, Policy):
        return value
    if isinstance(value, Mapping):
        return Policy.from_mapping(dict(value))
    return Policy.from_file(value)


class Gateway:
    """An LLM gateway seen through llm402: every request through its clients is checked, paid and metered.

    ``Gateway("http://127.0.0.1:8402/v1", wallet=Wallet.from_env(), policy=Policy(...), agent="judge")``
    """

    def __init__(
        self,
        base_url: str,
        *,
        wallet: Signer | None = None,
        policy: Policy | PolicySource | str | os.PathLike[str] | Mapping[str, Any] | None = None,
        agent: str | Identity | None = None,
        intent: str | None = None,
        ledger: Ledger | str | None = None,
        api_key: str | None = None,
        prices: PriceCatalog | Mapping[str, ModelPrice] | None = None,
        cost_header: bool = True,
        clock: Callable[[], float] | None = None,
        profile: str = "auto",
        key_store: str | None = None,
        approver: Approver | None = None,
        credit: CreditProfile | None = None,
        max_stream_seconds: float | None = 600.0,
        response_cache: bool | int = False,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(f"gateway base_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.wallet = wallet
        self._policy_source = policy if isinstance(policy, PolicySource) else None
        self._policy = policy.current() if isinstance(policy, PolicySource) else _policy(policy)
        self.agent, self.identity = gateway_identity(agent, wallet)
        self.intent = intent
        if profile not in PROFILES:
            raise ConfigurationError(f"unknown gateway profile {profile!r} (use one of {', '.join(PROFILES)})")
        self.profile = profile
        if api_key is None and profile == "aisa":
            api_key = os.environ.get("AISA_API_KEY") or None
        minted = load_key(key_store) if api_key is None and profile == "token-kiosk" else None
        self._owns_ledger = not isinstance(ledger, Ledger)
        self.ledger: Ledger = ledger if isinstance(ledger, Ledger) else open_ledger(ledger, clock=clock)
        self._api_key = api_key
        catalog = prices if isinstance(prices, PriceCatalog) else PriceCatalog(prices)
        kiosk = profile == "token-kiosk"
        config = FlowConfig(
            agent=self.agent,
            intent=intent,
            policy=self._policy,
            policy_source=self._policy_source.current if self._policy_source is not None else None,
            prices=catalog,
            payments=PaymentMemory(),
            cost_header=cost_header,
            base_url=self.base_url,
            payer=wallet.address if wallet is not None else None,
            credit=credit or (CreditProfile() if kiosk else None),  # top-ups only where configured as credit
            api_key=minted,
            mint_keys=kiosk and wallet is not None and api_key is None,
            metered=profile in ("plain", "token-kiosk") or api_key is not None,
            strip_fields=KIOSK_REJECTED_FIELDS if kiosk else frozenset(),
            max_stream_seconds=max_stream_seconds,
            cache=_response_cache(response_cache),
            identity_headers=identity_headers(self.identity, intent),
        )
        if clock is not None:
            config.clock = clock
        self.engine = Engine(
            config,
            self.ledger,
            wallet,
            None if api_key else PLACEHOLDER_API_KEY,
            approver=approver,
            key_store=key_store,
            price_loader=self.load_prices,
        )
        self.ledger.recover(config.clock())

    @property
    def policy(self) -> Policy:
        """The policy in force: a live source's current one (read again after its TTL), or the fixed one."""
        return self._policy_source.current() if self._policy_source is not None else self._policy

    # --- what SDKs need --------------------------------------------------------------------------------------
    @property
    def api_key(self) -> str:
        """The gateway's API key, or a placeholder for pay-per-call gateways (never sent on the wire; a key llm402
        minted is put on the wire by the transport)."""
        return self._api_key or PLACEHOLDER_API_KEY

    @property
    def origin(self) -> str:
        """scheme://host[:port] of the gateway."""
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}"

    # --- quotes --------------------------------------------------------------------------------------------------
    def quote(self, body: Mapping[str, Any], path: str = "/chat/completions") -> Quote:
        """What a request would cost, without paying: the gateway's 402 requirements and the one llm402 would pay
        (AIsa's ``x402_probe``). Raises a typed refusal when the policy would not pay any of them."""
        headers = {"content-type": "application/json", "accept-encoding": "identity", **self._auth_headers()}
        response = httpx.post(f"{self.base_url}{path}", json=dict(body), headers=headers, timeout=30.0)
        return Quote.from_response(response.status_code, response.headers, response.content, self.policy)

    async def aquote(self, body: Mapping[str, Any], path: str = "/chat/completions") -> Quote:
        """`quote`, async."""
        headers = {"content-type": "application/json", "accept-encoding": "identity", **self._auth_headers()}
        async with httpx.AsyncClient(timeout=30.0) as client:
            response = await client.post(f"{self.base_url}{path}", json=dict(body), headers=headers)
        return Quote.from_response(response.status_code, response.headers, response.content, self.policy)

    # --- credit gateways -----------------------------------------------------------------------------------------
    def credit_account(self) -> CreditAccount:
        """Key management, balance, usage and top-ups on a credit gateway (Token Kiosk)."""
        return CreditAccount(self)

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` for ``openai.OpenAI(http_client=...)``, LangChain or LlamaIndex."""
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        kwargs.setdefault("follow_redirects", True)
        inner = httpx.HTTPTransport(verify=_tls_context(), limits=kwargs.pop("limits", default_limits()))
        return httpx.Client(transport=PaymentTransport(self.engine, inner), **kwargs)

    def async_http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for ``openai.AsyncOpenAI(http_client=...)`` and async frameworks."""
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        kwargs.setdefault("follow_redirects", True)
        inner = httpx.AsyncHTTPTransport(verify=_tls_context(), limits=kwargs.pop("limits", default_limits()))
        return httpx.AsyncClient(transport=AsyncPaymentTransport(self.engine, inner), **kwargs)

    def httpx2_client(self, **kwargs: Any) -> httpx2.Client:
        """An ``httpx2.Client`` (the native stack of openai 3.x)."""
        import httpx2

        from .transport_httpx2 import Httpx2PaymentTransport

        kwargs.setdefault("timeout", httpx2.Timeout(600.0, connect=5.0))
        kwargs.setdefault("follow_redirects", True)
        return httpx2.Client(transport=Httpx2PaymentTransport(self.engine), **kwargs)

    def async_httpx2_client(self, **kwargs: Any) -> httpx2.AsyncClient:
        """An ``httpx2.AsyncClient`` (the native stack of openai 3.x)."""
        import httpx2

        from .transport_httpx2 import AsyncHttpx2PaymentTransport

        kwargs.setdefault("timeout", httpx2.Timeout(600.0, connect=5.0))
        kwargs.setdefault("follow_redirects", True)
        return httpx2.AsyncClient(transport=AsyncHttpx2PaymentTransport(self.engine), **kwargs)

    # --- prices ------------------------------------------------------------------------------------------------
    @property
    def prices(self) -> PriceCatalog:
        """The price catalog used for estimates and metering."""
        return self.engine.config.prices

    def load_prices(self, timeout: float = 10.0) -> PriceCatalog:
        """Fetch ``GET {base_url}/models`` and add its prices (configured prices win). Unpriced entries are skipped."""
        response = httpx.get(f"{self.base_url}/models", timeout=timeout, headers=self._auth_headers())
        response.raise_for_status()
        self.engine.config.prices = self.prices.merged(PriceCatalog.from_models_response(response.content))
        return self.prices

    def _auth_headers(self) -> dict[str, str]:
        key = self._api_key or self.engine.perform(CurrentKey())
        return {"authorization": f"Bearer {key}"} if key else {}

    # --- receipts ------------------------------------------------------------------------------------------------
    @property
    def last_receipt(self) -> Receipt | None:
        """The receipt of the last call finished through this gateway (any thread)."""
        return self.engine.last_receipt

    def receipts(self, since: float | None = None, *, every_gateway: bool = False) -> Sequence[Receipt]:
        """This gateway's receipts for this agent (its calls and top-ups) since ``since``, oldest first; with
        ``every_gateway=True`` every receipt in the ledger (which may be shared by other gateways and agents)."""
        stored = self.ledger.receipts(since)
        if every_gateway:
            return stored
        origin, agent = self.origin, self.agent
        return [r for r in stored if r.gateway == origin and r.agent == agent]

    def on_receipt(self, listener: ReceiptListener) -> None:
        """Call ``listener`` with each receipt as calls finish."""
        self.engine.add_listener(listener)

    def on_alert(self, listener: AlertListener) -> None:
        """Call ``listener`` with each budget alert (``Policy(alert_at=...)``) this process fires."""
        self.engine.add_alert_listener(listener)

    def close(self) -> None:
        """Close the ledger if this gateway opened it."""
        if self._owns_ledger:
            self.ledger.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Gateway({self.base_url!r}, agent={self.agent!r}, intent={self.intent!r}, wallet={self.wallet!r})"
