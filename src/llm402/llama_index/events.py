"""Gateway costs as LlamaIndex instrumentation: one `GatewayPaymentEvent` per metered call, and a handler that adds
them up.

Events are built from llm402 receipts, so they carry exactly what the ledger holds (integer micro-USDC, the payment
record) and never a prompt, a completion or a secret.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.instrumentation import (  # type: ignore[attr-defined]  # re-exported without __all__
    Dispatcher,
    get_dispatcher,
)
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent

from ..money import atomic_to_usd
from ..receipts import Receipt, payment_view


class GatewayPaymentEvent(BaseEvent):
    """A call through an llm402 gateway finished (paid, metered, refused or failed): its receipt, as an event."""

    call_id: str
    model: str | None = None
    agent: str
    intent: str | None = None
    gateway: str
    cost_micro_usdc: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    streamed: bool = False
    status: int | None = None
    error: str | None = None
    payment: dict[str, Any] | None = None

    @classmethod
    def class_name(cls) -> str:
        """The name LlamaIndex serializes this event under."""
        return "GatewayPaymentEvent"

    @classmethod
    def from_receipt(cls, receipt: Receipt) -> GatewayPaymentEvent:
        """The event for one llm402 receipt."""
        return cls(
            call_id=receipt.call_id,
            model=receipt.model,
            agent=receipt.agent,
            intent=receipt.intent,
            gateway=receipt.gateway,
            cost_micro_usdc=receipt.cost,
            prompt_tokens=receipt.prompt_tokens,
            completion_tokens=receipt.completion_tokens,
            streamed=receipt.streamed,
            status=receipt.status,
            error=receipt.error,
            payment=payment_view(receipt.payment) if receipt.payment is not None else None,
        )

    @property
    def cost(self) -> Decimal:
        """The cost in USD (display only; sum ``cost_micro_usdc``)."""
        return atomic_to_usd(self.cost_micro_usdc)


class GatewayCostHandler(BaseEventHandler):
    """Adds up `GatewayPaymentEvent`s in integer micro-USDC, per model and per agent. Thread-safe.

    ``get_dispatcher().add_event_handler(handler)`` (the root dispatcher sees every event), or
    ``with track_gateway_costs() as handler: ...``.
    """

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _by_model: Counter[str] = PrivateAttr(default_factory=Counter)
    _by_agent: Counter[str] = PrivateAttr(default_factory=Counter)
    _calls: int = PrivateAttr(default=0)
    _payments: int = PrivateAttr(default=0)
    _prompt_tokens: int = PrivateAttr(default=0)
    _completion_tokens: int = PrivateAttr(default=0)

    @classmethod
    def class_name(cls) -> str:
        """The handler's name."""
        return "GatewayCostHandler"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        """Count a `GatewayPaymentEvent`; ignore every other event."""
        if not isinstance(event, GatewayPaymentEvent):
            return
        with self._lock:
            self._by_model[event.model or "unknown"] += event.cost_micro_usdc
            self._by_agent[event.agent] += event.cost_micro_usdc
            self._calls += 1
            self._payments += event.payment is not None
            self._prompt_tokens += event.prompt_tokens
            self._completion_tokens += event.completion_tokens

    @property
    def total_micro_usdc(self) -> int:
        """Everything counted, in micro-USDC."""
        with self._lock:
            return sum(self._by_model.values())

    @property
    def total(self) -> Decimal:
        """Everything counted, in USD (display)."""
        return atomic_to_usd(self.total_micro_usdc)

    @property
    def by_model(self) -> dict[str, int]:
        """Micro-USDC per model."""
        with self._lock:
            return dict(self._by_model)

    @property
    def by_agent(self) -> dict[str, int]:
        """Micro-USDC per agent."""
        with self._lock:
            return dict(self._by_agent)

    @property
    def calls(self) -> int:
        """Calls counted (one per receipt: an SDK retry is a call of its own)."""
        with self._lock:
            return self._calls

    @property
    def payments(self) -> int:
        """Calls that carried a payment."""
        with self._lock:
            return self._payments

    @property
    def tokens(self) -> tuple[int, int]:
        """(prompt, completion) tokens counted."""
        with self._lock:
            return self._prompt_tokens, self._completion_tokens

    def reset(self) -> None:
        """Start again from zero."""
        with self._lock:
            self._by_model.clear()
            self._by_agent.clear()
            self._calls = self._payments = self._prompt_tokens = self._completion_tokens = 0


@contextmanager
def track_gateway_costs(dispatcher: Dispatcher | None = None) -> Iterator[GatewayCostHandler]:
    """A `GatewayCostHandler` attached to ``dispatcher`` (default: the root one) for the ``with`` block."""
    target = dispatcher if dispatcher is not None else get_dispatcher()
    handler = GatewayCostHandler()
    target.add_event_handler(handler)
    try:
        yield handler
    finally:
        target.event_handlers = [h for h in target.event_handlers if h is not handler]
