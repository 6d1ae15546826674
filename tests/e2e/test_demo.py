"""The README's first Quickstart command: the demo pays real 402s and the wallet drops by exactly the receipts."""

from __future__ import annotations

import io

from rich.console import Console

from llm402.demo import run_demo


def test_demo_runs_and_balances() -> None:
    out = io.StringIO()
    receipts = run_demo(Console(file=out, width=200))
    text = out.getvalue()
    assert len(receipts) == 7
    upto = [r for r in receipts if r.payment is not None and r.payment.scheme == "upto"]
    assert len(upto) == 2 and all(r.cost < r.payment.amount for r in upto if r.payment)
    assert all(r.payment is not None and r.payment.transaction for r in receipts)
    assert {r.payment.network for r in receipts if r.payment} == {"eip155:84532"}
    assert "dropped by exactly the receipts: True" in text
