"""llm402: pay-per-call LLM access for agent frameworks.

``from llm402 import Gateway, Wallet, Policy``. Names load on first use so ``import llm402`` stays cheap; the payment
stack (x402 SDK, eth-account) loads only when a payment is due.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .budget import Ledger, MemoryLedger, open_ledger
    from .errors import (
        BudgetExceeded,
        Llm402Error,
        PaymentRejected,
        PaymentRequiredError,
        PolicyRefusal,
        refusal_from_envelope,
    )
    from .gateway import Gateway
    from .policy import Policy
    from .pricing import ModelPrice, PriceCatalog
    from .receipts import Receipt, current_receipt
    from .router import Route, Router
    from .wallet import Signer, Wallet

_EXPORTS = {
    "Gateway": "gateway",
    "Router": "router",
    "Route": "router",
    "Wallet": "wallet",
    "Signer": "wallet",
    "Policy": "policy",
    "Receipt": "receipts",
    "current_receipt": "receipts",
    "Ledger": "budget",
    "MemoryLedger": "budget",
    "open_ledger": "budget",
    "ModelPrice": "pricing",
    "PriceCatalog": "pricing",
    "Llm402Error": "errors",
    "PaymentRequiredError": "errors",
    "PolicyRefusal": "errors",
    "BudgetExceeded": "errors",
    "PaymentRejected": "errors",
    "refusal_from_envelope": "errors",
}

__all__ = [
    "__version__",
    "Gateway",
    "Router",
    "Route",
    "Wallet",
    "Signer",
    "Policy",
    "Receipt",
    "current_receipt",
    "Ledger",
    "MemoryLedger",
    "open_ledger",
    "ModelPrice",
    "PriceCatalog",
    "Llm402Error",
    "PaymentRequiredError",
    "PolicyRefusal",
    "BudgetExceeded",
    "PaymentRejected",
    "refusal_from_envelope",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llm402' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
