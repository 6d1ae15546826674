"""``llm402 demo``: the embedded sandbox, a throwaway wallet, paid calls through the unchanged OpenAI SDK."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from .gateway import Gateway
from .money import format_usd
from .policy import Policy
from .receipts import Receipt, receipt_view, usd_string
from .wallet import Wallet

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _balance(base: str, address: str) -> int:
    return int(httpx.get(f"{base}/sandbox/balance/{address}").json()["balance"])


def run_demo(console: Console | None = None, *, as_json: bool = False) -> list[Receipt]:
    """Run the demo and print receipts; returns them (the tests check the sums). ``as_json``: print one JSON document
    on stdout instead of the table (the receipts as `receipt_view`, the wallet's balance before and after)."""
    import openai

    from .sandbox import SandboxConfig, SandboxServer

    out = console or Console()
    started = time.perf_counter()
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet = Wallet.create()
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": 5_000_000})
        before = _balance(sandbox.url, wallet.address)
        if not as_json:
            out.print(f"[bold]sandbox[/] {sandbox.url}   [bold]wallet[/] {wallet.address} (throwaway)")
        policy = Policy(max_payment_usd="0.05", daily_cap_usd="1.00")
        receipts: list[Receipt] = []
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("x402 v2", "/v1", {"model": "sandbox/small", "messages": [{"role": "user", "content": "What is x402?"}]}),
            (
                "x402 v2 stream",
                "/v1",
                {"model": "sandbox/medium", "stream": True, "messages": [{"role": "user", "content": "Tell a story"}]},
            ),
            (
                "x402 v2 tools",
                "/v1",
                {
                    "model": "sandbox/small",
                    "tools": [WEATHER_TOOL],
                    "messages": [{"role": "user", "content": "Weather in Tokyo?"}],
                },
            ),
            ("x402 v1", "/x402v1/v1", {"model": "sandbox/small", "messages": [{"role": "user", "content": "Hi v1"}]}),
            ("kiosk body", "/kiosk/v1", {"model": "sandbox/large", "messages": [{"role": "user", "content": "Hi"}]}),
            (
                "x402 upto",
                "/upto/v1",
                {"model": "sandbox/medium", "max_tokens": 800, "messages": [{"role": "user", "content": "Hi upto"}]},
            ),
            (
                "x402 upto stream",
                "/upto/v1",
                {
                    "model": "sandbox/medium",
                    "max_tokens": 800,
                    "stream": True,
                    "messages": [{"role": "user", "content": "Stream upto"}],
                },
            ),
        ]
        labels: list[str] = []
        with Gateway(f"{sandbox.url}/v1", wallet=wallet, policy=policy, agent="demo", ledger="memory://") as gw:
            for label, prefix, request in calls:
                client = openai.OpenAI(
                    base_url=f"{sandbox.url}{prefix}", api_key=gw.api_key, http_client=gw.http_client()
                )
                if request.get("stream"):
                    stream = client.chat.completions.create(**request)
                    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                else:
                    completion = client.chat.completions.create(**request)
                    message = completion.choices[0].message
                    text = message.content or json.dumps([t.function.name for t in message.tool_calls or []])
                assert gw.last_receipt is not None
                receipts.append(gw.last_receipt)
                labels.append(f"{label}: {text[:40]}")
        after = _balance(sandbox.url, wallet.address)

    total = sum(r.cost for r in receipts)
    if as_json:
        document = {
            "wallet": wallet.address,
            "balance_before": before,
            "balance_before_usd": usd_string(before),
            "balance_after": after,
            "balance_after_usd": usd_string(after),
            "total": total,
            "total_usd": usd_string(total),
            "balanced": before - after == total,
            "seconds": round(time.perf_counter() - started, 3),
            "calls": [{"label": label, **receipt_view(r)} for label, r in zip(labels, receipts, strict=True)],
        }
        print(json.dumps(document, indent=2))
        return receipts

    table = Table(title="llm402 receipts (every call paid through a real 402 and a verified signature)")
    for column in ("call", "model", "tokens", "authorized", "cost", "transaction"):
        table.add_column(column)
    for label, receipt in zip(labels, receipts, strict=True):
        payment = receipt.payment
        tx = payment.transaction if payment else None
        table.add_row(
            label,
            receipt.model or "-",
            f"{receipt.prompt_tokens}+{receipt.completion_tokens}",
            f"{format_usd(payment.amount)} {payment.scheme}" if payment else "-",
            format_usd(receipt.cost),
            (tx[:18] + "...") if tx else "-",
        )
    out.print(table)
    out.print(
        f"wallet balance {format_usd(before)} -> {format_usd(after)}; "
        f"receipts total {format_usd(total)}; dropped by exactly the receipts: {before - after == total}"
    )
    out.print(f"done in {time.perf_counter() - started:.1f}s")
    return receipts
