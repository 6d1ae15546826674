"""A LlamaIndex agent that pays per call, under a daily cap: ``python examples/llama_index_agent.py``.

It starts the embedded sandbox gateway, funds a throwaway wallet with sandbox test USDC, and runs a LlamaIndex
``FunctionAgent`` with two tools on `GatewayLLM`: every model call is a 402 challenge answered with a signed x402
payment. It keeps giving the agent tasks until the policy's daily cap refuses the next call (before anything is
signed), then prints every receipt and the totals three ways: the instrumentation handler, the ledger, and the
sandbox's own books.

Against a real gateway, replace the sandbox part with
``GatewayLLM(model=..., base_url="https://gateway.example/v1", policy=Policy(daily_cap_usd="5"))`` and set
``LLM402_PRIVATE_KEY``.
"""

from __future__ import annotations

import asyncio

import httpx
from llama_index.core.agent.workflow import FunctionAgent
from rich.console import Console
from rich.table import Table

from llm402 import BudgetExceeded, Gateway, Policy, Wallet
from llm402.llama_index import GatewayLLM, track_gateway_costs
from llm402.money import format_usd
from llm402.sandbox import SandboxConfig, SandboxServer

DAILY_CAP_USD = "0.001"
TASKS = [
    "Use square: what is 12 squared?",
    "Use count_words: how many words are in this very sentence?",
    "Use square: what is 31 squared?",
    "Use count_words: count the words of this line, please.",
    "Use square: what is 7 squared?",
    "Use square: what is 99 squared?",
]


def square(n: int) -> int:
    """The square of an integer."""
    return n * n


def count_words(text: str) -> int:
    """The number of words in a text."""
    return len(text.split())


def refusal_in(error: BaseException) -> BudgetExceeded | None:
    """The cap refusal behind an error (an agent workflow may wrap what a step raised)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, BudgetExceeded):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def run_tasks(console: Console, llm: GatewayLLM) -> None:
    agent = FunctionAgent(
        tools=[square, count_words],
        llm=llm,
        system_prompt="You are a careful assistant. Always answer with the help of a tool.",
    )
    for task in TASKS:
        try:
            answer = await agent.run(user_msg=task)
        except Exception as exc:
            refusal = refusal_in(exc)
            if refusal is None:
                raise
            console.print(f"[yellow]refused by the daily cap[/]: {refusal.message}")
            return
        console.print(f"[bold]{task}[/]\n  -> {answer}")
    console.print("[red]the daily cap was never reached[/]")


def main() -> None:
    console = Console()
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet = Wallet.create()  # throwaway; funded below with sandbox test USDC
        funds = 1_000_000
        httpx.post(
            f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": funds}
        ).raise_for_status()
        gateway = Gateway(
            f"{sandbox.url}/v1",
            wallet=wallet,
            policy=Policy(max_payment_usd="0.01", daily_cap_usd=DAILY_CAP_USD),
            agent="llama-demo",
            intent="demo",
            ledger="memory://",
        )
        llm = GatewayLLM(model="sandbox/small", gateway=gateway, max_tokens=256)
        console.print(
            f"agent [bold]{gateway.agent}[/] pays from {wallet.address} on {sandbox.url}; "
            f"daily cap ${DAILY_CAP_USD}, context window {llm.context_window:,} tokens\n"
        )
        with track_gateway_costs() as costs:
            asyncio.run(run_tasks(console, llm))

        table = Table(title="receipts (one per model call)")
        for column in ("model", "tokens in/out", "cost", "result", "transaction"):
            table.add_column(column, no_wrap=True)
        for r in gateway.receipts():
            tx = r.payment.transaction if r.payment and r.payment.transaction else "-"
            table.add_row(
                r.model or "-",
                f"{r.prompt_tokens}/{r.completion_tokens}",
                format_usd(r.cost),
                r.error or str(r.status),
                tx[:10] + "…" if len(tx) > 10 else tx,
            )
        console.print(table)

        ledger_total = sum(r.cost for r in gateway.receipts())
        balance = int(httpx.get(f"{sandbox.url}/sandbox/balance/{wallet.address}").json()["balance"])
        console.print(f"handler total  {format_usd(costs.total_micro_usdc)}  by model {costs.by_model}")
        console.print(f"ledger total   {format_usd(ledger_total)}  in {len(gateway.receipts())} calls")
        console.print(f"sandbox books  {format_usd(funds - balance)}  paid from the wallet")
        if costs.total_micro_usdc == ledger_total == funds - balance:
            console.print("[green]books agree[/]")
        else:
            raise SystemExit("the books disagree")


if __name__ == "__main__":
    main()
