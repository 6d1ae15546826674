"""A LangChain v1 agent (``create_agent``) with retry and fallback middleware, paying per call:
``python examples/langchain_create_agent.py`` (needs ``pip install "llm402[langchain,sandbox]" "langchain>=1.2"``).

It starts the embedded sandbox gateway, funds a throwaway wallet with sandbox test USDC and runs an agent whose
model is a `ChatGateway` under a small daily cap, with ``ModelRetryMiddleware`` and ``ModelFallbackMiddleware`` (a
second gateway without that cap). Once the cap refuses a call (before anything is signed), the retry middleware
leaves the refusal alone (it is a final ``ModelError``) and the fallback answers. It ends by checking the books: the
cost LangChain shows (the cost callback) == the receipts == what left the wallet.
"""

from __future__ import annotations

import httpx
from langchain.agents import create_agent
from langchain.agents.middleware import ModelFallbackMiddleware, ModelRetryMiddleware
from langchain_core.tools import tool

from llm402 import Gateway, Policy, Wallet
from llm402.langchain import ChatGateway, get_gateway_cost_callback
from llm402.sandbox import SandboxConfig, SandboxServer


@tool
def get_weather(city: str) -> str:
    """The weather of a city."""
    return "sunny"


def main() -> None:
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet, funds = Wallet.create(), 1_000_000  # a throwaway wallet, funded with sandbox test USDC
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": funds})
        capped = Gateway(
            f"{sandbox.url}/upto/v1",
            wallet=wallet,
            policy=Policy(max_payment_usd="0.01", daily_cap_usd="0.0001"),
            agent="weather",
            ledger="memory://",
        )
        spare = Gateway(
            f"{sandbox.url}/upto/v1",
            wallet=wallet,
            policy=Policy(max_payment_usd="0.01"),
            agent="spare",
            ledger="memory://",
        )
        agent = create_agent(
            ChatGateway(model="sandbox/small", gateway=capped, max_tokens=64),
            tools=[get_weather],
            middleware=[
                ModelFallbackMiddleware(ChatGateway(model="sandbox/small", gateway=spare, max_tokens=64)),
                ModelRetryMiddleware(max_retries=2, on_failure="error"),
            ],
        )
        with get_gateway_cost_callback() as costs:
            for city in ("Paris", "Rome", "Oslo", "Lima", "Kyiv", "Quito"):
                state = agent.invoke({"messages": [{"role": "user", "content": f"Weather in {city}?"}]})
                print(f"{city}: {state['messages'][-1].content!r}")
        refused = [r for r in capped.receipts() if r.error]
        paid = [r for gw in (capped, spare) for r in gw.receipts() if not r.error]
        print(f"{len(paid)} paid calls ({len(spare.receipts())} by the fallback), {len(refused)} refused by the cap")
        receipts = sum(r.cost for r in paid)
        charged = funds - int(httpx.get(f"{sandbox.url}/sandbox/balance/{wallet.address}").json()["balance"])
        print(f"LangChain {costs.total_cost}, receipts {receipts}, charged {charged} (micro-USDC)")
        if costs.total_cost == receipts == charged:
            print("books agree")
        else:
            raise SystemExit("the books disagree")


if __name__ == "__main__":
    main()
