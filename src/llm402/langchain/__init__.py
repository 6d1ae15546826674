"""LangChain adapter: `ChatGateway`, a chat model paid per call through llm402, and its cost callback.

``from llm402.langchain import ChatGateway, get_gateway_cost_callback``. Needs ``pip install 'llm402[langchain]'``.
"""

from __future__ import annotations

from .callbacks import CostTotals, GatewayCostCallbackHandler, get_gateway_cost_callback
from .chat_models import ChatGateway
from .errors import (
    PAYMENT_ERRORS,
    GatewayBudgetExceeded,
    GatewayInsecureGateway,
    GatewayInsufficientCredits,
    GatewayIntentNotAllowed,
    GatewayMalformedPaymentRequired,
    GatewayModelNotAllowed,
    GatewayPaymentError,
    GatewayPaymentOutcomeUnknown,
    GatewayPaymentRejected,
    GatewayPolicyRefusal,
    GatewaySignerError,
)

__all__ = [
    "PAYMENT_ERRORS",
    "ChatGateway",
    "CostTotals",
    "GatewayBudgetExceeded",
    "GatewayCostCallbackHandler",
    "GatewayInsecureGateway",
    "GatewayInsufficientCredits",
    "GatewayIntentNotAllowed",
    "GatewayMalformedPaymentRequired",
    "GatewayModelNotAllowed",
    "GatewayPaymentError",
    "GatewayPaymentOutcomeUnknown",
    "GatewayPaymentRejected",
    "GatewayPolicyRefusal",
    "GatewaySignerError",
    "get_gateway_cost_callback",
]
