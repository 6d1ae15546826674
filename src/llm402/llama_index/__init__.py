"""The LlamaIndex adapter: `GatewayLLM` (an `OpenAILike` with a paid gateway's defaults) and cost events.

A plain ``OpenAILike(..., http_client=gw.http_client(), async_http_client=gw.async_http_client())`` pays through
llm402 too; `GatewayLLM` adds payment-safe retries, usage on streams, cost in ``additional_kwargs`` and
`GatewayPaymentEvent`s, which `GatewayCostHandler` adds up.
"""

from __future__ import annotations

from .base import GatewayLLM, cost_fields
from .events import GatewayCostHandler, GatewayPaymentEvent, track_gateway_costs

__all__ = ["GatewayCostHandler", "GatewayLLM", "GatewayPaymentEvent", "cost_fields", "track_gateway_costs"]
