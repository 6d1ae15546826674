"""The ledger contract shared by every backend."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from ..errors import BudgetExceeded, ConfigurationError
from ..money import format_usd
from ..receipts import PaymentRecord, Receipt

DEFAULT_RESERVATION_TTL = 900.0
"""Seconds after which a reservation whose process vanished is resolved by `Ledger.recover`."""
TOPUP_SUFFIX = "#topup"
"""Credit top-ups are booked under ``<agent>#topup``: their own daily limit, apart from what calls consume, and
outside the global (consumption) sums, so prepaid credit is not counted twice."""


def topup_agent(agent: str) -> str:
    """The ledger account of an agent's credit top-ups."""
    return agent + TOPUP_SUFFIX


def counts_globally(agent: str) -> bool:
    """Whether an account's spend counts toward the global cap (consumption does; top-ups do not)."""
    return not agent.endswith(TOPUP_SUFFIX)


def ledger_agent(receipt: Receipt) -> str:
    """The account a receipt's cost is booked under."""
    payment = receipt.payment
    return topup_agent(receipt.agent) if payment is not None and payment.kind == "topup" else receipt.agent


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

    def settle(self, call_id: str, actual: int, receipt: Receipt | None, outstanding: int | None = None) -> None:
        """Replace the reservation by ``actual`` committed spend and store the receipt. A settlement whose
        reservation is already gone (swept) is still committed, to the receipt's account and day.

        A signed payment that did not settle (``actual`` below the exposure) keeps the difference reserved until the
        authorization's ``valid_before``. ``outstanding`` says how much of that difference can still move when the
        caller knows better (an upto authorization reported settled is consumed: ``0``); never more than the
        difference.
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

    def spend_report(self, by: str, since: float | None = None) -> list[dict[str, Any]]:
        """Receipts since ``since`` grouped by ``by`` (one of `SPEND_GROUPS`), ordered by `order_spend`."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


SPEND_GROUPS = ("agent", "intent", "model", "day")
"""What `Ledger.spend_report` can group by; ``day`` is the UTC date of a receipt's ``started_at``."""


def dangling_amount(exposure: int, actual: int, outstanding: int | None) -> int:
    """What stays reserved after settling ``actual`` against ``exposure``: the unsettled remainder, or less when the
    caller says only ``outstanding`` of it can still move (never negative)."""
    left = exposure - actual
    if outstanding is not None:
        left = min(left, outstanding)
    return max(0, left)


def receipt_day(started_at: float) -> str:
    """The UTC day of a timestamp, as the call flow names budget days."""
    return datetime.fromtimestamp(started_at, UTC).date().isoformat()


def check_spend_group(by: str) -> str:
    """Validate a `spend_report` grouping (it names a column in the SQL backend, so it is never passed through)."""
    if by not in SPEND_GROUPS:
        raise ConfigurationError(f"cannot group spend by {by!r}; use one of {', '.join(SPEND_GROUPS)}")
    return by


def order_spend(rows: Iterable[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """One order for every backend: days chronologically, other groups by cost (highest first), then by key."""

    def key_order(row: dict[str, Any]) -> tuple[bool, str]:
        return (row["key"] is not None, str(row["key"] or ""))

    if by == "day":
        return sorted(rows, key=key_order)
    return sorted(sorted(rows, key=key_order), key=lambda row: -int(row["cost"]))


def sql_spend_row(row: Sequence[Any]) -> dict[str, Any]:
    """One row of a SQL spend report (key, calls, cost, saved, prompt and completion tokens) as a report row."""
    key, calls, cost, saved, prompt, completion = row
    return {
        "key": key,
        "calls": int(calls),
        "cost": int(cost),
        "saved": int(saved),
        "prompt_tokens": int(prompt),
        "completion_tokens": int(completion),
    }


def spend_rows(receipts: Iterable[Receipt | Mapping[str, Any]], by: str) -> list[dict[str, Any]]:
    """Group receipts in Python (the memory and Redis backends; SQLite groups in SQL).

    Items may be `Receipt`s or their stored JSON documents, so a backend can report without rebuilding receipts.
    """
    check_spend_group(by)
    groups: dict[str | None, dict[str, Any]] = {}
    for item in receipts:
        doc: Mapping[str, Any] = item if isinstance(item, Mapping) else _SpendView(item)
        key = receipt_day(doc["started_at"]) if by == "day" else doc[by]
        if by == "agent" and _is_topup(doc.get("payment")):
            key = topup_agent(str(key))  # top-ups are reported in their own account, apart from consumption
        row = groups.setdefault(
            key, {"key": key, "calls": 0, "cost": 0, "saved": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )
        row["calls"] += 1
        row["cost"] += int(doc["cost"])
        row["saved"] += int(doc.get("saved") or 0)
        row["prompt_tokens"] += int(doc["prompt_tokens"])
        row["completion_tokens"] += int(doc["completion_tokens"])
    return order_spend(groups.values(), by)


def _is_topup(payment: Any) -> bool:
    kind = payment.get("kind") if isinstance(payment, Mapping) else getattr(payment, "kind", None)
    return kind == "topup"


class _SpendView(Mapping[str, Any]):
    """A receipt read like its JSON document (only the fields the report needs)."""

    __slots__ = ("_receipt",)

    def __init__(self, receipt: Receipt) -> None:
        self._receipt = receipt

    def __getitem__(self, name: str) -> Any:
        return getattr(self._receipt, name)

    def __iter__(self) -> Iterator[str]:
        return iter(_RECEIPT_NAMES)

    def __len__(self) -> int:
        return len(_RECEIPT_NAMES)


_RECEIPT_NAMES = tuple(f.name for f in fields(Receipt))
_PAYMENT_NAMES = tuple(f.name for f in fields(PaymentRecord))
_RECEIPT_FIELDS = frozenset(_RECEIPT_NAMES)
_PAYMENT_FIELDS = frozenset(_PAYMENT_NAMES)


def receipt_to_json(receipt: Receipt) -> str:
    """A receipt as compact JSON, the same document as ``json.dumps(receipt.to_dict())``.

    Built field by field rather than with ``to_dict`` (``dataclasses.asdict`` deep-copies and cost about as much as
    the SQLite write itself); ``default=str`` so an odd value in an attempt's details cannot fail a paid call.
    """
    data = {name: getattr(receipt, name) for name in _RECEIPT_NAMES}
    if receipt.payment is not None:
        data["payment"] = {name: getattr(receipt.payment, name) for name in _PAYMENT_NAMES}
    return json.dumps(data, separators=(",", ":"), default=str)


def receipt_from_json(text: str | bytes) -> Receipt:
    """Rebuild a stored receipt; fields unknown to this version (written by a newer one) are ignored."""
    data: dict[str, Any] = {k: v for k, v in json.loads(text).items() if k in _RECEIPT_FIELDS}
    payment = data.get("payment")
    if isinstance(payment, dict):
        data["payment"] = PaymentRecord(**{k: v for k, v in payment.items() if k in _PAYMENT_FIELDS})
    data["attempts"] = tuple(data.get("attempts") or ())
    return Receipt(**data)
