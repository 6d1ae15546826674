"""Budgets that survive their store (issue 22.2): a Redis-compatible server restarted from an older snapshot, or one
that lost its writes, must not make the ledger admit spend it no longer sees.

Each test runs its own server with persistence in a temporary folder, so it can crash it (SIGKILL: whatever was not
saved is gone) and restart it on the same port from the snapshot it chooses.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_support import T0, Clock, with_query

from llm402 import Gateway, Policy, Wallet
from llm402.budget import Caps, Hold, LedgerTotals
from llm402.budget.base import receipt_day
from llm402.budget.redis import LedgerRolledBack, RedisLedger
from llm402.errors import BudgetExceeded, PolicyRefusal
from llm402.receipts import Receipt
from llm402.sandbox import SandboxServer

DAY = receipt_day(T0)
CAPS = Caps(daily=1_000, total=1_000, global_=1_000)


class RedisOnDisk:
    """A Redis-compatible server whose data lives in ``folder``: snapshots on demand (``SAVE``), optionally an
    append-only file fsynced on every write."""

    def __init__(self, binary: str, folder: Path, *, aof: bool = False) -> None:
        self.binary, self.folder, self.aof = binary, folder, aof
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        self.proc = subprocess.Popen(
            [self.binary, *where, "--dbfilename", "dump.rdb", "--save", "", *persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        client.close()

    def snapshot(self, name: str) -> None:
        """Save the data now and keep a copy of that snapshot under ``name``."""
        import redis

        with redis.Redis(port=self.port) as client:
            client.save()
        shutil.copy(self.folder / "dump.rdb", self.folder / name)

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart_from(self, name: str | None) -> None:
        """Crash, then start again from the snapshot ``name`` (``None``: from nothing, as a server without
        persistence does)."""
        self.crash()
        (self.folder / "dump.rdb").unlink(missing_ok=True)
        if name is not None:
            shutil.copy(self.folder / name, self.folder / "dump.rdb")
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.crash()


@pytest.fixture
def store(redis_binary: str, tmp_path: Path) -> Iterator[RedisOnDisk]:
    server = RedisOnDisk(redis_binary, tmp_path)
    yield server
    server.stop()


def spend(ledger: RedisLedger, call_id: str, amount: int) -> None:
    ledger.reserve(Hold(call_id, "alice", DAY, amount, T0 + 60), CAPS)
    ledger.settle(call_id, amount, None)


def open_on(store: RedisOnDisk, **options: str) -> RedisLedger:
    return RedisLedger.from_url(with_query(store.url, namespace="budget", **options), clock=Clock())


def test_a_restart_from_an_older_snapshot_is_refused_not_overspent(store: RedisOnDisk) -> None:
    ledger = open_on(store)
    spend(ledger, "s1", 300)
    store.snapshot("old.rdb")
    spend(ledger, "s2", 600)  # 900 of 1_000 really spent
    store.restart_from("old.rdb")
    assert ledger.totals("alice", DAY) == LedgerTotals(300, 0, 300, 0, 300, 0), "the store forgot 600"

    with pytest.raises(LedgerRolledBack) as refused:
        ledger.reserve(Hold("r1", "alice", DAY, 500, T0 + 60), CAPS)  # 300 + 500 fits what the store remembers
    assert isinstance(refused.value, PolicyRefusal)
    assert refused.value.code == "ledger_rolled_back"
    assert refused.value.details["store_writes"] < refused.value.details["seen_writes"]
    assert ledger.totals("alice", DAY) == LedgerTotals(300, 0, 300, 0, 300, 0), "the refusal wrote nothing"
    with pytest.raises(LedgerRolledBack):
        ledger.reserve(Hold("r2", "alice", DAY, 1, T0 + 60), CAPS)  # refused until reconciled, however small
    ledger.close()


def test_a_restart_that_lost_everything_is_refused(store: RedisOnDisk) -> None:
    ledger = open_on(store)
    spend(ledger, "s1", 900)
    store.restart_from(None)  # no snapshot at all: an empty server
    with pytest.raises(LedgerRolledBack):
        ledger.reserve(Hold("r1", "alice", DAY, 500, T0 + 60), CAPS)
    ledger.close()


def test_a_grow_is_refused_too(store: RedisOnDisk) -> None:
    ledger = open_on(store)
    ledger.reserve(Hold("c1", "alice", DAY, 100, T0 + 60), CAPS)
    store.snapshot("old.rdb")
    spend(ledger, "s1", 800)
    store.restart_from("old.rdb")  # c1 survived; the 800 did not
    with pytest.raises(LedgerRolledBack):
        ledger.grow("c1", 200, CAPS)
    ledger.close()


@pytest.mark.parametrize("aof", [False, True], ids=["latest-snapshot", "aof-always"])
def test_a_restart_that_kept_every_write_is_no_alarm(redis_binary: str, tmp_path: Path, aof: bool) -> None:
    server = RedisOnDisk(redis_binary, tmp_path, aof=aof)
    try:
        ledger = open_on(server)
        spend(ledger, "s1", 300)
        spend(ledger, "s2", 600)
        if aof:
            server.crash()  # every write was fsynced to the append-only file before it was acknowledged
            server.start()
        else:
            server.snapshot("latest.rdb")
            server.restart_from("latest.rdb")
        assert ledger.totals("alice", DAY) == LedgerTotals(900, 0, 900, 0, 900, 0)
        with pytest.raises(BudgetExceeded):
            ledger.reserve(Hold("r1", "alice", DAY, 101, T0 + 60), CAPS)
        ledger.reserve(Hold("r2", "alice", DAY, 100, T0 + 60), CAPS)
        ledger.close()
    finally:
        server.stop()


def test_what_was_spent_is_still_recorded_after_a_rollback(store: RedisOnDisk) -> None:
    """Settling a call in flight is never refused: its reservation may be gone, its cost is still committed."""
    ledger = open_on(store)
    spend(ledger, "s1", 300)
    store.snapshot("old.rdb")
    ledger.reserve(Hold("in-flight", "alice", DAY, 200, T0 + 60), CAPS)
    store.restart_from("old.rdb")
    paid = Receipt("in-flight", "alice", None, "gw", "POST", "/v1/chat/completions", "m", 200, False, T0, 9.0, cost=150)
    ledger.settle("in-flight", 150, paid)
    assert ledger.totals("alice", DAY) == LedgerTotals(450, 0, 450, 0, 450, 0)
    assert [r.call_id for r in ledger.receipts()] == ["in-flight"]
    ledger.close()


def test_a_watermark_file_makes_new_processes_refuse_too(store: RedisOnDisk, tmp_path: Path) -> None:
    watermark = str(tmp_path / "watermark.db")
    first = open_on(store, watermark=watermark)
    spend(first, "s1", 300)
    store.snapshot("old.rdb")
    spend(first, "s2", 600)
    first.close()  # the process that saw the spend is gone
    store.restart_from("old.rdb")

    blind = open_on(store)  # what is left: a process that shares no watermark cannot know, until someone does
    blind.reserve(Hold("blind", "alice", DAY, 500, T0 + 60), CAPS)
    blind.settle("blind", 0, None)  # its writes bring the store's count back up to what `first` saw...

    fresh = open_on(store, watermark=watermark)
    with pytest.raises(LedgerRolledBack):  # ...but not with the same writes: the tokens differ
        fresh.reserve(Hold("r1", "alice", DAY, 500, T0 + 60), CAPS)
    with pytest.raises(LedgerRolledBack):  # and once one process has seen it, the store refuses every process
        blind.reserve(Hold("blind-2", "alice", DAY, 1, T0 + 60), CAPS)
    fresh.close()
    blind.close()


def test_a_watermark_written_by_another_process_binds_a_running_one(store: RedisOnDisk, tmp_path: Path) -> None:
    watermark = str(tmp_path / "watermark.db")
    slow = open_on(store, watermark=watermark)  # saw the store early, then idle
    spend(slow, "s0", 100)
    store.snapshot("old.rdb")
    busy = open_on(store, watermark=watermark)
    spend(busy, "s1", 800)
    store.restart_from("old.rdb")
    with pytest.raises(LedgerRolledBack):
        slow.reserve(Hold("r1", "alice", DAY, 500, T0 + 60), CAPS)
    slow.close()
    busy.close()


def test_one_detection_fences_every_process(store: RedisOnDisk) -> None:
    sighted = open_on(store)
    spend(sighted, "s1", 300)
    store.snapshot("old.rdb")
    spend(sighted, "s2", 600)
    store.restart_from("old.rdb")
    newcomer = open_on(store)  # started after the rollback: it never saw the 600
    with pytest.raises(LedgerRolledBack):
        sighted.reserve(Hold("r1", "alice", DAY, 500, T0 + 60), CAPS)
    with pytest.raises(LedgerRolledBack) as refused:
        newcomer.reserve(Hold("r2", "alice", DAY, 500, T0 + 60), CAPS)
    assert refused.value.details["namespace"] == "budget"
    sighted.close()
    newcomer.close()


def test_reconcile_puts_back_what_this_process_saw(store: RedisOnDisk) -> None:
    ledger = open_on(store)
    spend(ledger, "s1", 300)
    store.snapshot("old.rdb")
    spend(ledger, "s2", 600)
    store.restart_from("old.rdb")
    with pytest.raises(LedgerRolledBack):
        ledger.reserve(Hold("r1", "alice", DAY, 500, T0 + 60), CAPS)

    ledger.reconcile()
    assert ledger.totals("alice", DAY) == LedgerTotals(900, 0, 900, 0, 900, 0), "the forgotten 600 is back"
    with pytest.raises(BudgetExceeded):
        ledger.reserve(Hold("r2", "alice", DAY, 101, T0 + 60), CAPS)
    ledger.reserve(Hold("r3", "alice", DAY, 100, T0 + 60), CAPS)
    other = open_on(store)  # the store is consistent again for every process
    with pytest.raises(BudgetExceeded):
        other.reserve(Hold("r4", "alice", DAY, 1, T0 + 60), CAPS)
    other.close()
    ledger.close()


def test_namespaces_and_watermark_keys_are_independent(store: RedisOnDisk, tmp_path: Path) -> None:
    watermark = str(tmp_path / "watermark.db")
    busy = RedisLedger.from_url(with_query(store.url, namespace="a", watermark=watermark), clock=Clock())
    for i in range(5):
        spend(busy, f"s{i}", 10)
    other = RedisLedger.from_url(
        with_query(store.url, namespace=f"b-{uuid.uuid4().hex[:6]}", watermark=watermark), clock=Clock()
    )
    other.reserve(Hold("c1", "alice", DAY, 10, T0 + 60), CAPS)  # a's high count does not bind b
    busy.close()
    other.close()


def test_a_paid_call_after_a_rollback_is_refused_locally(
    store: RedisOnDisk, sandbox: SandboxServer, wallet: Wallet
) -> None:
    """Through a gateway: the refusal is a local 402 (``ledger_rolled_back``, never retried) and nothing is signed."""
    ledger = open_on(store)
    gw = Gateway(
        f"{sandbox.url}/v1", wallet=wallet, policy=Policy(max_payment_usd="1", daily_cap_usd="1"), ledger=ledger
    )
    body = {"model": "sandbox/small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    store.snapshot("old.rdb")
    with gw.http_client() as client:
        assert client.post(f"{gw.base_url}/chat/completions", json=body).status_code == 200
        store.restart_from("old.rdb")
        refused = client.post(f"{gw.base_url}/chat/completions", json=body)
    assert refused.status_code == 402
    assert refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert error["code"] == "ledger_rolled_back"
    assert error["store_writes"] < error["seen_writes"]
    gw.close()
