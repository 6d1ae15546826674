"""The OpenAI Agents SDK paying per call: ``python examples/openai_agents_run.py`` (needs
``pip install "llm402[frameworks3,sandbox]"``: openai 3.x).

It starts the embedded sandbox gateway, funds a throwaway wallet with sandbox test USDC and runs an agent with a tool
on a Responses model, then streamed on a chat-completions model; `GatewayCostHooks` keeps the receipt of each model
call. A daily cap then refuses a run before anything is signed, typed by ``llm402.errors_any.typed_errors``. It ends
by checking the books: the hooks' cost == the receipts == what left the wallet.
"""

from __future__ import annotations

import asyncio

import httpx
from agents import Agent, Runner, function_tool, set_tracing_disabled

from llm402 import BudgetExceeded, Gateway, Policy, Wallet
from llm402.errors_any import typed_errors
from llm402.openai_agents import GatewayCostHooks, chat_completions_model, responses_model
from llm402.sandbox import SandboxConfig, SandboxServer


@function_tool
def get_weather(city: str) -> str:
    """The weather of a city."""
    return "sunny"


async def run(gateway: Gateway) -> int:
    hooks = GatewayCostHooks()
    agent = Agent(name="weather", model=responses_model(gateway, "sandbox/small"), tools=[get_weather])
    result = await Runner.run(agent, "Weather in Paris?", hooks=hooks)
    print(f"run: {result.final_output!r}, {len(hooks.calls)} model calls, {hooks.total_usd} USD")
    streamed_hooks = GatewayCostHooks()
    agent = agent.clone(model=chat_completions_model(gateway, "sandbox/small"))
    streamed = Runner.run_streamed(agent, "Weather in Rome?", hooks=streamed_hooks)
    async for _event in streamed.stream_events():
        pass
    print(f"run_streamed: {streamed.final_output!r}, {[c.cost_usd for c in streamed_hooks.calls]} USD per call")
    return hooks.total + streamed_hooks.total


async def refused(gateway: Gateway) -> None:
    agent = Agent(name="capped", model=responses_model(gateway, "sandbox/small"), tools=[get_weather])
    try:
        with typed_errors():
            await Runner.run(agent, "Weather in Oslo?")
    except BudgetExceeded as exc:
        print(f"refused by the daily cap: {exc.message}")


def main() -> None:
    set_tracing_disabled(True)  # the SDK's traces would go to OpenAI's servers
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet, funds = Wallet.create(), 1_000_000  # a throwaway wallet, funded with sandbox test USDC
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": funds})
        gateway = Gateway(
            f"{sandbox.url}/upto/v1", wallet=wallet, policy=Policy(max_payment_usd="0.01"), ledger="memory://"
        )
        shown = asyncio.run(run(gateway))
        capped = Gateway(
            f"{sandbox.url}/upto/v1",
            wallet=wallet,
            policy=Policy(max_payment_usd="0.01", daily_cap_usd="0.000001"),
            ledger="memory://",
        )
        asyncio.run(refused(capped))
        receipts = sum(r.cost for r in gateway.receipts()) + sum(r.cost for r in capped.receipts())
        charged = funds - int(httpx.get(f"{sandbox.url}/sandbox/balance/{wallet.address}").json()["balance"])
        print(f"hooks {shown}, receipts {receipts}, charged {charged} (micro-USDC)")
        if shown == receipts == charged:
            print("books agree")
        else:
            raise SystemExit("the books disagree")


if __name__ == "__main__":
    main()
