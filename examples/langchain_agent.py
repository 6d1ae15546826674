"""A LangChain tool-calling agent that pays per call, under a daily cap: ``python examples/langchain_agent.py``.

It starts the embedded sandbox gateway, funds a throwaway wallet with sandbox test USDC, runs a plain agent loop
(``bind_tools`` -> ``invoke`` -> run the tools -> feed back ``ToolMessage`` until a final answer), and prints what each
call cost. Every model call is a 402 challenge answered with a signed x402 payment.

Against a real gateway, replace the sandbox part with
``ChatGateway(model=..., base_url="https://gateway.example/v1", policy={"daily_cap_usd": "5"})`` and set
``LLM402_PRIVATE_KEY``.
"""

from __future__ import annotations

import httpx
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from rich.console import Console
from rich.table import Table

from llm402 import Gateway, Policy, Wallet
from llm402.langchain import ChatGateway, get_gateway_cost_callback
from llm402.money import format_usd
from llm402.sandbox import SandboxConfig, SandboxServer


@tool
def fahrenheit_to_celsius(fahrenheit: int) -> float:
    """Convert a temperature from degrees Fahrenheit to degrees Celsius."""
    return round((fahrenheit - 32) * 5 / 9, 2)


@tool
def square(n: int) -> int:
    """The square of an integer."""
    return n * n


def run_agent(llm: BaseChatModel, tools: list[BaseTool], question: str, max_steps: int = 5) -> str:
    """Ask, run the tools the model calls, feed their results back, until the model answers in text."""
    by_name = {t.name: t for t in tools}
    model = llm.bind_tools(tools)
    messages: list[BaseMessage] = [SystemMessage("Use the tools when they help."), HumanMessage(question)]
    for _ in range(max_steps):
        reply = model.invoke(messages)
        messages.append(reply)
        tool_calls = getattr(reply, "tool_calls", [])
        if not tool_calls:
            return reply.text
        for call in tool_calls:
            result = by_name[call["name"]].invoke(call["args"])
            messages.append(ToolMessage(str(result), tool_call_id=call["id"], name=call["name"]))
    raise RuntimeError(f"no final answer after {max_steps} steps")


def main() -> None:
    console = Console()
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet = Wallet.create()  # throwaway; funded below with sandbox test USDC
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": 1_000_000})
        gateway = Gateway(
            f"{sandbox.url}/v1",
            wallet=wallet,
            policy=Policy(max_payment_usd="0.05", daily_cap_usd="0.25"),
            agent="weather-agent",
            intent="tools",
            ledger="memory://",
        )
        llm = ChatGateway(model="sandbox/small", gateway=gateway)
        tools: list[BaseTool] = [fahrenheit_to_celsius, square]
        console.print(f"[bold]sandbox[/] {sandbox.url}\n[bold]wallet[/]  {wallet.address} (throwaway)")

        with get_gateway_cost_callback() as cost:
            for question in ("What is 212 degrees Fahrenheit in Celsius?", "What is the square of 12?"):
                console.print(f"[bold]Q[/] {question}\n[bold]A[/] {run_agent(llm, tools, question)}")

        table = Table("call", "model", "tokens", "cost", "transaction")
        for n, receipt in enumerate(gateway.receipts(), 1):
            tx = receipt.payment.transaction if receipt.payment else None
            table.add_row(str(n), receipt.model or "", str(receipt.total_tokens), format_usd(receipt.cost), tx or "")
        console.print(table)
        balance = int(httpx.get(f"{sandbox.url}/sandbox/balance/{wallet.address}").json()["balance"])
        console.print(
            f"{cost.total.calls} paid calls, {format_usd(cost.total_cost)} in all "
            f"(daily cap {format_usd(gateway.policy.daily_cap or 0)}); wallet balance {format_usd(balance)}"
        )


if __name__ == "__main__":
    main()
