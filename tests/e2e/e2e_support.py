"""Helpers that ask the sandbox what it saw: the independent side of every money check."""

from __future__ import annotations

from sandbox_view import FUNDS, SandboxView

__all__ = ["FUNDS", "RACE_BODY", "SandboxView", "paid_calls_worker"]


def paid_calls_worker(args: tuple[str, str, str, str, int, int]) -> tuple[int, int]:
    """One process of the budget race: ``threads`` threads share one Gateway (one ledger connection) and each makes
    ``calls`` paid calls; returns (paid, refused). Runs in a spawned child, so it imports everything itself."""
    import threading

    from llm402 import Gateway, Policy, Wallet
    from llm402.errors import refusal_from_envelope

    base_url, key, ledger_url, cap_usd, threads, calls = args
    gateway = Gateway(
        base_url,
        wallet=Wallet.from_key(key),
        policy=Policy(max_payment_usd="1", daily_cap_usd=cap_usd),
        ledger=ledger_url,
        agent="racer",
    )
    client = gateway.http_client()
    counts = {"paid": 0, "refused": 0}
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run() -> None:
        start.wait()
        for _ in range(calls):
            response = client.post(f"{base_url}/chat/completions", json=RACE_BODY)
            with lock:
                if response.status_code == 200:
                    counts["paid"] += 1
                else:
                    refusal = refusal_from_envelope(response.content)
                    assert refusal is not None, response.text
                    assert refusal.code == "budget_exceeded", refusal
                    counts["refused"] += 1

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    client.close()
    gateway.close()
    return counts["paid"], counts["refused"]


RACE_BODY = {"model": "sandbox/small", "messages": [{"role": "user", "content": "race"}], "max_tokens": 64}
