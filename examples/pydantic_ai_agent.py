"""A PydanticAI agent paying per call, with ``UsageLimits(cost_limit=...)`` on llm402's cost:
``python examples/pydantic_ai_agent.py`` (needs ``pip install "llm402[frameworks3,sandbox]"``: openai 3.x).

It starts the embedded sandbox gateway, funds a throwaway wallet with sandbox test USDC and runs a PydanticAI agent
with a tool on `llm402.pydantic_ai.responses_model`: each model call is paid with an x402 ``upto`` authorization
settled to its metered cost, and each answer carries that cost where PydanticAI reads a gateway's cost, so the run's
``usage.cost`` is llm402's and a ``cost_limit`` stops a run that would spend more. It ends by checking the books:
PydanticAI's cost == the receipts == what left the wallet.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
from pydantic_ai import Agent, UsageLimitExceeded, UsageLimits

from llm402 import Gateway, Policy, Wallet
from llm402.pydantic_ai import responses_model
from llm402.sandbox import SandboxConfig, SandboxServer


async def run(gateway: Gateway) -> Decimal:
    agent = Agent(responses_model(gateway, "sandbox/small"), instructions="Use the tool.")

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather of a city."""
        return "sunny"

    result = await agent.run("Weather in Paris?", model_settings={"max_tokens": 64})
    print(f"answer: {result.output!r}  cost {result.usage.cost} USD in {result.usage.requests} model calls")
    async with agent.run_stream("Weather in Rome?", model_settings={"max_tokens": 64}) as stream:
        async for text in stream.stream_text():
            last = text
    print(f"streamed: {last!r}  cost {stream.usage.cost} USD")
    try:
        await agent.run(
            "Weather in Oslo?", model_settings={"max_tokens": 64}, usage_limits=UsageLimits(cost_limit=0.00001)
        )
    except UsageLimitExceeded as exc:
        print(f"stopped by cost_limit: {exc}")
    return (result.usage.cost or Decimal(0)) + (stream.usage.cost or Decimal(0))


def main() -> None:
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet, funds = Wallet.create(), 1_000_000  # a throwaway wallet, funded with sandbox test USDC
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": funds})
        gateway = Gateway(
            f"{sandbox.url}/upto/v1", wallet=wallet, policy=Policy(max_payment_usd="0.01"), ledger="memory://"
        )
        shown = asyncio.run(run(gateway))
        receipts = sum(r.cost for r in gateway.receipts())
        charged = funds - int(httpx.get(f"{sandbox.url}/sandbox/balance/{wallet.address}").json()["balance"])
        runs_shown = int(shown * 1_000_000)  # the two runs that finished; the stopped one's call is in the receipts
        stopped = gateway.receipts()[-1].cost
        print(f"PydanticAI {runs_shown} + stopped run {stopped}; receipts {receipts}; charged {charged} (micro-USDC)")
        if runs_shown + stopped == receipts == charged:
            print("books agree")
        else:
            raise SystemExit("the books disagree")


if __name__ == "__main__":
    main()
