"""Top-ups are booked in their own account on every backend: their own daily limit, outside the global
(consumption) sums, reported apart, and a single-flight id refused twice (`ReservationHeld`)."""

from __future__ import annotations

import time

import pytest

from llm402.budget.base import Caps, Hold, Ledger, receipt_day, topup_agent
from llm402.errors import ReservationHeld
from llm402.receipts import PaymentRecord, Receipt


def receipt(agent: str, cost: int, kind: str = "call") -> Receipt:
    payment = PaymentRecord("exact", "eip155:84532", "0xa", cost, "0xp", "0xq", None, True, kind=kind)
    return Receipt(
        call_id=f"{kind}-{cost}",
        agent=agent,
        intent=None,
        gateway="http://g",
        method="POST",
        path="/x",
        model=None,
        status=200,
        streamed=False,
        started_at=time.time(),
        latency_ms=1.0,
        cost=cost,
        payment=payment,
    )


def test_topups_are_apart_from_consumption(ledger: Ledger) -> None:
    day = receipt_day(time.time())
    now = time.time()
    ledger.reserve(Hold("topup:g:w", topup_agent("a"), day, 5, now + 60), Caps(daily=5))
    with pytest.raises(ReservationHeld):  # one top-up at a time per gateway and wallet
        ledger.reserve(Hold("topup:g:w", topup_agent("a"), day, 1, now + 60), Caps())
    ledger.settle("topup:g:w", 5, receipt("a", 5, "topup"))
    ledger.reserve(Hold("c1", "a", day, 3, now + 60), Caps(daily=3, global_=3))  # consumption caps see no top-up
    ledger.settle("c1", 3, receipt("a", 3))
    totals = ledger.totals("a", day)
    assert (totals.day_spent, totals.global_spent) == (3, 3)
    assert ledger.totals(topup_agent("a"), day).day_spent == 5
    rows = {row["key"]: row["cost"] for row in ledger.spend_report("agent")}
    assert rows == {"a": 3, topup_agent("a"): 5}
