"""The books every framework test checks: payments == model calls, receipts == what the sandbox charged."""

from __future__ import annotations

from llm402 import Gateway, Policy, Wallet
from llm402.receipts import Receipt
from llm402.sandbox import SandboxServer
from sandbox_view import FUNDS, SandboxView


def paid(gw: Gateway) -> list[Receipt]:
    """The receipts of answered calls (refusals leave receipts too, with an error and no payment)."""
    return [r for r in gw.receipts() if r.error is None and r.status == 200]


def check_books(view: SandboxView, wallet: Wallet, gateways: list[Gateway], model_calls: int) -> int:
    """One signature per model call, and the receipts' costs == what left the wallet, to the atomic unit."""
    receipts = [r for gw in gateways for r in paid(gw)]
    assert len(receipts) == model_calls
    assert all(r.payment is not None for r in receipts)
    assert view.stats(wallet.address)["signatures_seen"] == model_calls
    charged = FUNDS - view.balance(wallet.address)
    assert sum(r.cost for r in receipts) == charged > 0
    return charged


def capped_gateway(sandbox: SandboxServer, wallet: Wallet) -> Gateway:
    """A gateway to the sandbox's upto route whose daily cap ($0.000001) refuses any call before it is paid."""
    return Gateway(
        f"{sandbox.url}/upto/v1",
        wallet=wallet,
        ledger="memory://",
        policy=Policy(max_payment_usd="1", daily_cap_usd="0.000001"),
    )
