"""`get_gateway_cost_callback()`: what the `ChatGateway` calls in a block cost, per model and per agent.

In the style of ``langchain_core.callbacks.get_usage_metadata_callback``::

    with get_gateway_cost_callback() as cb:
        chain.invoke(...)
        await chain.ainvoke(...)
    print(cb.total_cost_usd, cb.by_model["sandbox/small"].cost, cb.by_agent["judge"].calls)

Money is summed in integer micro-USDC (``cost``); ``cost_usd`` is the exact ``Decimal`` view. The handler reads what
`ChatGateway` puts on each answer (``response_metadata["cost"]``, exactly once per call, streamed or not), and the
receipts a failed call carries on its exception, so a call that was paid and then failed still counts. Cache hits
cost nothing and are not counted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tracers.context import register_configure_hook

from ..money import atomic_to_usd, format_usd, usd_to_atomic
from ..receipts import Receipt
from .errors import GatewayInsufficientCredits, GatewayPaymentError

UNKNOWN = "unknown"


@dataclass(slots=True)
class CostTotals:
    """Calls, cost (micro-USDC) and tokens, summed."""

    calls: int = 0
    failed_calls: int = 0
    cost: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0

    @property
    def cost_usd(self) -> Decimal:
        """The cost in USD, exact."""
        return atomic_to_usd(self.cost)

    def add(self, *, cost: int, input_tokens: int, output_tokens: int, total_tokens: int, failed: bool) -> None:
        """Count one call."""
        self.calls += 1
        self.failed_calls += int(failed)
        self.cost += cost
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.total_tokens += total_tokens


@dataclass(frozen=True, slots=True)
class _Call:
    model: str
    agent: str
    cost: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    failed: bool


class GatewayCostCallbackHandler(BaseCallbackHandler):
    """Sums the cost and tokens of `ChatGateway` calls: ``total``, ``by_model`` and ``by_agent``.

    Thread-safe; pass it in ``config={"callbacks": [handler]}`` or use `get_gateway_cost_callback`.
    """

    def __init__(self, parent: GatewayCostCallbackHandler | None = None) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._parent = parent
        self.total = CostTotals()
        self.by_model: dict[str, CostTotals] = {}
        self.by_agent: dict[str, CostTotals] = {}

    @property
    def total_cost(self) -> int:
        """Total cost in micro-USDC."""
        return self.total.cost

    @property
    def total_cost_usd(self) -> Decimal:
        """Total cost in USD, exact."""
        return self.total.cost_usd

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        """Count each `ChatGateway` answer (its cost is on exactly one message per call)."""
        for generations in response.generations:
            for generation in generations:
                if isinstance(generation, ChatGeneration) and isinstance(generation.message, AIMessage):
                    call = _call_from_message(generation.message)
                    if call is not None:
                        self._count(call)

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """Count what a failed call cost (a refusal costs nothing; a paid call that then failed does)."""
        receipts: Sequence[Receipt] = (
            error.receipts
            if isinstance(error, GatewayPaymentError | GatewayInsufficientCredits)
            else getattr(error, "llm402_receipts", ())
        )
        if receipts:
            last = receipts[-1]
            self._count(
                _Call(
                    model=last.model or UNKNOWN,
                    agent=last.agent,
                    cost=sum(r.cost for r in receipts),
                    input_tokens=sum(r.prompt_tokens for r in receipts),
                    output_tokens=sum(r.completion_tokens for r in receipts),
                    total_tokens=sum(r.total_tokens for r in receipts),
                    failed=True,
                )
            )

    def _count(self, call: _Call) -> None:
        with self._lock:
            buckets = (
                self.total,
                self.by_model.setdefault(call.model, CostTotals()),
                self.by_agent.setdefault(call.agent, CostTotals()),
            )
            for bucket in buckets:
                bucket.add(
                    cost=call.cost,
                    input_tokens=call.input_tokens,
                    output_tokens=call.output_tokens,
                    total_tokens=call.total_tokens,
                    failed=call.failed,
                )
        if self._parent is not None:
            self._parent._count(call)

    def __repr__(self) -> str:
        return (
            f"GatewayCostCallbackHandler(calls={self.total.calls}, cost={format_usd(self.total.cost)}, "
            f"tokens={self.total.total_tokens}, models={sorted(self.by_model)}, agents={sorted(self.by_agent)})"
        )


def _call_from_message(message: AIMessage) -> _Call | None:
    metadata = message.response_metadata
    info = metadata.get("llm402")
    cost = metadata.get("cost")
    if not isinstance(info, Mapping) or not isinstance(cost, str):
        return None  # not a ChatGateway answer
    usage = message.usage_metadata
    if usage is not None and "total_cost" in usage:
        return None  # LangChain marks cache hits with total_cost=0: nothing went to the gateway
    return _Call(
        model=str(metadata.get("model_name") or UNKNOWN),
        agent=str(info.get("agent") or UNKNOWN),
        cost=usd_to_atomic(cost),
        input_tokens=usage["input_tokens"] if usage else 0,
        output_tokens=usage["output_tokens"] if usage else 0,
        total_tokens=usage["total_tokens"] if usage else 0,
        failed=False,
    )


_cost_callback: ContextVar[GatewayCostCallbackHandler | None] = ContextVar("llm402_cost_callback", default=None)
register_configure_hook(_cost_callback, inheritable=True)


@contextmanager
def get_gateway_cost_callback() -> Iterator[GatewayCostCallbackHandler]:
    """Count the cost of every `ChatGateway` call in the block (nested blocks count into their parents too)."""
    handler = GatewayCostCallbackHandler(parent=_cost_callback.get())
    token = _cost_callback.set(handler)
    try:
        yield handler
    finally:
        _cost_callback.reset(token)
