"""Crash consistency with a credit gateway in the mix: 50 processes SIGKILLed at random points while a gateway
demands a top-up on every call. Top-ups stay within the daily top-up limit across every crash, and the ledger never
counts less top-up than the gateway took."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from hostile_gateway import HostileGateway, Seen, accepts

from llm402 import Wallet
from llm402.budget import open_ledger
from llm402.budget.base import topup_agent

USD = 1_000_000
LOOPER = textwrap.dedent(
    """
    import sys
    from llm402 import Gateway, Policy, Wallet
    from llm402.pricing import ModelPrice
    base, ledger, key = sys.argv[1:4]
    policy = Policy(max_payment_usd="1", daily_cap_usd="10", topup_max_usd="1", daily_topup_cap_usd="5")
    gw = Gateway(base, wallet=Wallet.from_key(key), profile="token-kiosk", api_key="sk-test", policy=policy,
                 ledger=ledger, agent="looper", prices={"m": ModelPrice.from_usd("1", "1")})
    client = gw.http_client()
    body = {"model": "m", "messages": [{"role": "user", "content": "crash"}], "max_tokens": 16}
    print("ready", flush=True)
    while True:
        client.post(base + "/chat/completions", json=body)
    """
)


class EndlessCredit:
    """Every call is INSUFFICIENT_BALANCE; every paid top-up is taken (and counted here)."""

    def __init__(self) -> None:
        self.taken = 0
        self.lock = threading.Lock()

    def __call__(self, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        if seen.path == "/v1/topup":
            if seen.payment is None:
                body = {"accepts": [accepts(USD, assetTransferMethod="eip3009")]}
                return 402, {"content-type": "application/json"}, json.dumps(body).encode()
            time.sleep(0.05)  # a top-up takes a moment: crashes land inside it too
            with self.lock:
                self.taken += USD
            return 200, {"content-type": "application/json"}, b'{"ok": true}'
        return 402, {"content-type": "application/json"}, b'{"error": {"code": "INSUFFICIENT_BALANCE"}}'


def test_sigkill_at_random_points_keeps_top_ups_within_their_limit_and_counted(tmp_path: Path) -> None:
    script = EndlessCredit()
    ledger_url = f"sqlite:///{tmp_path}/credit-crash.db"
    rng = random.Random(4021)
    with HostileGateway(script) as gateway:
        argv = [sys.executable, "-c", LOOPER, gateway.url + "/v1", ledger_url, Wallet.create().export_private_key()]
        for _ in range(50):
            child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.15))
            child.send_signal(signal.SIGKILL)
            child.wait()
        asked = gateway.count("/v1/chat/completions")
    ledger = open_ledger(ledger_url)
    booked = ledger.totals(topup_agent("looper"), time.strftime("%Y-%m-%d", time.gmtime()))
    counted = booked.day_spent + booked.day_reserved
    assert asked > 10  # the gateway kept asking for credit
    assert script.taken <= 5 * USD, "top-ups stayed within the $5 daily top-up limit across every crash"
    assert counted >= script.taken, "the ledger never counts less top-up than the gateway took"
    assert counted <= 5 * USD
    # a crashed process's signed top-up stays counted (and holds the single-flight lease) until it can no longer
    # settle: the processes after it wait for it rather than sign another
    ledger.close()
