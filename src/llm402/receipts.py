"""One `Receipt` per call: what was asked, what was paid, what it cost. Never prompt or completion text.

`receipt_view` (and `payment_view`) is the public JSON shape of a receipt: fixed field names, every amount twice (an
atomic integer, and a USD string with six decimals such as ``"0.010249"``), times as ISO 8601 UTC. The ``llm402``
command prints it, and the LlamaIndex adapter's payment dicts are built by it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .money import atomic_to_usd, format_usd


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """A payment made (or reused) for a call. Amounts in atomic units of ``asset``."""

    scheme: str
    network: str
    asset: str
    amount: int
    payer: str
    payee: str
    transaction: str | None = None
    settled: bool | None = None
    reused: bool = False
    kind: str = "call"  # "call" or "topup"
    settled_amount: int | None = None
    """What the settlement report says moved; for ``upto`` at most ``amount`` (the authorized ceiling)."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """The record of one call, success or failure."""

    call_id: str
    agent: str
    intent: str | None
    gateway: str
    method: str
    path: str
    model: str | None
    status: int | None
    streamed: bool
    started_at: float
    latency_ms: float
    cost: int = 0
    reserved: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    payment: PaymentRecord | None = None
    error: str | None = None
    route: str | None = None
    attempts: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    credits_remaining: str | None = None
    cache_hit: bool = False
    saved: int = 0

    @property
    def cost_usd(self) -> Decimal:
        """The cost in USD (display)."""
        return atomic_to_usd(self.cost)

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


current_receipt: ContextVar[Receipt | None] = ContextVar("llm402_current_receipt", default=None)
"""The receipt of the last call finished in this context (thread or task)."""


# --- the public view ---------------------------------------------------------------------------------------------

PAYMENT_VIEW_FIELDS = (
    "kind",
    "scheme",
    "network",
    "asset",
    "amount",
    "amount_usd",
    "settled_amount",
    "settled_amount_usd",
    "settled",
    "transaction",
    "payer",
    "payee",
    "reused",
)
"""The keys of `payment_view`, in order."""

RECEIPT_VIEW_FIELDS = (
    "call_id",
    "time",
    "started_at",
    "agent",
    "intent",
    "gateway",
    "method",
    "path",
    "model",
    "route",
    "status",
    "error",
    "streamed",
    "cache_hit",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "cost_usd",
    "reserved",
    "reserved_usd",
    "saved",
    "saved_usd",
    "credits_remaining",
    "payment",
    "attempts",
)
"""The keys of `receipt_view`, in order."""


def usd_string(atomic: int) -> str:
    """Micro-USDC as a USD string with six decimals and no currency sign: ``10249`` -> ``"0.010249"``."""
    return format_usd(atomic).replace("$", "", 1)


def iso_time(timestamp: float) -> str:
    """A Unix time as ISO 8601 UTC with milliseconds, e.g. ``"2025-03-01T12:00:00.250Z"``."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payment_view(payment: PaymentRecord) -> dict[str, Any]:
    """A payment as JSON: ``kind`` ("call" or "topup"), the x402 ``scheme``/``network``/``asset``, ``amount`` (for
    ``upto`` the authorized ceiling) and ``settled_amount`` (what the settlement report says moved; ``None`` when it
    named none) as atomic integers and ``*_usd`` strings, ``transaction``, ``payer``, ``payee``, ``settled``,
    ``reused``."""
    settled_amount = payment.settled_amount
    return {
        "kind": payment.kind,
        "scheme": payment.scheme,
        "network": payment.network,
        "asset": payment.asset,
        "amount": payment.amount,
        "amount_usd": usd_string(payment.amount),
        "settled_amount": settled_amount,
        "settled_amount_usd": None if settled_amount is None else usd_string(settled_amount),
        "settled": payment.settled,
        "transaction": payment.transaction,
        "payer": payment.payer,
        "payee": payment.payee,
        "reused": payment.reused,
    }


def receipt_view(receipt: Receipt) -> dict[str, Any]:
    """A receipt as JSON, with the keys of `RECEIPT_VIEW_FIELDS`: ``time`` (ISO 8601 UTC) beside ``started_at`` (Unix
    seconds), ``cost``/``reserved``/``saved`` as atomic integers beside ``*_usd`` strings with six decimals, and
    ``payment`` as `payment_view` (``None`` for a call that paid nothing itself)."""
    return {
        "call_id": receipt.call_id,
        "time": iso_time(receipt.started_at),
        "started_at": receipt.started_at,
        "agent": receipt.agent,
        "intent": receipt.intent,
        "gateway": receipt.gateway,
        "method": receipt.method,
        "path": receipt.path,
        "model": receipt.model,
        "route": receipt.route,
        "status": receipt.status,
        "error": receipt.error,
        "streamed": receipt.streamed,
        "cache_hit": receipt.cache_hit,
        "latency_ms": receipt.latency_ms,
        "prompt_tokens": receipt.prompt_tokens,
        "completion_tokens": receipt.completion_tokens,
        "total_tokens": receipt.total_tokens,
        "cost": receipt.cost,
        "cost_usd": usd_string(receipt.cost),
        "reserved": receipt.reserved,
        "reserved_usd": usd_string(receipt.reserved),
        "saved": receipt.saved,
        "saved_usd": usd_string(receipt.saved),
        "credits_remaining": receipt.credits_remaining,
        "payment": None if receipt.payment is None else payment_view(receipt.payment),
        "attempts": [dict(attempt) for attempt in receipt.attempts],
    }
