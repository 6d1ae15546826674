"""LiteLLM paying per call: ``python examples/litellm_completion.py`` (needs
``pip install "llm402[litellm,sandbox]"``).

It starts the embedded sandbox gateway, funds a throwaway wallet with sandbox test USDC and calls
``litellm.completion`` through llm402's clients: once with ``client=``, once with ``litellm.client_session``, and a
stream. Their answers carry ``x-litellm-response-cost``, so LiteLLM's own response cost is what llm402 paid. It
ends by checking the books: LiteLLM's costs == the receipts == what left the wallet.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch of LiteLLM's price map

import httpx
import litellm

from llm402 import Gateway, Policy, Wallet
from llm402.litellm import cost_reporting_client, openai_client
from llm402.sandbox import SandboxConfig, SandboxServer

MESSAGES = [{"role": "user", "content": "Explain x402 in one line"}]


def main() -> None:
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet, funds = Wallet.create(), 1_000_000  # a throwaway wallet, funded with sandbox test USDC
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": funds})
        gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, policy=Policy(max_payment_usd="0.01"), ledger="memory://")

        first = litellm.completion(model="openai/sandbox/small", messages=MESSAGES, client=openai_client(gw))
        litellm.client_session = cost_reporting_client(gw)
        second = litellm.completion(
            model="openai/sandbox/small", messages=MESSAGES, api_base=gw.base_url, api_key=gw.api_key
        )
        chunks = list(
            litellm.completion(
                model="openai/sandbox/small",
                messages=MESSAGES,
                api_base=gw.base_url,
                api_key=gw.api_key,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        built = litellm.stream_chunk_builder(chunks)
        assert built is not None
        costs = [first._hidden_params["response_cost"], second._hidden_params["response_cost"], built.usage.cost]
        print(f"{built.choices[0].message.content!r}; LiteLLM's response costs: {costs} USD")
        shown = sum(round(cost * 1_000_000) for cost in costs)
        receipts = sum(r.cost for r in gw.receipts())
        charged = funds - int(httpx.get(f"{sandbox.url}/sandbox/balance/{wallet.address}").json()["balance"])
        print(f"LiteLLM {shown}, receipts {receipts}, charged {charged} (micro-USDC)")
        if shown == receipts == charged:
            print("books agree")
        else:
            raise SystemExit("the books disagree")


if __name__ == "__main__":
    main()
