"""Group commit: the money writes of concurrent threads share one transaction, hence one fsync (or one round trip).

A durable ledger pays for each write with a flush to disk (SQLite's ``synchronous=FULL``, PostgreSQL's WAL flush),
and on one machine that flush, not the SQL, bounds how many writes a second it takes. Threads that write at the same
time can share the flush without any of them returning early: each write is queued; one of the waiting threads (the
*leader*) runs every queued write in one transaction, each under its own savepoint so one failing write undoes only
itself, commits once, and hands every writer its own outcome. A writer returns only after the commit that holds its
write, so what a return promises (the reservation is on disk before the request leaves) is unchanged. Alone, a thread
leads a batch of one.

The leader runs one batch, then hands the lead to the oldest writer still queued (its own write is in the next batch),
so no thread serves the others for ever. This module knows nothing of SQL: a backend gives it the function that runs
a batch in one transaction.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import LedgerInterrupted

T = TypeVar("T")
"""What a backend queues for one write: a function of its connection (SQL) or a command to send (Redis)."""


@dataclass(slots=True)
class Outcome:
    """What one write of a batch came to: its value, or the exception it raised (its savepoint rolled back)."""

    value: Any = None
    error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


RunBatch = Callable[[Sequence[T]], list[Outcome]]
"""Runs writes in one transaction (or one round trip) and commits it: one `Outcome` per write, in order. Raises when
the batch as a whole fails (nothing committed); every write of the batch then gets that error."""


@dataclass(slots=True, eq=False)
class _Queued(Generic[T]):
    write: T
    done: threading.Event | None = None
    """Set when the write has its outcome or is handed the lead; only a writer that waits needs one."""
    outcome: Outcome | None = None
    lead: bool = False


class GroupCommit(Generic[T]):
    """Runs writes from many threads in shared transactions (see the module's docstring)."""

    def __init__(self, run_batch: RunBatch[T]) -> None:
        self._run_batch = run_batch
        self.batches = 0
        """Transactions run so far (writes / batches is the mean batch size)."""
        self._start_empty()
        _groups.add(self)

    def _start_empty(self) -> None:
        """No write queued, nobody leading. Also a forked child's state: the parent's threads (a leader among them,
        perhaps holding the lock) do not exist in the child, so nothing it inherited can be waited for."""
        self._lock = threading.Lock()
        self._queue: list[_Queued[T]] = []
        self._leading = False

    def run(self, write: T) -> Any:
        """Run ``write`` in the next batch; return its value or raise its error once that batch has committed."""
        mine: _Queued[T] = _Queued(write)
        with self._lock:
            self._queue.append(mine)
            lead = not self._leading
            if lead:
                self._leading = True
            else:
                mine.done = threading.Event()
        if not lead:
            self._wait(mine)
            if mine.outcome is not None:
                return mine.outcome.result()
        self._lead()
        assert mine.outcome is not None  # the batch the leader ran held its own write
        return mine.outcome.result()

    def _wait(self, mine: _Queued[T]) -> None:
        """Wait for the write's outcome or for the lead. Interrupted (Ctrl-C), a write not yet taken is withdrawn;
        one a leader is running is waited for, so its caller never misses what it did."""
        assert mine.done is not None
        try:
            mine.done.wait()
        except BaseException:
            with self._lock:
                withdrawn = mine in self._queue
                if withdrawn:
                    self._queue.remove(mine)
                    if mine.lead:
                        self._hand_over()
            if not withdrawn:
                mine.done.wait()
            raise

    def _lead(self) -> None:
        """Run every queued write in one transaction, give each its outcome, then hand the lead over."""
        with self._lock:
            batch, self._queue = self._queue, []
        outcomes: list[Outcome] = []
        try:
            outcomes = self._run_batch([queued.write for queued in batch])
        except Exception as exc:  # the transaction failed as a whole: nothing committed, for anyone
            outcomes = [Outcome(error=exc) for _ in batch]
        finally:  # also when the leader is interrupted (Ctrl-C): the others get an answer and one of them leads
            self._finish(batch, outcomes)

    def _finish(self, batch: list[_Queued[T]], outcomes: list[Outcome]) -> None:
        self.batches += 1
        with self._lock:
            self._hand_over()
        if len(outcomes) != len(batch):
            outcomes = [Outcome(error=LedgerInterrupted()) for _ in batch]
        for queued, outcome in zip(batch, outcomes, strict=True):
            queued.outcome = outcome
            if queued.done is not None:
                queued.done.set()

    def _hand_over(self) -> None:
        """Give the lead to the oldest queued write, or stop leading (called holding the lock)."""
        if self._queue:
            nxt = self._queue[0]
            nxt.lead = True
            assert nxt.done is not None  # queued while a leader ran
            nxt.done.set()
        else:
            self._leading = False


_groups: weakref.WeakSet[GroupCommit[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for group in list(_groups):
        group._start_empty()


if hasattr(os, "register_at_fork"):  # POSIX: a child forked while a batch ran must not wait for the parent's leader
    os.register_at_fork(after_in_child=_after_fork_in_child)
