"""An LCEL chain (prompt | model | parser) paying per call under a daily cap: ``python examples/langchain_lcel.py``.

It starts the embedded sandbox gateway, funds a throwaway wallet with sandbox test USDC, and builds `ChatGateway`
from plain keyword arguments (as you would from a config file). The chain runs until the daily cap refuses the next
call, which then falls back to a cheaper route. Streaming shows the cost arriving with the usage chunk.
"""

from __future__ import annotations

import httpx
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from rich.console import Console
from rich.markup import escape

from llm402 import Wallet
from llm402.langchain import ChatGateway, GatewayBudgetExceeded, get_gateway_cost_callback
from llm402.money import format_usd, usd_to_atomic
from llm402.sandbox import SandboxConfig, SandboxServer

DAILY_CAP_USD = "0.005"
TOPICS = ["x402", "EIP-3009", "stablecoins", "HTTP 402", "agent budgets", "receipts", "replay protection", "ledgers"]


def main() -> None:
    console = Console()
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet = Wallet.create()  # throwaway; funded below with sandbox test USDC
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": 1_000_000})
        common = {
            "base_url": f"{sandbox.url}/v1",
            "wallet_private_key": wallet.export_private_key(),  # or set LLM402_PRIVATE_KEY and leave this out
            "agent": "explainer",
            "ledger": "memory://",
        }
        # max_tokens bounds what one call may cost: the gateway quotes (and llm402 reserves) the worst case.
        capped = ChatGateway(model="sandbox/large", max_tokens=100, policy={"daily_cap_usd": DAILY_CAP_USD}, **common)
        cheap = ChatGateway(model="sandbox/small", **common)
        prompt = ChatPromptTemplate.from_messages(
            [("system", "Explain in one sentence for a busy engineer."), ("user", "What is {topic}?")]
        )
        chain = prompt | capped | StrOutputParser()
        with_fallback = prompt | capped.with_fallbacks([cheap], exceptions_to_handle=(GatewayBudgetExceeded,))
        console.print(f"[bold]sandbox[/] {sandbox.url}\n[bold]wallet[/]  {wallet.address} (throwaway)")
        console.print(f"daily cap on sandbox/large: ${DAILY_CAP_USD}")

        with get_gateway_cost_callback() as cost:
            for topic in TOPICS:
                try:
                    console.print(f"[green]large[/] {topic}: {chain.invoke({'topic': topic})}")
                except GatewayBudgetExceeded as refused:
                    console.print(f"[yellow]refused[/] {topic}: {escape(str(refused))}")
                    reply = with_fallback.invoke({"topic": topic})
                    console.print(
                        f"[cyan]fallback[/] {reply.response_metadata['model_name']}: {reply.text} "
                        f"({format_usd(usd_to_atomic(reply.response_metadata['cost']))})"
                    )
                    break
            for chunk in (prompt | cheap).stream({"topic": "streaming with usage"}):
                metadata = chunk.response_metadata
                if "cost" in metadata:  # exactly one chunk: the usage chunk, once the stream has ended
                    tokens = chunk.usage_metadata["total_tokens"] if chunk.usage_metadata else "?"
                    tx = metadata["payment"]["transaction"]
                    console.print(f"[cyan]stream[/] ended: {tokens} tokens, cost ${metadata['cost']}, tx {tx}")

        for model, totals in cost.by_model.items():
            answered = totals.calls - totals.failed_calls
            console.print(
                f"{model}: {answered} answered, {totals.failed_calls} refused, "
                f"{totals.total_tokens} tokens, {format_usd(totals.cost)}"
            )
        console.print(f"[bold]total[/] {format_usd(cost.total_cost)} for {cost.total.calls} calls")


if __name__ == "__main__":
    main()
