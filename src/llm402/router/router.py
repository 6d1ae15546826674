"""`Router`: routes over gateways, with the clients an SDK needs, route facts, ranking and the router receipts."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import httpx

from ..core import Remaining
from ..errors import ConfigurationError
from ..gateway import DEFAULT_TIMEOUT, PLACEHOLDER_API_KEY
from ..pricing import estimate_cost
from ..receipts import Receipt, current_receipt
from ..transport import AsyncPaymentTransport, PaymentTransport, default_limits
from .routes import Capabilities, Needs, Route, RouteFacts, capabilities_from_listing, lookup_capabilities
from .rules import CircuitBreaker, FallbackRules, RetryPolicy, RouteHealth
from .transport import AsyncRouterTransport, RouterTransport, collect_receipt

if TYPE_CHECKING:
    from ..engine import ReceiptListener
    from ..gateway import Gateway

log = logging.getLogger("llm402.router")

AUTO = "auto"
"""The model name that asks the router for the cheapest route that fits the request."""
ROUTER_BASE_URL = "http://llm402-router.invalid/v1"
"""What SDKs are given as ``base_url``: the router transport re-bases every path onto each route's gateway, so this
host is never contacted (``.invalid`` cannot resolve: a client without the router fails loudly)."""
Strategy = Literal["ordered", "cheapest"]


class Router:
    """Payment-aware fallback over routes (a gateway and a model each), behind one http client.

    ``Router([Route(gw_a, "model-a"), Route(gw_b, "model-b")])``: a call goes to the first route that can take it and
    falls back on rate limits, server errors, timeouts, connection errors, refusals and (optionally) context-length
    errors, with backoff between passes, Retry-After honored and a circuit breaker per route. The model the caller
    names is replaced by each route's; ``"auto"`` (or ``strategy="cheapest"``) ranks the routes that fit the request
    by estimated price. A payment whose answer was lost is re-sent once on its route before falling back, never
    signed again; each route pays its own gateway's price, and one router receipt per call lists every attempt.
    """

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        strategy: Strategy = "ordered",
        retry: RetryPolicy | None = None,
        fallback: FallbackRules | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not routes:
            raise ConfigurationError("a Router needs at least one route")
        if strategy not in ("ordered", "cheapest"):
            raise ConfigurationError(f"unknown routing strategy {strategy!r} (use 'ordered' or 'cheapest')")
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"route names must be unique, got {names}")
        self.routes: tuple[Route, ...] = tuple(routes)
        self.strategy: Strategy = strategy
        self.retry = retry or RetryPolicy()
        self.fallback = fallback or FallbackRules()
        self.breaker = breaker or CircuitBreaker()
        self.clock = clock
        self.sleep = sleep
        self.async_sleep = async_sleep
        self.health: tuple[RouteHealth, ...] = tuple(RouteHealth(self.breaker, clock) for _ in self.routes)
        self.last_receipt: Receipt | None = None
        self._listeners: list[ReceiptListener] = []
        self._lock = threading.Lock()
        self._capabilities: dict[int, Capabilities] = {}
        self._catalog_tried = False
        for gateway in self._gateways():  # how each attempt's receipt reaches the router (once per engine)
            gateway.engine.remove_listener(collect_receipt)
            gateway.engine.add_listener(collect_receipt)

    # --- what SDKs need --------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The ``base_url`` to give an SDK together with one of this router's clients."""
        return ROUTER_BASE_URL

    @property
    def api_key(self) -> str:
        """A placeholder for SDKs that insist on a key: each route puts its own gateway's key on the wire."""
        return PLACEHOLDER_API_KEY

    def _gateways(self) -> list[Gateway]:
        return list({id(r.gateway): r.gateway for r in self.routes}.values())

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` for ``openai.OpenAI(base_url=router.base_url, http_client=...)`` and the frameworks."""
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        kwargs.setdefault("follow_redirects", True)
        limits = kwargs.pop("limits", default_limits())
        paying = {id(g): PaymentTransport(g.engine, httpx.HTTPTransport(limits=limits)) for g in self._gateways()}
        transport = RouterTransport(self, [paying[id(r.gateway)] for r in self.routes])
        return httpx.Client(transport=transport, **kwargs)

    def async_http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for ``openai.AsyncOpenAI`` and async frameworks."""
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        kwargs.setdefault("follow_redirects", True)
        limits = kwargs.pop("limits", default_limits())
        paying = {
            id(g): AsyncPaymentTransport(g.engine, httpx.AsyncHTTPTransport(limits=limits)) for g in self._gateways()
        }
        transport = AsyncRouterTransport(self, [paying[id(r.gateway)] for r in self.routes])
        return httpx.AsyncClient(transport=transport, **kwargs)

    # --- facts -----------------------------------------------------------------------------------------------------
    def load_prices(self, timeout: float = 10.0) -> None:
        """Load every gateway's ``/models``: prices and context lengths into its catalog (`Gateway.load_prices`),
        and the tool/vision facts the listing states."""
        for gateway in self._gateways():
            gateway.load_prices(timeout)
            key = gateway.engine.config.api_key or (gateway.api_key if gateway.api_key != PLACEHOLDER_API_KEY else None)
            headers = {"authorization": f"Bearer {key}"} if key else {}
            response = httpx.get(f"{gateway.base_url}/models", headers=headers, timeout=timeout)
            response.raise_for_status()
            listed = capabilities_from_listing(response.content)
            for index, route in enumerate(self.routes):
                if route.gateway is gateway:
                    self._capabilities[index] = lookup_capabilities(listed, route.model)
        self._catalog_tried = True

    def wants_catalog(self, body: bytes) -> bool:
        """Whether this call ranks by price and the catalog was never loaded (then it is, once, before ranking)."""
        if self._catalog_tried or all(self.facts(i).price is not None for i in range(len(self.routes))):
            return False
        if self.strategy == "cheapest":
            return True
        try:
            data = json.loads(body) if body else None
        except ValueError:
            return False
        return isinstance(data, dict) and data.get("model") == AUTO

    def ensure_catalog(self) -> None:
        """`load_prices` once; a gateway that cannot list its models is ranked without prices (logged)."""
        with self._lock:
            if self._catalog_tried:
                return
            self._catalog_tried = True
        try:
            self.load_prices()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("llm402 router: cannot load the model catalog (%s); ranking without prices", exc)

    def facts(self, index: int) -> RouteFacts:
        """Route ``index``'s facts: stated on the route, else from its gateway's catalog, else unknown (``None``)."""
        route = self.routes[index]
        price = route.gateway.prices.lookup(route.model)
        listed = self._capabilities.get(index, Capabilities())
        return RouteFacts(
            tools=route.tools if route.tools is not None else listed.tools,
            vision=route.vision if route.vision is not None else listed.vision,
            context_length=route.context_length or (price.context_length if price else None),
            price=price,
        )

    def estimate(self, index: int, body: Mapping[str, Any] | None) -> int:
        """What the core would reserve for ``body`` on route ``index`` (micro-USDC; 0 when unpriced)."""
        return estimate_cost(self.facts(index).price, body)

    def remaining(self, index: int) -> int | None:
        """What every cap of route ``index``'s gateway still admits today (``None``: no cap)."""
        gateway = self.routes[index].gateway
        config = gateway.engine.config
        day = datetime.fromtimestamp(config.clock(), UTC).date().isoformat()
        left: int | None = gateway.engine.perform(Remaining(gateway.agent, day, config.caps()))
        return left

    def rank(self, body: Mapping[str, Any] | None, asked: str | None) -> list[int]:
        """The routes to try for a request, best first.

        Routes known to lack a needed capability (tools, images) are left out. ``"auto"`` or the cheapest strategy:
        routes sure to fit before unsure ones, within the budget before over it, priced before unpriced, then by
        estimated cost. Otherwise the configured order, with a route named by the caller (its name or model) first.
        In both, a route whose known context length is below the request's token bound goes last.
        """
        needs = Needs.of(body)
        facts = [self.facts(i) for i in range(len(self.routes))]
        fits = [i for i, f in enumerate(facts) if not needs.excludes(f)]
        if asked == AUTO or self.strategy == "cheapest":
            left: dict[int, int | None] = {}
            for i in fits:  # one ledger query per gateway
                key = id(self.routes[i].gateway)
                if key not in left:
                    left[key] = self.remaining(i)
            estimates = {i: estimate_cost(facts[i].price, body) for i in fits}

            def by_price(i: int) -> tuple[bool, bool, bool, bool, int, int]:
                budget = left[id(self.routes[i].gateway)]
                over = budget is not None and estimates[i] > budget
                f = facts[i]
                return (needs.too_long(f), needs.unsure(f), over, f.price is None, estimates[i], i)

            return sorted(fits, key=by_price)
        named = {i for i in fits if asked is not None and asked in (self.routes[i].name, self.routes[i].model)}
        return sorted(fits, key=lambda i: (needs.too_long(facts[i]), i not in named, i))

    # --- receipts --------------------------------------------------------------------------------------------------
    def publish(self, receipt: Receipt) -> None:
        """Make ``receipt`` the last one and hand it to the listeners (a listener's error never breaks a call)."""
        self.last_receipt = receipt
        current_receipt.set(receipt)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(receipt)
            except Exception:
                log.exception("llm402 router receipt listener failed")

    def on_receipt(self, listener: ReceiptListener) -> None:
        """Call ``listener`` with each router receipt (one per logical call, every attempt listed)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: ReceiptListener) -> None:
        """Stop calling ``listener``."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def receipts(self, since: float | None = None) -> list[Receipt]:
        """The attempts' receipts from every route's ledger (each ledger once), oldest first."""
        ledgers = {id(g.ledger): g.ledger for g in self._gateways()}
        found = [r for ledger in ledgers.values() for r in ledger.receipts(since)]
        return sorted(found, key=lambda r: r.started_at)

    def status(self) -> list[dict[str, Any]]:
        """Each route's circuit state and Retry-After hold, for dashboards and tests."""
        return [
            {"route": r.name, "state": h.state, "held_for": round(h.held_for(), 3)}
            for r, h in zip(self.routes, self.health, strict=True)
        ]

    def __repr__(self) -> str:
        return f"Router({[r.name for r in self.routes]!r}, strategy={self.strategy!r})"
