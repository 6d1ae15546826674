"""One-round-trip payments (a policy switch) and the opt-in response cache, against the sandbox."""

from __future__ import annotations

import time

import httpx
from e2e_support import FUNDS, SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.sandbox import SandboxServer
from llm402.transport import PaymentTransport

BODY = {"model": "sandbox/small", "messages": [{"role": "user", "content": "round trip"}], "max_tokens": 32}


class Counting(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return super().handle_request(request)


def test_warm_calls_pay_in_one_round_trip(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = Gateway(
        f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1", one_round_trip=True)
    )
    wire = Counting()
    client = httpx.Client(transport=PaymentTransport(gw.engine, wire))
    for _ in range(5):
        assert client.post(f"{gw.base_url}/chat/completions", json=BODY).status_code == 200
    assert wire.sent == 2 + 4, "the first call learns the price (402 + replay), the next four pay up front"
    assert view.stats(wallet.address)["signatures_seen"] == 5
    assert FUNDS - view.balance(wallet.address) == sum(r.cost for r in gw.receipts())


def test_a_402_after_the_up_front_payment_is_not_paid_again(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = Gateway(
        f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1", one_round_trip=True)
    )
    client = gw.http_client()
    assert client.post(f"{gw.base_url}/chat/completions", json=BODY).status_code == 200
    changed = client.post(
        f"{gw.base_url}/chat/completions", json=BODY, headers={"X-Sandbox-Fault": "change_amount_on_replay"}
    )
    # the gateway answered the up-front payment with a new 402: that authorization may still settle, so llm402 does
    # not sign a second one, for this attempt or for any retry of it
    assert changed.status_code == 402
    assert changed.json()["error"]["code"] == "payment_rejected"
    for _ in range(3):
        retry = client.post(
            f"{gw.base_url}/chat/completions", json=BODY, headers={"X-Sandbox-Fault": "change_amount_on_replay"}
        )
        assert retry.json()["error"]["code"] == "payment_outcome_unknown"
    assert view.stats(wallet.address)["signatures_seen"] == 2
    first, second = gw.receipts()[:2]
    assert second.payment is not None
    charged = FUNDS - view.balance(wallet.address)
    assert charged == first.cost
    totals = gw.ledger.totals(gw.agent, time.strftime("%Y-%m-%d", time.gmtime()))
    unused = second.payment.amount  # the up-front authorization stays counted until it expires
    assert totals.day_spent + totals.day_reserved == charged + unused


def test_deterministic_answers_are_cached_and_never_paid_twice(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", response_cache=True)
    client = gw.http_client()
    body = {**BODY, "temperature": 0}
    first = client.post(f"{gw.base_url}/chat/completions", json=body)
    second = client.post(f"{gw.base_url}/chat/completions", json=body)
    assert first.json() == second.json()
    assert second.headers["x-llm402-cache"] == "hit"
    receipts = list(gw.receipts())
    assert receipts[1].cache_hit
    assert receipts[1].cost == 0
    assert receipts[1].saved == receipts[0].cost > 0
    assert view.stats(wallet.address)["signatures_seen"] == 1
    client.post(f"{gw.base_url}/chat/completions", json={**BODY, "temperature": 0.7})
    client.post(f"{gw.base_url}/chat/completions", json={**BODY, "temperature": 0.7})
    assert view.stats(wallet.address)["signatures_seen"] == 3, "non-deterministic requests are never cached"
