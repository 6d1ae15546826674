"""`compare`: three models at once through a Gateway or a Router; rows carry what each call really cost."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from router_support import MESSAGES, Sandbox

from llm402 import Gateway, Wallet
from llm402.budget import Ledger
from llm402.compare import CompareRow, acompare, compare, rows_table
from llm402.router import Route, Router

MODELS = ["sandbox/small", "sandbox/medium", "sandbox/large"]


def test_compare_three_models_through_a_gateway(
    start: Callable[..., list[Sandbox]], gateway: Callable[..., Gateway], wallet: Wallet, ledger: Ledger
) -> None:
    (sb,) = start("")
    seen: list[str] = []
    rows = compare(
        gateway(sb), [*MODELS, "sandbox/nope"], MESSAGES, max_tokens=16, on_row=lambda r: seen.append(r.model)
    )
    assert [r.model for r in rows] == [*MODELS, "sandbox/nope"]
    assert sorted(seen) == sorted(r.model for r in rows)
    good, bad = rows[:3], rows[3]
    assert all(r.ok and r.answer.startswith("Echo:") and r.latency_ms > 0 and r.completion_tokens > 0 for r in good)
    assert good[0].cost < good[1].cost < good[2].cost, "prices differ, and each row has its own call's cost"
    assert not bad.ok and "Unknown model" in str(bad.error) and bad.cost == 0
    assert sum(r.cost for r in rows) == sum(r.cost for r in ledger.receipts()) == sb.charged(wallet.address)
    console = Console(record=True, width=160)
    console.print(rows_table(rows))
    text = console.export_text()
    assert all(model in text for model in MODELS) and "Echo:" in text and "$0.0" in text


async def test_acompare_through_a_router(start: Callable[..., list[Sandbox]], gateway: Callable[..., Gateway]) -> None:
    a, b = start("status=500", "")
    router = Router(
        [Route(gateway(a), m, name=f"a:{m}") for m in MODELS] + [Route(gateway(b), "sandbox/small", name="b")]
    )
    rows = await acompare(router, MODELS, MESSAGES, max_tokens=8)
    assert all(r.ok for r in rows)
    assert {r.route for r in rows} == {"b"}, "every model fell back from the failing gateway"
    assert rows[0].to_dict()["cost_usd"].startswith("0.")
    assert CompareRow("m", "x" * 500, 1.0).excerpt(10) == "xxxxxxxxx…"
