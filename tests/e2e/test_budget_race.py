"""Invariant 4 through real paid calls: many processes and threads sharing one ledger never overspend a cap."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import pytest
from e2e_support import RACE_BODY, SandboxView, paid_calls_worker

from llm402 import Gateway, Policy, Wallet
from llm402.errors import refusal_from_envelope
from llm402.sandbox import SandboxServer

CALLS_ALLOWED = 100


def price_of_one_call(sandbox: SandboxServer) -> int:
    quote = Gateway(f"{sandbox.url}/v1", ledger="memory://", policy=Policy(max_payment_usd="1")).quote(RACE_BODY)
    return quote.amount


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_processes_and_threads_never_overspend(
    backend: str, sandbox: SandboxServer, view: SandboxView, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    price = price_of_one_call(sandbox)
    cap = CALLS_ALLOWED * price
    cap_usd = str(Decimal(cap) / 1_000_000)
    wallet = Wallet.create()
    view.fund(wallet.address, cap * 3)
    if backend == "sqlite":
        ledger_url = f"sqlite:///{tmp_path}/race.db"
    elif backend == "redis":
        ledger_url = f"{request.getfixturevalue('redis_server')}?namespace=race-{os.getpid()}-{time.time_ns()}"
    else:
        server = request.getfixturevalue("postgres_server")
        ledger_url = f"{server}{'&' if '?' in server else '?'}schema=race_{os.getpid()}_{time.time_ns()}"
    processes, threads, calls = 8, 16, 1
    jobs = [(f"{sandbox.url}/v1", wallet.export_private_key(), ledger_url, cap_usd, threads, calls)] * processes
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(paid_calls_worker, jobs)
    paid = sum(p for p, _ in results)
    refused = sum(r for _, r in results)
    assert paid == CALLS_ALLOWED
    assert refused == processes * threads * calls - CALLS_ALLOWED
    stats = view.stats(wallet.address)
    assert stats["signatures_seen"] == CALLS_ALLOWED, "no payment may be signed after the cap"
    assert cap * 3 - view.balance(wallet.address) == cap
    from llm402.budget import open_ledger

    ledger = open_ledger(ledger_url)
    receipts = ledger.receipts()
    assert sum(r.cost for r in receipts) == cap
    assert sum(1 for r in receipts if r.payment is not None) == CALLS_ALLOWED


def test_asyncio_500_tasks(sandbox: SandboxServer, view: SandboxView, tmp_path: Path) -> None:
    price = price_of_one_call(sandbox)
    cap = CALLS_ALLOWED * price
    wallet = Wallet.create()
    view.fund(wallet.address, cap * 3)
    gw = Gateway(
        f"{sandbox.url}/v1",
        wallet=wallet,
        policy=Policy(max_payment_usd="1", daily_cap_usd=Decimal(cap) / 1_000_000),
        ledger=f"sqlite:///{tmp_path}/async.db",
    )

    async def race() -> list[int]:
        async with gw.async_http_client() as client:
            responses = await asyncio.gather(
                *[client.post(f"{gw.base_url}/chat/completions", json=RACE_BODY) for _ in range(500)]
            )
        return [r.status_code for r in responses]

    statuses = asyncio.run(race())
    assert statuses.count(200) == CALLS_ALLOWED
    assert statuses.count(402) == 500 - CALLS_ALLOWED
    assert view.stats(wallet.address)["signatures_seen"] == CALLS_ALLOWED
    assert cap * 3 - view.balance(wallet.address) == cap == sum(r.cost for r in gw.receipts())


CRASHER = textwrap.dedent(
    """
    import sys, time, httpx
    from llm402 import Gateway, Policy, Wallet
    base, key, ledger, cap = sys.argv[1:5]
    gw = Gateway(base, wallet=Wallet.from_key(key), policy=Policy(max_payment_usd="1", daily_cap_usd=cap),
                 ledger=ledger, agent="crasher")
    client = gw.http_client(timeout=30)
    print("ready", flush=True)
    # the sandbox settles, then stalls: the process dies between reserve and reconcile
    client.post(base + "/chat/completions", json={"model": "sandbox/small", "max_tokens": 64,
                "messages": [{"role": "user", "content": "race"}]}, headers={"X-Sandbox-Fault": "stall_after_settle=10"})
    """
)


def test_sigkill_between_reserve_and_reconcile(sandbox: SandboxServer, view: SandboxView, tmp_path: Path) -> None:
    price = price_of_one_call(sandbox)
    cap = 3 * price
    cap_usd = str(Decimal(cap) / 1_000_000)
    wallet = Wallet.create()
    view.fund(wallet.address, cap * 5)
    ledger_url = f"sqlite:///{tmp_path}/crash.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHER, f"{sandbox.url}/v1", wallet.export_private_key(), ledger_url, cap_usd],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 20
    while view.stats(wallet.address)["settled"] < 1:  # the payment went out and settled
        assert time.monotonic() < deadline, "the crasher never paid"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()

    # a restarted agent on the same ledger: the signed payment stays counted (it settled), the cap still holds
    gw = Gateway(
        f"{sandbox.url}/v1",
        wallet=wallet,
        policy=Policy(max_payment_usd="1", daily_cap_usd=cap_usd),
        ledger=ledger_url,
        agent="crasher",
    )
    client = gw.http_client()
    statuses = [client.post(f"{gw.base_url}/chat/completions", json=RACE_BODY).status_code for _ in range(4)]
    assert statuses == [200, 200, 402, 402]
    refusal = refusal_from_envelope(client.post(f"{gw.base_url}/chat/completions", json=RACE_BODY).content)
    assert refusal is not None
    assert refusal.code == "budget_exceeded"
    charged = cap * 5 - view.balance(wallet.address)
    assert charged == cap, "the sandbox charged exactly the cap"
    totals = gw.ledger.totals("crasher", time.strftime("%Y-%m-%d", time.gmtime()))
    assert totals.day_spent + totals.day_reserved == charged, "the ledger agrees with the sandbox"
