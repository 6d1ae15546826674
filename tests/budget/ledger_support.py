"""Helpers of the ledger tests: a hand-moved clock, and the code spawned child processes run (a plain module, so
``spawn`` can import it in the child)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from llm402.budget import Caps, Hold, open_ledger
from llm402.errors import BudgetExceeded

SHARED = ("sqlite", "redis", "postgres")
"""The backends other processes can open too (one file or one server)."""
T0 = 1_700_000_000.0
"""2023-11-14 22:13:20 UTC."""


def with_query(url: str, **options: str) -> str:
    """``url`` with query options added (a server URL may already carry some, e.g. ``?host=/socket/dir``)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, urlencode(options)]))))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reserve_many(url: str, prefix: str, threads: int, attempts: int, amount: int, cap: int, day: str) -> int:
    """``threads`` threads sharing one ledger each try ``attempts`` reservations; returns how many succeeded."""
    ledger = open_ledger(url)
    caps = Caps(daily=cap, total=cap, global_=cap)
    start = threading.Barrier(threads)
    won = [0] * threads

    def run(index: int) -> None:
        start.wait()
        for attempt in range(attempts):
            hold = Hold(f"{prefix}-{index}-{attempt}", "agent", day, amount, time.time() + 900)
            try:
                ledger.reserve(hold, caps)
            except BudgetExceeded:
                continue
            won[index] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ledger.close()
    return sum(won)


def reserve_then_hang(url: str, call_id: str, day: str, amount: int, expose: bool, ready: Any) -> None:
    """Reserve (and maybe sign), tell the parent, then wait to be SIGKILLed between reserve and settle."""
    ledger = open_ledger(url)
    ledger.reserve(Hold(call_id, "crasher", day, amount, time.time() + 900), Caps(daily=1_000_000))
    if expose:
        ledger.expose(call_id, amount, time.time() + 60)
    ready.set()
    time.sleep(120)


def reserve_until_killed(url: str, day: str, amount: int, threads: int, report: Any) -> None:
    """``threads`` threads reserve (and settle every other call at its full amount) until the process is SIGKILLed;
    each reservation is reported through ``report`` (a pipe end) only after `reserve` returned."""
    ledger = open_ledger(url)
    lock = threading.Lock()

    def work(index: int) -> None:
        for n in range(1_000_000):
            call_id = f"{os.getpid()}-{index}-{n}"
            ledger.reserve(Hold(call_id, "killed", day, amount, time.time() + 900), Caps(daily=10**15))
            with lock:
                report.send(call_id)
            if n % 2:
                ledger.settle(call_id, amount, None)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(600)
