"""Crash consistency (SIGKILL at random points, 50 times) and load (1,000 concurrent paid calls) against the sandbox."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from llm402 import Gateway, Policy, Wallet
from llm402.budget import open_ledger
from llm402.sandbox import SandboxServer

BODY = {"model": "sandbox/small", "messages": [{"role": "user", "content": "crash"}], "max_tokens": 32}

LOOPER = textwrap.dedent(
    """
    import sys
    from llm402 import Gateway, Policy, Wallet
    base, key, ledger, cap = sys.argv[1:5]
    gw = Gateway(base, wallet=Wallet.from_key(key), policy=Policy(max_payment_usd="1", daily_cap_usd=cap),
                 ledger=ledger, agent="looper")
    client = gw.http_client()
    body = {"model": "sandbox/small", "messages": [{"role": "user", "content": "crash"}], "max_tokens": 32}
    client.post(base + "/chat/completions", json=body)  # warm the payment stack before announcing
    print("ready", flush=True)
    while True:
        client.post(base + "/chat/completions", json=body)
    """
)


def price(sandbox: SandboxServer) -> int:
    return Gateway(f"{sandbox.url}/v1", ledger="memory://", policy=Policy(max_payment_usd="1")).quote(BODY).amount


def fund(sandbox: SandboxServer, address: str, amount: int) -> None:
    httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": address, "amount": amount}).raise_for_status()


def charged(sandbox: SandboxServer, address: str, funded: int) -> int:
    return funded - int(httpx.get(f"{sandbox.url}/sandbox/balance/{address}").json()["balance"])


def shared_ledger_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh ledger every process of a test can open: a SQLite file, a Redis namespace or a PostgreSQL schema."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/crash.db"
    if backend == "redis":
        return f"{request.getfixturevalue('redis_server')}?namespace=crash-{time.time_ns()}"
    server = request.getfixturevalue("postgres_server")
    return f"{server}{'&' if '?' in server else '?'}schema=crash_{time.time_ns()}"


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgres"])
def test_sigkill_at_random_points_fifty_times(
    backend: str, sandbox: SandboxServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    unit = price(sandbox)
    cap = 400 * unit
    funded = cap * 2
    wallet = Wallet.create()
    fund(sandbox, wallet.address, funded)
    ledger_url = shared_ledger_url(backend, tmp_path, request)
    rng = random.Random(402)
    argv = [sys.executable, "-c", LOOPER, f"{sandbox.url}/v1", wallet.export_private_key(), ledger_url]
    argv.append(str(Decimal(cap) / 1_000_000))
    for _ in range(50):
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        child.wait()
    ledger = open_ledger(ledger_url)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    totals = ledger.totals("looper", day)
    counted = totals.day_spent + totals.day_reserved
    spent = charged(sandbox, wallet.address, funded)
    assert spent <= cap, "the cap held across every crash"
    assert counted >= spent, "the ledger never counts less than the gateway charged"
    assert counted - spent <= 50 * unit, "at most one in-flight payment per crash is counted without a settlement"
    ledger.close()


def test_thousand_concurrent_paid_calls_under_a_cap(sandbox: SandboxServer, tmp_path: Path) -> None:
    unit = price(sandbox)
    admitted = 137
    wallet = Wallet.create()
    fund(sandbox, wallet.address, unit * 2000)
    gw = Gateway(
        f"{sandbox.url}/v1",
        wallet=wallet,
        policy=Policy(max_payment_usd="1", daily_cap_usd=Decimal(unit * admitted) / 1_000_000),
        ledger=f"sqlite:///{tmp_path}/load.db",
    )

    async def load() -> list[int]:
        async with gw.async_http_client(timeout=120) as client:
            responses = await asyncio.gather(
                *[client.post(f"{gw.base_url}/chat/completions", json=BODY) for _ in range(1000)]
            )
        return [r.status_code for r in responses]

    statuses = asyncio.run(load())
    assert statuses.count(200) == admitted
    assert statuses.count(402) == 1000 - admitted
    assert charged(sandbox, wallet.address, unit * 2000) == unit * admitted == sum(r.cost for r in gw.receipts())
    stats = httpx.get(f"{sandbox.url}/sandbox/stats", params={"payer": wallet.address}).json()
    assert stats["signatures_seen"] == admitted
