"""`Gateway`: one object that composes wallet, identity, policy, ledger and prices, and makes the http clients."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from .budget import Ledger, open_ledger
from .core import FlowConfig, PaymentMemory
from .engine import Engine, ReceiptListener
from .errors import ConfigurationError
from .policy import Policy
from .pricing import ModelPrice, PriceCatalog
from .receipts import Receipt
from .transport import AsyncPaymentTransport, PaymentTransport, default_limits
from .wallet import Signer

if TYPE_CHECKING:
    import httpx2

PLACEHOLDER_API_KEY = "llm402-pay-per-call"
"""Sent as the SDK's api_key when a gateway is paid per call; the transport removes it before the wire."""
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # the OpenAI SDK's defaults


def _policy(value: Policy | str | os.PathLike[str] | Mapping[str, Any] | None) -> Policy:
    if value is None:
        return Policy.from_env()
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
        policy: Policy | str | os.PathLike[str] | Mapping[str, Any] | None = None,
        agent: str | None = None,
        intent: str | None = None,
        ledger: Ledger | str | None = None,
        api_key: str | None = None,
        prices: PriceCatalog | Mapping[str, ModelPrice] | None = None,
        cost_header: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(f"gateway base_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.wallet = wallet
        self.policy = _policy(policy)
        self.agent = agent or (wallet.address if wallet is not None else "default")
        self.intent = intent
        self._owns_ledger = not isinstance(ledger, Ledger)
        self.ledger: Ledger = ledger if isinstance(ledger, Ledger) else open_ledger(ledger, clock=clock)
        self._api_key = api_key
        catalog = prices if isinstance(prices, PriceCatalog) else PriceCatalog(prices)
        config = FlowConfig(
            agent=self.agent,
            intent=intent,
            policy=self.policy,
            prices=catalog,
            payments=PaymentMemory(),
            cost_header=cost_header,
        )
        if clock is not None:
            config.clock = clock
        self.engine = Engine(config, self.ledger, wallet, None if api_key else PLACEHOLDER_API_KEY)
        self.ledger.recover(config.clock())

    # --- what SDKs need --------------------------------------------------------------------------------------
    @property
    def api_key(self) -> str:
        """The gateway's API key, or a placeholder for pay-per-call gateways (never sent on the wire)."""
        return self._api_key or PLACEHOLDER_API_KEY

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` for ``openai.OpenAI(http_client=...)``, LangChain or LlamaIndex."""
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        kwargs.setdefault("follow_redirects", True)
        inner = httpx.HTTPTransport(limits=kwargs.pop("limits", default_limits()))
        return httpx.Client(transport=PaymentTransport(self.engine, inner), **kwargs)

    def async_http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for ``openai.AsyncOpenAI(http_client=...)`` and async frameworks."""
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        kwargs.setdefault("follow_redirects", True)
        inner = httpx.AsyncHTTPTransport(limits=kwargs.pop("limits", default_limits()))
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
        return {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    # --- receipts ------------------------------------------------------------------------------------------------
    @property
    def last_receipt(self) -> Receipt | None:
        """The receipt of the last call finished through this gateway (any thread)."""
        return self.engine.last_receipt

    def receipts(self, since: float | None = None) -> Sequence[Receipt]:
        """Receipts stored in the ledger."""
        return self.ledger.receipts(since)

    def on_receipt(self, listener: ReceiptListener) -> None:
        """Call ``listener`` with each receipt as calls finish."""
        self.engine.add_listener(listener)

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


def expand(path: str) -> Path:
    """``~`` expansion for CLI paths."""
    return Path(path).expanduser()
