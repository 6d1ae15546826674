"""Approaching-limit alerts: once a cap's use crosses a threshold (``Policy(alert_at=...)``), tell listeners, log a
warning and optionally post to a webhook, once per cap, threshold and period, across every process sharing a ledger.

"Once" is claimed in the ledger itself: an alert reserves nothing under an id naming the cap, threshold and period,
and every backend refuses a second reservation with that id (`ReservationHeld`), so two processes crossing 80% at
the same moment fire one alert between them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from .budget.base import Caps, Hold, Ledger, LedgerTotals
from .errors import ReservationHeld
from .money import format_usd

log = logging.getLogger("llm402")
TOTAL_PERIOD = "all-time"
_CLAIM_SECONDS_TOTAL = 10 * 365 * 86_400.0


@dataclass(frozen=True, slots=True)
class BudgetAlert:
    """A cap's use crossed ``threshold`` (a fraction: 0.8 is 80%). Amounts in micro-USDC."""

    agent: str
    cap: str
    """``daily``, ``total`` or ``global``."""
    threshold: Decimal
    limit: int
    used: int
    """Spent plus reserved when the alert fired."""
    period: str
    """The UTC day for the daily cap, ``all-time`` otherwise."""

    def message(self) -> str:
        """One line for a log or a chat message."""
        share = (Decimal(self.used) / Decimal(self.limit) * 100) if self.limit else Decimal(100)
        return (
            f"llm402: agent {self.agent!r} has used {format_usd(self.used)} of its {self.cap} cap of "
            f"{format_usd(self.limit)} ({share:.0f}%, alert at {self.threshold * 100:.0f}%, {self.period})"
        )

    def to_json(self) -> str:
        """The webhook's body."""
        data = asdict(self)
        data["threshold"] = str(self.threshold)
        return json.dumps({"type": "llm402.budget_alert", **data, "message": self.message()})


AlertListener = Callable[[BudgetAlert], None]


def crossed(
    agent: str, day: str, caps: Caps, totals: LedgerTotals, thresholds: tuple[Decimal, ...]
) -> Iterator[BudgetAlert]:
    """Every (cap, threshold) whose use is at or above the threshold (pure)."""
    for cap, limit, used, period in (
        ("daily", caps.daily, totals.day_spent + totals.day_reserved, day),
        ("total", caps.total, totals.agent_spent + totals.agent_reserved, TOTAL_PERIOD),
        ("global", caps.global_, totals.global_spent + totals.global_reserved, TOTAL_PERIOD),
    ):
        if limit is None:
            continue
        for threshold in thresholds:
            if used >= threshold * limit:
                yield BudgetAlert(agent, cap, threshold, limit, used, period)


def claim(ledger: Ledger, alert: BudgetAlert, now: float) -> bool:
    """Whether this process is the first to fire ``alert`` (a zero reservation under the alert's id)."""
    scope = "*" if alert.cap == "global" else alert.agent
    alert_id = f"alert:{alert.cap}:{alert.threshold}:{alert.period}:{scope}"
    if alert.period == TOTAL_PERIOD:
        expires = now + _CLAIM_SECONDS_TOTAL
    else:
        day_end = datetime.fromisoformat(alert.period).replace(tzinfo=UTC) + timedelta(days=2)
        expires = day_end.timestamp()
    try:
        ledger.reserve(Hold(alert_id, "", "", 0, expires), Caps())
    except ReservationHeld:
        return False
    return True


def post_webhook(url: str, alert: BudgetAlert, timeout: float = 5.0) -> None:
    """POST the alert as JSON from a background thread (a slow webhook never delays a call)."""

    def send() -> None:
        import httpx

        try:
            httpx.post(url, content=alert.to_json(), headers={"content-type": "application/json"}, timeout=timeout)
        except httpx.HTTPError as exc:
            log.warning("llm402: the budget alert webhook failed: %s", type(exc).__name__)

    threading.Thread(target=send, name="llm402-alert").start()  # not a daemon: delivered even at exit
