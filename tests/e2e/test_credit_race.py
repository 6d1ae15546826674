"""Invariant 4 with a credit gateway in the mix: 8 processes x 16 threads share one ledger and one key store against
the sandbox's Token Kiosk. One key is minted and top-ups stay within the daily top-up limit, single-flight across
processes; what left the wallet is exactly what the ledger booked as top-ups."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from e2e_support import SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.budget import open_ledger
from llm402.budget.base import receipt_day, topup_agent
from llm402.sandbox import SandboxServer

POLICY = {"max_payment_usd": "1", "daily_cap_usd": "5", "topup_max_usd": "1", "daily_topup_cap_usd": "3"}
BODY = {"model": "sandbox/small", "messages": [{"role": "user", "content": "race"}], "max_tokens": 16}


def credit_worker(args: tuple[str, str, str, str, int]) -> tuple[int, int]:
    """One process: ``threads`` threads share one kiosk Gateway; returns (answered, refused)."""
    import threading

    from llm402 import Gateway, Policy, Wallet

    base_url, key, ledger_url, key_store, threads = args
    gateway = Gateway(
        base_url,
        wallet=Wallet.from_key(key),
        profile="token-kiosk",
        policy=Policy(**POLICY),
        ledger=ledger_url,
        key_store=key_store,
        agent="racer",
    )
    gateway.load_prices()
    client = gateway.http_client()
    counts = {"answered": 0, "refused": 0}
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run() -> None:
        start.wait()
        response = client.post(f"{base_url}/chat/completions", json=BODY)
        with lock:
            counts["answered" if response.status_code == 200 else "refused"] += 1

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return counts["answered"], counts["refused"]


def test_processes_share_one_key_and_top_up_within_the_limit(
    sandbox: SandboxServer, view: SandboxView, tmp_path: Path
) -> None:
    wallet = Wallet.create()
    funds = 10_000_000
    view.fund(wallet.address, funds)
    ledger_url = f"sqlite:///{tmp_path}/credit-race.db"
    key_store = str(tmp_path / "kiosk.key")
    base = f"{sandbox.url}/kiosk/v1"
    processes, threads = 8, 16
    jobs = [(base, wallet.export_private_key(), ledger_url, key_store, threads)] * processes
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(credit_worker, jobs)
    answered = sum(a for a, _ in results)
    assert answered + sum(r for _, r in results) == processes * threads
    assert answered == processes * threads  # $1 of credit covers every call: one top-up fed them all
    account = Gateway(base, wallet=wallet, profile="token-kiosk", ledger="memory://", policy=Policy(**POLICY))
    assert len(account.credit_account().list_keys()) == 1  # one key minted for the whole fleet
    moved = funds - view.balance(wallet.address)
    ledger = open_ledger(ledger_url)
    booked = ledger.totals(topup_agent("racer"), receipt_day(time.time()))
    assert booked.day_spent == moved  # what left the wallet is what the ledger booked as top-ups
    assert 1_000_000 <= moved <= 3_000_000  # within the $3 daily top-up limit (single flight: one, usually)
    topups = [r for r in ledger.receipts() if r.payment is not None and r.payment.kind == "topup"]
    assert sum(r.cost for r in topups) == moved
