"""Group commit: concurrent writes share a transaction, each returns only after the commit that holds it, and one
failing write undoes only itself."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from ledger_support import reserve_until_killed

from llm402.budget import Caps, Hold, open_ledger
from llm402.budget.group_commit import GroupCommit, Outcome
from llm402.budget.postgres import _lock_key, split_url
from llm402.budget.sqlite import SqliteLedger, SqlWrite, path_from_url
from llm402.errors import ReservationHeld

Write = Callable[[list[Any]], Any]


class Store:
    """A toy transactional store: writes append to a pending list; a commit makes them visible."""

    def __init__(self, fail_commit: bool = False, hold: threading.Event | None = None) -> None:
        self.committed: list[Any] = []
        self.batch_sizes: list[int] = []
        self.fail_commit = fail_commit
        self.hold = hold

    def run_batch(self, writes: Sequence[Write]) -> list[Outcome]:
        if self.hold is not None:
            self.hold.wait(5)  # the first batch holds the lead while the others queue
            self.hold = None
        pending: list[Any] = []
        outcomes = []
        for write in writes:
            mark = len(pending)
            try:
                outcomes.append(Outcome(write(pending)))
            except Exception as exc:
                del pending[mark:]  # the savepoint
                outcomes.append(Outcome(error=exc))
        if self.fail_commit:
            raise OSError("disk I/O error")
        self.committed.extend(pending)
        self.batch_sizes.append(len(writes))
        return outcomes


def append(value: Any) -> Write:
    def write(pending: list[Any]) -> Any:
        pending.append(value)
        return value

    return write


def fail_after_append(pending: list[Any]) -> None:
    pending.append("half-done")
    raise KeyError("missing")


def run_threads(group: GroupCommit[Write], writes: list[Write]) -> list[Any]:
    results: list[Any] = [None] * len(writes)

    def one(index: int) -> None:
        try:
            results[index] = group.run(writes[index])
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(writes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_writes_queued_behind_a_running_batch_share_the_next_transaction() -> None:
    hold = threading.Event()
    store = Store(hold=hold)
    group: GroupCommit[Write] = GroupCommit(store.run_batch)
    first = threading.Thread(target=group.run, args=(append("first"),))
    first.start()
    time.sleep(0.05)  # the first write leads and holds its transaction open
    results: list[Any] = []
    others = [threading.Thread(target=lambda i=i: results.append(group.run(append(i)))) for i in range(12)]
    for thread in others:
        thread.start()
    time.sleep(0.1)
    hold.set()
    first.join(5)
    for thread in others:
        thread.join(5)
    assert sorted(results) == list(range(12))  # every writer got its own write's value
    assert sorted(map(str, store.committed)) == sorted(["first", *map(str, range(12))])
    assert store.batch_sizes[0] == 1 and sum(store.batch_sizes) == 13
    assert group.batches < 13  # the twelve did not take twelve transactions


def test_a_failing_write_undoes_only_itself() -> None:
    hold = threading.Event()
    store = Store(hold=hold)
    group: GroupCommit[Write] = GroupCommit(store.run_batch)
    leader = threading.Thread(target=group.run, args=(append("lead"),))
    leader.start()
    time.sleep(0.05)
    writes: list[Write] = [append("a"), fail_after_append, append("b")]
    results: list[Any] = [None] * 3

    def one(index: int) -> None:
        try:
            results[index] = group.run(writes[index])
        except KeyError as exc:
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    hold.set()
    for thread in [leader, *threads]:
        thread.join(5)
    assert results[0] == "a" and results[2] == "b"
    assert isinstance(results[1], KeyError)
    assert "half-done" not in store.committed
    assert sorted(store.committed) == ["a", "b", "lead"]


def test_a_failed_commit_fails_every_write_of_the_batch_and_commits_nothing() -> None:
    store = Store(fail_commit=True)
    group: GroupCommit[Write] = GroupCommit(store.run_batch)
    results = run_threads(group, [append(i) for i in range(8)])
    assert all(isinstance(result, OSError) for result in results)
    assert store.committed == []
    # the group is not wedged: later writes run (and fail the same way, nothing stuck waiting for a leader)
    assert isinstance(run_threads(group, [append("again")])[0], OSError)


def test_a_leader_returns_after_its_batch_under_continuous_load() -> None:
    """The thread that leads runs one batch and hands the lead on; it does not serve the others for ever."""
    stop = threading.Event()

    def slow_batch(writes: Sequence[Write]) -> list[Outcome]:
        time.sleep(0.01)
        return [Outcome(write([])) for write in writes]

    group: GroupCommit[Write] = GroupCommit(slow_batch)

    def load() -> None:
        while not stop.is_set():
            group.run(append(None))

    workers = [threading.Thread(target=load) for _ in range(6)]
    for worker in workers:
        worker.start()
    try:
        started = time.monotonic()
        for _ in range(5):
            group.run(append("mine"))
        assert time.monotonic() - started < 1.0  # five writes, each within a couple of 10 ms batches
    finally:
        stop.set()
        for worker in workers:
            worker.join(5)


RealEvent = threading.Event


class InterruptedOnce:
    """An event whose first wait is interrupted (Ctrl-C while queued)."""

    def __init__(self) -> None:
        self.inner = RealEvent()
        self.calls = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt
        return self.inner.wait(timeout)

    def set(self) -> None:
        self.inner.set()


def test_an_interrupted_writer_not_yet_taken_is_withdrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    hold = threading.Event()
    store = Store(hold=hold)
    group: GroupCommit[Write] = GroupCommit(store.run_batch)
    leader = threading.Thread(target=group.run, args=(append("lead"),))
    leader.start()
    time.sleep(0.05)
    monkeypatch.setattr(threading, "Event", InterruptedOnce)
    with pytest.raises(KeyboardInterrupt):
        group.run(append("interrupted"))
    monkeypatch.undo()
    hold.set()
    leader.join(5)
    assert store.committed == ["lead"]  # the interrupted write never ran
    assert run_threads(group, [append("after")]) == ["after"]  # and the lead was not lost
    assert store.committed == ["lead", "after"]


def test_sqlite_batch_keeps_the_writes_that_succeeded(tmp_path: Path) -> None:
    """One SQLite transaction with a refused reserve, a failing grow and two reserves: the two reservations and the
    sweep are committed, the failing write left nothing behind."""
    ledger = SqliteLedger(tmp_path / "ledger.db")
    caps = Caps(daily=100)
    day = "2026-12-02"

    def reserve(call_id: str, amount: int) -> SqlWrite:
        return lambda conn: ledger._reserve(conn, Hold(call_id, "a", day, amount, time.time() + 900), caps, 0.0)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO reservations (call_id, agent, day, amount, state, expires_at) VALUES ('x', 'a', ?, 5, "
            "'held', 0)",
            (day,),
        )
        raise RuntimeError("a bug after a write")

    outcomes = ledger._run_batch([reserve("one", 60), reserve("two", 60), broken, reserve("three", 40)])
    assert outcomes[0].result() is None and outcomes[3].result() is None
    assert isinstance(outcomes[1].result(), Exception)  # the cap refusal, returned so the sweep stays
    with pytest.raises(RuntimeError):
        outcomes[2].result()
    totals = ledger.totals("a", day)
    assert totals.day_reserved == 100  # one + three; 'two' refused; the broken write's row rolled back
    ledger.settle("one", 60, None)
    ledger.settle("three", 40, None)
    assert ledger.totals("a", day).day_spent == 100
    ledger.close()


def test_sqlite_threads_share_commits_and_the_cap_holds(tmp_path: Path) -> None:
    """16 threads reserving against one cap through group commits: exactly the cap is reserved, in fewer
    transactions than writes."""
    ledger = SqliteLedger(tmp_path / "ledger.db")
    caps = Caps(daily=1_000)
    day = "2026-12-02"
    admitted: list[str] = []

    def worker(index: int) -> None:
        for n in range(20):
            call_id = f"{index}-{n}"
            try:
                ledger.reserve(Hold(call_id, "a", day, 7, time.time() + 900), caps)
            except Exception:
                continue
            admitted.append(call_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(admitted) == 1_000 // 7
    assert ledger.totals("a", day).day_reserved == 7 * (1_000 // 7)
    ledger.close()


class StoreHeld:
    """Holds a ledger's store from outside (another SQLite connection's write lock, another PostgreSQL session's
    advisory lock, a paused Redis) so that writes queue behind the first one and form one batch."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.release: Callable[[], None] = lambda: None

    def __enter__(self) -> StoreHeld:
        if self.url.startswith("sqlite"):
            conn = sqlite3.connect(path_from_url(self.url), isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            self.release = lambda: (conn.execute("COMMIT"), conn.close())  # type: ignore[func-returns-value]
        elif self.url.startswith("postgres"):
            import psycopg

            conninfo, schema = split_url(self.url)
            pg = psycopg.connect(conninfo, autocommit=True)
            pg.execute("BEGIN")
            pg.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(schema),))
            self.release = lambda: (pg.execute("COMMIT"), pg.close())  # type: ignore[func-returns-value]
        else:
            import redis

            client = redis.Redis.from_url(self.url.split("?")[0])
            client.client_pause(600)  # expires by itself: the ledger's scripts wait until then
            self.release = client.close
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@pytest.mark.parametrize("shared_url", ["sqlite", "redis", "postgres"], indirect=True)
def test_writes_queued_together_fail_alone_and_commit_together(shared_url: str) -> None:
    """A batch holding two reserves, a reserve of a call already held and a grow of an unknown call: the two
    reservations are committed in one transaction (or round trip), each failing write gets its own typed error, and
    the ledger goes on."""
    ledger = open_ledger(shared_url)
    caps = Caps(daily=10_000)
    day = "2026-12-02"

    def hold(call_id: str) -> Hold:
        return Hold(call_id, "a", day, 100, time.time() + 900)

    writes: dict[str, Callable[[], None]] = {
        "b": lambda: ledger.reserve(hold("b"), caps),
        "a-again": lambda: ledger.reserve(hold("a"), caps),
        "c": lambda: ledger.reserve(hold("c"), caps),
        "grow-unknown": lambda: ledger.grow("unknown", 500, caps),
    }
    results: dict[str, Any] = {}

    def run(name: str, write: Callable[[], None]) -> None:
        try:
            results[name] = write()
        except Exception as exc:
            results[name] = exc

    group = ledger._group  # type: ignore[attr-defined]
    with StoreHeld(shared_url):
        first = threading.Thread(target=run, args=("a", lambda: ledger.reserve(hold("a"), caps)))
        first.start()
        time.sleep(0.2)  # the first write leads and waits for the store
        others = [threading.Thread(target=run, args=item) for item in writes.items()]
        for thread in others:
            thread.start()
        time.sleep(0.2)  # the others queue behind it
    for thread in [first, *others]:
        thread.join(10)
    assert results["a"] is None and results["b"] is None and results["c"] is None
    assert isinstance(results["a-again"], ReservationHeld)
    assert isinstance(results["grow-unknown"], KeyError)
    assert group.batches == 2  # the four queued writes shared one transaction
    assert ledger.totals("a", day).day_reserved == 300
    other = open_ledger(shared_url)  # committed, not only done: another connection sees every returned write
    assert other.totals("a", day).day_reserved == 300
    other.close()
    for call_id in ("a", "b", "c"):
        ledger.settle(call_id, 40, None)
    totals = ledger.totals("a", day)
    assert (totals.day_spent, totals.day_reserved) == (120, 0)
    ledger.close()


def test_a_script_the_redis_server_forgot_runs_once(redis_server: str) -> None:
    """After a restart or SCRIPT FLUSH the batched EVALSHA answers NOSCRIPT (it did not run): it is loaded and run
    once, not twice and not lost."""
    import redis

    ledger = open_ledger(f"{redis_server}?namespace=noscript-{uuid.uuid4().hex[:8]}")
    day = "2026-12-02"
    ledger.reserve(Hold("one", "a", day, 100, time.time() + 900), Caps(daily=1_000))
    redis.Redis.from_url(redis_server).script_flush()
    ledger.settle("one", 60, None)
    totals = ledger.totals("a", day)
    assert (totals.day_spent, totals.day_reserved) == (60, 0)
    ledger.close()


def test_a_leader_interrupted_mid_batch_leaves_no_writer_waiting() -> None:
    """Ctrl-C in the thread running a batch: it raises KeyboardInterrupt; every other writer of that batch gets a typed
    `LedgerInterrupted` (whether its write was stored is unknown), and the next writer leads."""
    hold = threading.Event()
    batches: list[int] = []

    def run_batch(writes: Sequence[Write]) -> list[Outcome]:
        batches.append(len(writes))
        if len(batches) == 1:
            hold.wait(5)  # the first batch holds the lead while three writers queue: they form the second batch
        if len(batches) == 2:
            raise KeyboardInterrupt  # in the thread leading the second batch
        return [Outcome(write([])) for write in writes]

    group: GroupCommit[Write] = GroupCommit(run_batch)
    first = threading.Thread(target=group.run, args=(append("first"),))
    first.start()
    time.sleep(0.05)
    results: list[Any] = []

    def write(value: int) -> None:
        try:
            results.append(group.run(append(value)))
        except BaseException as exc:
            results.append(exc)

    writers = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for thread in writers:
        thread.start()
    time.sleep(0.1)
    hold.set()
    for thread in [first, *writers]:
        thread.join(5)
    assert batches[:2] == [1, 3]
    assert sorted(type(result).__name__ for result in results) == [
        "KeyboardInterrupt",
        "LedgerInterrupted",
        "LedgerInterrupted",
    ]
    assert group.run(append("after")) == "after"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork only")
def test_a_child_forked_while_a_batch_runs_can_write() -> None:
    """A process forked while another thread leads a batch: the child has no leader (that thread does not exist in
    it), so its first write must lead, not wait for ever."""
    parent = os.getpid()
    hold = threading.Event()

    def run_batch(writes: Sequence[Write]) -> list[Outcome]:
        if os.getpid() == parent:
            hold.wait(5)
        return [Outcome(write([])) for write in writes]

    group: GroupCommit[Write] = GroupCommit(run_batch)
    leader = threading.Thread(target=group.run, args=(append("parent"),))
    leader.start()
    time.sleep(0.05)  # the leader is inside its batch, holding the lead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() in a multi-threaded process
        child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        os._exit(0 if group.run(append("child")) == "child" else 1)
    try:
        deadline = time.monotonic() + 5
        status = 0
        while time.monotonic() < deadline:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        else:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            pytest.fail("the forked child's write waited for the parent's leader")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        hold.set()
        leader.join(5)


@pytest.mark.parametrize("shared_url", ["sqlite", "redis", "postgres"], indirect=True)
def test_a_process_killed_mid_batch_never_loses_a_returned_write(shared_url: str) -> None:
    """Eight threads reserving (and settling) through group commits, SIGKILLed at random five times: every reservation
    a thread saw returned is in the ledger (spent or reserved), and at most one in flight per thread is there
    unreported (committed as the process died)."""
    context = multiprocessing.get_context("spawn")
    day, amount, threads = "2026-12-02", 1_000, 8
    reported: set[str] = set()
    rng = random.Random(22)
    for _ in range(5):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=reserve_until_killed, args=(shared_url, day, amount, threads, send))
        child.start()
        send.close()
        seen_now = 0
        deadline = time.monotonic() + 60
        while seen_now < 40 + rng.randrange(200) and time.monotonic() < deadline:
            if receive.poll(1):
                reported.add(receive.recv())
                seen_now += 1
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
        try:
            while receive.poll(0.2):  # what was written before the kill
                reported.add(receive.recv())
        except EOFError:
            pass  # all of it
        receive.close()
        assert seen_now >= 40, "the child wrote too little before the deadline"
        ledger = open_ledger(shared_url)
        totals = ledger.totals("killed", day)
        ledger.close()
        stored = (totals.day_spent + totals.day_reserved) // amount
        assert len(reported) <= stored <= len(reported) + 5 * threads
