"""The ledger contract shared by every backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import BudgetExceeded
from ..money import format_usd
from ..receipts import Receipt

DEFAULT_RESERVATION_TTL = 900.0
"""Seconds after which a reservation whose process vanished is resolved by `Ledger.recover`."""


@dataclass(frozen=True, slots=True)
class Caps:
    """The caps a reservation must fit under, in micro-USDC; ``None`` = no cap."""

    daily: int | None = None
    total: int | None = None
    global_: int | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    """A request to reserve ``amount`` for one call."""

    call_id: str
    agent: str
    day: str
    amount: int
    expires_at: float
    intent: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """Committed and reserved sums for one agent (on one day) and globally."""

    day_spent: int
    day_reserved: int
    agent_spent: int
    agent_reserved: int
    global_spent: int
    global_reserved: int


def cap_refusal(cap_name: str, cap: int, spent: int, reserved: int, requested: int) -> BudgetExceeded:
    """The refusal for a reservation that would exceed ``cap``."""
    return BudgetExceeded(
        f"{cap_name} cap of {format_usd(cap)} would be exceeded: spent {format_usd(spent)}, "
        f"reserved {format_usd(reserved)}, requested {format_usd(requested)}",
        cap_name=cap_name,
        cap=cap,
        spent=spent,
        reserved=reserved,
        requested=requested,
    )


@runtime_checkable
class Ledger(Protocol):
    """Reserve before the request leaves; reconcile to what was really charged afterwards.

    Lifecycle of one call: ``reserve`` -> (``grow`` when a 402 quotes more) -> (``expose`` once a payment is
    signed) -> ``settle``. A refused call only ``record``s its receipt.
    """

    def reserve(self, hold: Hold, caps: Caps) -> None:
        """Atomically check every cap and reserve; raise `BudgetExceeded` (nothing reserved) if one would break."""
        ...

    def grow(self, call_id: str, amount: int, caps: Caps) -> None:
        """Raise a reservation to ``amount`` (a 402 quoted more than the estimate), atomically under the caps."""
        ...

    def expose(self, call_id: str, amount: int, valid_before: float) -> None:
        """A payment of ``amount`` was signed for this call and is spendable by the payee until ``valid_before``."""
        ...

    def settle(self, call_id: str, actual: int, receipt: Receipt | None) -> None:
        """Replace the reservation by ``actual`` committed spend and store the receipt.

        A signed payment that did not settle (``actual`` below the exposure) keeps the difference reserved until the
        authorization's ``valid_before``.
        """
        ...

    def record(self, receipt: Receipt) -> None:
        """Store a receipt of a call that reserved nothing (refused before any traffic)."""
        ...

    def recover(self, now: float) -> int:
        """Resolve reservations past their expiry (crashed processes): signed ones are committed (they may have
        settled), the rest released; returns how many were resolved."""
        ...

    def totals(self, agent: str, day: str) -> LedgerTotals:
        """Spent and reserved for ``agent`` on ``day``, for the agent in total and globally."""
        ...

    def receipts(self, since: float | None = None) -> Sequence[Receipt]:
        """Stored receipts, oldest first."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
