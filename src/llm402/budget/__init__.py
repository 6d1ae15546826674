"""The budget guard's memory: the `Ledger` protocol and its backends behind URLs.

``memory://`` (one process), ``sqlite:///path`` (the default, many processes on one machine),
``redis://host:port/db`` and ``postgresql://user@host:port/dbname`` (many machines). Every backend reserves in one
atomic check-and-reserve, so committed plus reserved never exceeds a cap, whatever the number of threads, tasks,
processes or machines. docs/ledgers.md says what each backend survives.
"""

from __future__ import annotations

from .base import Caps, Hold, Ledger, LedgerTotals, cap_refusal
from .memory import MemoryLedger
from .urls import default_ledger_url, open_ledger

__all__ = [
    "Caps",
    "Hold",
    "Ledger",
    "LedgerTotals",
    "MemoryLedger",
    "cap_refusal",
    "default_ledger_url",
    "open_ledger",
]
