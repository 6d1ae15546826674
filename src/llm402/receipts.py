"""One `Receipt` per call: what was asked, what was paid, what it cost. Never prompt or completion text."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from .money import atomic_to_usd


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
