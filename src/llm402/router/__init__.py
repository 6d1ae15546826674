"""Payment-aware fallback routing: routes (gateway + model), retries, Retry-After, circuit breaking, cheapest-fit.

    from llm402.router import Route, Router

    router = Router([Route(gw_a, "sandbox/medium"), Route(gw_b, "sandbox/large")])
    client = openai.OpenAI(base_url=router.base_url, api_key=router.api_key, http_client=router.http_client())

The router is a transport above each gateway's paying transport: every attempt is a complete call of the core
(policy, reservation, one signature per 402, receipt), and the router only decides where the next attempt goes.

Where each decision lives: `rules` (values: `RetryPolicy`, `FallbackRules`, `CircuitBreaker`; `RouteHealth` holds
their per-route state), `routes` (`Route`, capability facts, what a request needs), `router` (`Router`: clients,
ranking, catalog, router receipts), `plan` (one call without I/O: admit, judge each outcome, the receipt), `flow`
(the decisions in order, without I/O: try this route, re-send, move on, wait for the next pass, hand over, give up),
`transport` (the sync and async httpx drivers of the flow: send, peek at the first chunk, read failures, sleep).
"""

from __future__ import annotations

from .plan import ROUTE_HEADER, CallPlan, Verdict
from .router import AUTO, ROUTER_BASE_URL, Router, Strategy
from .routes import Capabilities, Needs, Route, RouteFacts, capabilities_from_listing
from .rules import (
    DEFAULT_FALLBACK_STATUSES,
    Admission,
    CircuitBreaker,
    FallbackRules,
    RetryPolicy,
    RouteHealth,
    retry_after_seconds,
    wait_retry_after,
)
from .transport import AsyncRouterTransport, RouterTransport

__all__ = [
    "AUTO",
    "DEFAULT_FALLBACK_STATUSES",
    "ROUTER_BASE_URL",
    "ROUTE_HEADER",
    "Admission",
    "AsyncRouterTransport",
    "CallPlan",
    "Capabilities",
    "CircuitBreaker",
    "FallbackRules",
    "Needs",
    "RetryPolicy",
    "Route",
    "RouteFacts",
    "RouteHealth",
    "Router",
    "RouterTransport",
    "Strategy",
    "Verdict",
    "capabilities_from_listing",
    "retry_after_seconds",
    "wait_retry_after",
]
