"""`MemoryLedger`: one process, a lock, dictionaries. The reference semantics for the other backends."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, ReservationHeld
from ..receipts import Receipt
from .base import (
    Caps,
    Hold,
    LedgerTotals,
    cap_refusal,
    check_spend_group,
    counts_globally,
    dangling_amount,
    ledger_agent,
    receipt_day,
    spend_rows,
)

HELD, EXPOSED, DANGLING = "held", "exposed", "dangling"


@dataclass(slots=True)
class _Reservation:
    agent: str
    day: str
    amount: int
    expires_at: float
    state: str = HELD
    exposure: int = 0


class MemoryLedger:
    """In-process ledger (``memory://``). Thread-safe; not shared between processes."""

    def __init__(self, clock: object = time.time, max_receipts: int = 10_000) -> None:
        """``max_receipts`` bounds the receipts kept (the oldest go first): spent totals are counters and stay
        exact, but a long-running process must not grow without bound."""
        self._lock = threading.Lock()
        self._clock = clock
        self._open: dict[str, _Reservation] = {}
        self._spent_day: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._spent_agent: defaultdict[str, int] = defaultdict(int)
        self._spent_global = 0
        self._receipts: deque[Receipt] = deque(maxlen=max_receipts)
        self._next_expiry = math.inf
        """No open reservation expires before this (a lower bound: a reservation can only be extended)."""

    # all helpers below run under self._lock
    def _sweep(self, now: float) -> int:
        resolved = 0
        next_expiry = math.inf
        for call_id, res in list(self._open.items()):
            if res.expires_at > now:
                next_expiry = min(next_expiry, res.expires_at)
                continue
            if res.state == EXPOSED:
                self._commit(res.agent, res.day, res.exposure)
            del self._open[call_id]
            resolved += 1
        self._next_expiry = next_expiry
        return resolved

    def _commit(self, agent: str, day: str, amount: int) -> None:
        self._spent_day[(agent, day)] += amount
        self._spent_agent[agent] += amount
        if counts_globally(agent):
            self._spent_global += amount

    def _reserved(self, agent: str, day: str) -> tuple[int, int, int]:
        day_r = agent_r = global_r = 0
        for res in self._open.values():
            if counts_globally(res.agent):
                global_r += res.amount
            if res.agent == agent:
                agent_r += res.amount
                if res.day == day:
                    day_r += res.amount
        return day_r, agent_r, global_r

    def _check(self, agent: str, day: str, extra: int, caps: Caps) -> None:
        day_r, agent_r, global_r = self._reserved(agent, day)
        checks = (
            ("daily", caps.daily, self._spent_day[(agent, day)], day_r),
            ("total", caps.total, self._spent_agent[agent], agent_r),
            ("global", caps.global_, self._spent_global, global_r),
        )
        for name, cap, spent, reserved in checks:
            if cap is not None and spent + reserved + extra > cap:
                raise cap_refusal(name, cap, spent, reserved, extra)

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    def reserve(self, hold: Hold, caps: Caps) -> None:
        """Check and reserve under one lock."""
        if hold.amount < 0:
            raise ConfigurationError("a reservation cannot be negative")
        with self._lock:
            now = self._now()
            if now >= self._next_expiry:  # something may have expired: resolve it before counting
                self._sweep(now)
            if hold.call_id in self._open:
                raise ReservationHeld(f"call {hold.call_id} already holds a reservation")
            self._check(hold.agent, hold.day, hold.amount, caps)
            self._open[hold.call_id] = _Reservation(hold.agent, hold.day, hold.amount, hold.expires_at)
            self._next_expiry = min(self._next_expiry, hold.expires_at)

    def grow(self, call_id: str, amount: int, caps: Caps) -> None:
        """Raise a reservation under the caps."""
        with self._lock:
            res = self._open[call_id]
            if amount <= res.amount:
                return
            self._check(res.agent, res.day, amount - res.amount, caps)
            res.amount = amount

    def expose(self, call_id: str, amount: int, valid_before: float) -> None:
        """Mark a signed payment as outstanding."""
        with self._lock:
            res = self._open[call_id]
            res.state = EXPOSED
            res.exposure = max(res.exposure, amount)
            res.amount = max(res.amount, amount)
            res.expires_at = max(res.expires_at, valid_before)

    def settle(self, call_id: str, actual: int, receipt: Receipt | None, outstanding: int | None = None) -> None:
        """Commit ``actual``; keep an unsettled authorization's remainder until it expires."""
        with self._lock:
            res = self._open.pop(call_id, None)
            if res is not None:
                self._commit(res.agent, res.day, actual)
                left = dangling_amount(res.exposure, actual, outstanding)
                if res.state == EXPOSED and left > 0:
                    self._open[call_id] = _Reservation(res.agent, res.day, left, res.expires_at, DANGLING)
            elif receipt is not None:  # swept while the call ran: what it cost is still spent
                self._commit(ledger_agent(receipt), receipt_day(receipt.started_at), actual)
            if receipt is not None:
                self._receipts.append(receipt)

    def record(self, receipt: Receipt) -> None:
        """Store a receipt."""
        with self._lock:
            self._receipts.append(receipt)

    def recover(self, now: float) -> int:
        """Resolve expired reservations."""
        with self._lock:
            return self._sweep(now)

    def totals(self, agent: str, day: str) -> LedgerTotals:
        """Current sums."""
        with self._lock:
            day_r, agent_r, global_r = self._reserved(agent, day)
            return LedgerTotals(
                self._spent_day[(agent, day)],
                day_r,
                self._spent_agent[agent],
                agent_r,
                self._spent_global,
                global_r,
            )

    def receipts(self, since: float | None = None) -> Sequence[Receipt]:
        """Receipts, oldest first."""
        with self._lock:
            return [r for r in self._receipts if since is None or r.started_at >= since]

    def spend_report(self, by: str, since: float | None = None) -> list[dict[str, Any]]:
        """Receipts grouped by agent, intent, model or day."""
        return spend_rows(self.receipts(since), check_spend_group(by))

    def close(self) -> None:
        """Nothing to release."""
