"""The `Ledger` contract, run against every backend: memory (the reference), a SQLite file, a real Redis server and a
real PostgreSQL server.

Invariants 3 (a reservation is durable; a crash leaves it counted, recovery is conservative) and 4 (committed plus
reserved never exceeds a cap under any concurrency) are checked here, with threads, processes and SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
from ledger_support import SHARED, T0, Clock, reserve_many, reserve_then_hang

from llm402.budget import Caps, Hold, Ledger, LedgerTotals, MemoryLedger, open_ledger
from llm402.budget.base import DEFAULT_RESERVATION_TTL
from llm402.errors import BudgetExceeded, ConfigurationError
from llm402.receipts import PaymentRecord, Receipt

DAY = "2023-11-14"  # the UTC day of T0
NEXT_DAY = "2023-11-15"
TTL = DEFAULT_RESERVATION_TTL


def hold(call_id: str, amount: int, *, agent: str = "alice", day: str = DAY, ttl: float = TTL) -> Hold:
    return Hold(call_id, agent, day, amount, T0 + ttl, intent="judging")


def zero() -> LedgerTotals:
    return LedgerTotals(0, 0, 0, 0, 0, 0)


def spend(ledger: Ledger, call_id: str, amount: int, **kwargs: object) -> None:
    """Reserve and settle ``amount`` (committed spend)."""
    ledger.reserve(hold(call_id, amount, **kwargs), Caps())  # type: ignore[arg-type]
    ledger.settle(call_id, amount, None)


def receipt(call_id: str, **overrides: object) -> Receipt:
    fields: dict[str, object] = {
        "call_id": call_id,
        "agent": "alice",
        "intent": "judging",
        "gateway": "http://127.0.0.1:8402/v1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "m-small",
        "status": 200,
        "streamed": False,
        "started_at": T0,
        "latency_ms": 12.5,
        "cost": 1_000,
        "reserved": 2_000,
        "prompt_tokens": 10,
        "completion_tokens": 20,
    }
    fields.update(overrides)
    return Receipt(**fields)  # type: ignore[arg-type]


# --- reserve and the caps -------------------------------------------------------------------------------------------


def test_reserve_within_caps(ledger: Ledger) -> None:
    caps = Caps(daily=1_000, total=2_000, global_=3_000)
    ledger.reserve(hold("c1", 400), caps)
    ledger.reserve(hold("c2", 600), caps)  # exactly at the daily cap is allowed
    assert ledger.totals("alice", DAY) == LedgerTotals(0, 1_000, 0, 1_000, 0, 1_000)
    assert ledger.totals("bob", DAY) == LedgerTotals(0, 0, 0, 0, 0, 1_000)


@pytest.mark.parametrize(
    ("cap_name", "caps"),
    [
        ("daily", Caps(daily=1_000, total=10_000, global_=10_000)),
        ("total", Caps(daily=10_000, total=1_000, global_=10_000)),
        ("global", Caps(daily=10_000, total=10_000, global_=1_000)),
    ],
)
def test_reserve_over_a_cap_is_refused_and_writes_nothing(ledger: Ledger, cap_name: str, caps: Caps) -> None:
    if cap_name == "daily":
        spend(ledger, "s1", 300)  # spent today
        ledger.reserve(hold("r1", 200), Caps())
    elif cap_name == "total":
        spend(ledger, "s1", 300, day="2023-11-01")  # spent on another day still counts for the total
        ledger.reserve(hold("r1", 200, day="2023-11-02"), Caps())
    else:
        spend(ledger, "s1", 300, agent="bob")  # other agents count for the global cap
        ledger.reserve(hold("r1", 200, agent="carol"), Caps())
    before = ledger.totals("alice", DAY)

    with pytest.raises(BudgetExceeded) as refused:
        ledger.reserve(hold("c1", 501), caps)

    assert refused.value.code == "budget_exceeded"
    assert refused.value.details == {
        "cap_name": cap_name,
        "cap": 1_000,
        "spent": 300,
        "reserved": 200,
        "requested": 501,
    }
    assert ledger.totals("alice", DAY) == before
    ledger.reserve(hold("c1", 500), caps)  # the exact remainder fits: nothing was left behind by the refusal


def test_grow_within_and_over_caps(ledger: Ledger) -> None:
    caps = Caps(daily=1_000)
    ledger.reserve(hold("c1", 100), caps)
    ledger.reserve(hold("c2", 300), caps)
    ledger.grow("c1", 600, caps)
    assert ledger.totals("alice", DAY).day_reserved == 900
    ledger.grow("c1", 50, caps)  # never shrinks
    assert ledger.totals("alice", DAY).day_reserved == 900

    with pytest.raises(BudgetExceeded) as refused:
        ledger.grow("c1", 701, caps)
    assert refused.value.details == {"cap_name": "daily", "cap": 1_000, "spent": 0, "reserved": 900, "requested": 101}
    assert ledger.totals("alice", DAY).day_reserved == 900
    ledger.grow("c1", 700, caps)
    assert ledger.totals("alice", DAY).day_reserved == 1_000


def test_unknown_or_duplicate_calls_and_negative_amounts(ledger: Ledger) -> None:
    ledger.reserve(hold("c1", 100), Caps())
    with pytest.raises(ConfigurationError):
        ledger.reserve(hold("c1", 100), Caps())
    with pytest.raises(ConfigurationError):
        ledger.reserve(hold("c2", -1), Caps())
    with pytest.raises(KeyError):
        ledger.grow("nope", 100, Caps())
    with pytest.raises(KeyError):
        ledger.expose("nope", 100, T0 + 60)
    ledger.settle("nope", 100, None)  # settling an unknown call (already recovered) commits nothing
    assert ledger.totals("alice", DAY) == LedgerTotals(0, 100, 0, 100, 0, 100)


# --- reconcile -----------------------------------------------------------------------------------------------------


def test_settle_commits_actual_and_frees_the_rest(ledger: Ledger) -> None:
    ledger.reserve(hold("c1", 1_000), Caps(daily=1_000))
    ledger.settle("c1", 250, None)
    assert ledger.totals("alice", DAY) == LedgerTotals(250, 0, 250, 0, 250, 0)
    ledger.reserve(hold("c2", 750), Caps(daily=1_000))
    with pytest.raises(BudgetExceeded):
        ledger.reserve(hold("c3", 1), Caps(daily=1_000))


def test_unsettled_payment_dangles_until_valid_before(ledger: Ledger, clock: Clock) -> None:
    caps = Caps(daily=1_000)
    ledger.reserve(hold("c1", 100, ttl=30), caps)
    ledger.expose("c1", 400, T0 + 120)  # signed for more than reserved, valid for two minutes
    assert ledger.totals("alice", DAY).day_reserved == 400
    ledger.settle("c1", 0, None)  # the call failed, but the payee may still settle the authorization
    assert ledger.totals("alice", DAY) == LedgerTotals(0, 400, 0, 400, 0, 400)

    clock.now = T0 + 119
    with pytest.raises(BudgetExceeded):
        ledger.reserve(hold("c2", 601, ttl=1_000), caps)
    clock.now = T0 + 120  # valid_before reached: the authorization can no longer settle
    ledger.reserve(hold("c2", 601, ttl=1_000), caps)  # the reserve swept the dangling remainder
    assert ledger.totals("alice", DAY) == LedgerTotals(0, 601, 0, 601, 0, 601)


def test_partial_settlement_dangles_the_difference(ledger: Ledger) -> None:
    ledger.reserve(hold("c1", 500), Caps())
    ledger.expose("c1", 300, T0 + 60)
    ledger.settle("c1", 100, None)
    assert ledger.totals("alice", DAY) == LedgerTotals(100, 200, 100, 200, 100, 200)
    assert ledger.recover(T0 + TTL) == 1  # a dangling remainder is released, never committed
    assert ledger.totals("alice", DAY) == LedgerTotals(100, 0, 100, 0, 100, 0)


def test_a_consumed_upto_ceiling_releases_its_remainder(ledger: Ledger) -> None:
    # upto: 300 signed, 40 reported settled; the authorization settles once, so nothing else can move
    ledger.reserve(hold("c1", 300), Caps(daily=1_000))
    ledger.expose("c1", 300, T0 + 60)
    ledger.settle("c1", 40, None, outstanding=0)
    assert ledger.totals("alice", DAY) == LedgerTotals(40, 0, 40, 0, 40, 0)
    # an unused up-front authorization of 100 beside it can still move until it expires
    ledger.reserve(hold("c2", 400), Caps(daily=1_000))
    ledger.expose("c2", 400, T0 + 60)
    ledger.settle("c2", 40, None, outstanding=100)
    assert ledger.totals("alice", DAY) == LedgerTotals(80, 100, 80, 100, 80, 100)
    # ``outstanding`` never raises what stays reserved above the unsettled remainder
    ledger.reserve(hold("c3", 50), Caps(daily=1_000))
    ledger.expose("c3", 50, T0 + 60)
    ledger.settle("c3", 30, None, outstanding=10**9)
    assert ledger.totals("alice", DAY) == LedgerTotals(110, 120, 110, 120, 110, 120)


def test_recover_is_conservative(ledger: Ledger) -> None:
    ledger.reserve(hold("held", 100, ttl=10), Caps())
    ledger.reserve(hold("signed", 200, ttl=10), Caps())
    ledger.expose("signed", 150, T0 + 5)
    ledger.reserve(hold("alive", 400, ttl=1_000), Caps())

    assert ledger.recover(T0 + 9) == 0
    assert ledger.recover(T0 + 10) == 2
    # held -> released; exposed -> committed (it may have settled); unexpired -> untouched
    assert ledger.totals("alice", DAY) == LedgerTotals(150, 400, 150, 400, 150, 400)
    assert ledger.recover(T0 + 10) == 0
    ledger.settle("alive", 400, None)
    assert ledger.totals("alice", DAY) == LedgerTotals(550, 0, 550, 0, 550, 0)


def test_days_are_separate_for_the_daily_cap_not_the_total(ledger: Ledger) -> None:
    caps = Caps(daily=1_000, total=1_500)
    ledger.reserve(hold("d1", 1_000), caps)
    ledger.settle("d1", 1_000, None)
    with pytest.raises(BudgetExceeded) as daily:
        ledger.reserve(hold("d1b", 1), caps)
    assert daily.value.details["cap_name"] == "daily"

    ledger.reserve(hold("d2", 500, day=NEXT_DAY), caps)  # a new day: the daily cap starts again
    with pytest.raises(BudgetExceeded) as total:
        ledger.reserve(hold("d2b", 1, day=NEXT_DAY), caps)
    assert total.value.details["cap_name"] == "total"
    assert ledger.totals("alice", NEXT_DAY) == LedgerTotals(0, 500, 1_000, 500, 1_000, 500)


# --- receipts and the spend report ---------------------------------------------------------------------------------


def test_receipts_round_trip(ledger: Ledger) -> None:
    paid = receipt(
        "c1",
        payment=PaymentRecord(
            scheme="exact",
            network="eip155:84532",
            asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            amount=1_000,
            payer="0x" + "a" * 40,
            payee="0x" + "b" * 40,
            transaction="0x" + "c" * 64,
            settled=True,
        ),
        attempts=({"route": "primary", "status": 402}, {"route": "primary", "status": 200}),
        credits_remaining="4.25",
        route="primary",
    )
    refused = receipt("c0", started_at=T0 - 10, status=None, cost=0, error="budget_exceeded", model=None, intent=None)
    ledger.reserve(hold("c1", 2_000), Caps())
    ledger.record(refused)
    ledger.settle("c1", 1_000, paid)

    assert list(ledger.receipts()) == [refused, paid]
    assert list(ledger.receipts(since=T0)) == [paid]
    assert list(ledger.receipts(since=T0 + 1)) == []
    restored = ledger.receipts()[1]
    assert isinstance(restored.payment, PaymentRecord)
    assert restored.attempts == paid.attempts


def test_spend_report_groups(ledger: Ledger) -> None:
    day = 86_400.0
    rows = [
        receipt("r1", agent="alice", intent="judging", model="m-small", cost=100, started_at=T0),
        receipt("r2", agent="alice", intent="commentary", model="m-large", cost=700, started_at=T0 + 1),
        receipt("r3", agent="bob", intent="judging", model="m-small", cost=300, started_at=T0 + day),
        receipt("r4", agent="bob", intent=None, model=None, cost=0, started_at=T0 + day + 1, prompt_tokens=0),
    ]
    for row in rows:
        ledger.record(row)

    def keyed(by: str, since: float | None = None) -> dict[object, tuple[int, int, int, int]]:
        report = ledger.spend_report(by, since)
        return {r["key"]: (r["calls"], r["cost"], r["prompt_tokens"], r["completion_tokens"]) for r in report}

    assert keyed("agent") == {"alice": (2, 800, 20, 40), "bob": (2, 300, 10, 40)}
    assert keyed("intent") == {"judging": (2, 400, 20, 40), "commentary": (1, 700, 10, 20), None: (1, 0, 0, 20)}
    assert keyed("model") == {"m-small": (2, 400, 20, 40), "m-large": (1, 700, 10, 20), None: (1, 0, 0, 20)}
    assert keyed("day") == {DAY: (2, 800, 20, 40), NEXT_DAY: (2, 300, 10, 40)}
    assert keyed("agent", since=T0 + 1) == {"alice": (1, 700, 10, 20), "bob": (2, 300, 10, 40)}
    assert [r["key"] for r in ledger.spend_report("model")] == ["m-large", "m-small", None]  # by cost, then key
    assert [r["key"] for r in ledger.spend_report("day")] == [DAY, NEXT_DAY]  # chronological
    assert ledger.spend_report("agent", since=T0 + 10 * day) == []
    with pytest.raises(ConfigurationError):
        ledger.spend_report("prompt")


# --- the reference semantics, on random operation sequences ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_match_the_memory_reference(ledger: Ledger, clock: Clock, seed: int) -> None:
    rng = random.Random(seed)
    ref_clock = Clock()
    reference = MemoryLedger(ref_clock)
    caps = Caps(daily=5_000, total=8_000, global_=12_000)
    agents, days = ["alice", "bob"], [DAY, NEXT_DAY]
    calls: list[str] = []

    def both(name: str, *args: object) -> None:
        outcomes = []
        for target in (reference, ledger):
            try:
                getattr(target, name)(*args)
                outcomes.append(None)
            except BudgetExceeded as exc:
                outcomes.append(exc.details)
            except (KeyError, ConfigurationError) as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes[0] == outcomes[1], (name, args)

    for step in range(300):
        op = rng.choice(["reserve", "reserve", "grow", "expose", "settle", "settle", "recover", "tick"])
        if op == "reserve" or not calls:
            call_id = f"c{step}"
            calls.append(call_id)
            ttl = rng.choice([5.0, 50.0, 500.0])
            new = Hold(call_id, rng.choice(agents), rng.choice(days), rng.randrange(0, 1_500), clock.now + ttl)
            both("reserve", new, caps)
        elif op == "grow":
            both("grow", rng.choice(calls), rng.randrange(0, 2_000), caps)
        elif op == "expose":
            both("expose", rng.choice(calls), rng.randrange(0, 2_000), clock.now + rng.choice([1.0, 30.0, 300.0]))
        elif op == "settle":
            both("settle", rng.choice(calls), rng.randrange(0, 1_500), None)
        elif op == "recover":
            assert reference.recover(clock.now) == ledger.recover(clock.now)
        else:
            clock.now += rng.choice([1.0, 10.0, 100.0])
            ref_clock.now = clock.now
        for agent in agents:
            for day in days:
                assert ledger.totals(agent, day) == reference.totals(agent, day), step


# --- concurrency: invariant 4 -------------------------------------------------------------------------------------


def test_threads_never_break_a_cap(ledger_url: str, backend: str) -> None:
    """16 threads race for 10_000-unit reservations under a 1_000_000 cap: exactly 100 win. Durable backends give
    every thread its own connection, so the atomicity under test is the backend's, not a Python lock's."""
    shared = open_ledger(ledger_url)
    ledgers = [shared if backend == "memory" else open_ledger(ledger_url) for _ in range(16)]
    caps = Caps(daily=1_000_000, total=1_000_000, global_=1_000_000)
    start = threading.Barrier(16)
    won = [0] * 16

    def run(index: int) -> None:
        start.wait()
        for attempt in range(12):
            try:
                ledgers[index].reserve(Hold(f"t{index}-{attempt}", "agent", DAY, 10_000, time.time() + 900), caps)
            except BudgetExceeded:
                continue
            won[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(won) == 100
    assert shared.totals("agent", DAY) == LedgerTotals(0, 1_000_000, 0, 1_000_000, 0, 1_000_000)
    for opened in {id(x): x for x in ledgers}.values():
        opened.close()


@pytest.mark.parametrize("shared_url", SHARED, indirect=True)
def test_processes_never_break_a_cap(shared_url: str) -> None:
    """4 spawned processes x 8 threads share one file or one server: exactly 100 reservations win overall."""
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(reserve_many, shared_url, f"p{i}", 8, 6, 10_000, 1_000_000, DAY) for i in range(4)]
        won = [f.result(timeout=60) for f in futures]
    assert sum(won) == 100
    ledger = open_ledger(shared_url)
    assert ledger.totals("agent", DAY) == LedgerTotals(0, 1_000_000, 0, 1_000_000, 0, 1_000_000)
    ledger.close()


# --- crashes: invariant 3 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_url", SHARED, indirect=True)
@pytest.mark.parametrize("exposed", [False, True], ids=["held", "exposed"])
def test_sigkill_between_reserve_and_settle(shared_url: str, exposed: bool) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=reserve_then_hang, args=(shared_url, "crashed", DAY, 600_000, exposed, ready))
    child.start()
    try:
        assert ready.wait(30), "the child never reserved"
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(10)
    assert child.exitcode == -signal.SIGKILL

    ledger = open_ledger(shared_url)
    caps = Caps(daily=1_000_000)
    # the reservation outlived its process: it still counts against the cap
    assert ledger.totals("crasher", DAY) == LedgerTotals(0, 600_000, 0, 600_000, 0, 600_000)
    with pytest.raises(BudgetExceeded):
        ledger.reserve(Hold("next", "crasher", DAY, 400_001, time.time() + 900), caps)

    assert ledger.recover(time.time() + TTL + 1) == 1
    spent = 600_000 if exposed else 0  # a signed payment may have settled: committed, never forgotten
    assert ledger.totals("crasher", DAY) == LedgerTotals(spent, 0, spent, 0, spent, 0)
    with pytest.raises(BudgetExceeded):
        ledger.reserve(Hold("next", "crasher", DAY, 1_000_000 - spent + 1, time.time() + 900), caps)
    ledger.reserve(Hold("next", "crasher", DAY, 1_000_000 - spent, time.time() + 900), caps)
    ledger.close()
