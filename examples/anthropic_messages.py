"""The Anthropic SDK paying per call: ``python examples/anthropic_messages.py`` (needs
``pip install "llm402[frameworks3,sandbox]"``; the SDK takes only ``httpx2`` clients).

It starts the embedded sandbox gateway, funds a throwaway wallet with sandbox test USDC and builds
``anthropic.Anthropic`` from a `Gateway`: the origin as ``base_url`` (the SDK adds ``/v1/messages``) and
``gw.httpx2_client()``. A tool loop runs, then a stream; each call's cost is on its raw response (``llm402-cost``)
and on ``llm402.current_receipt``. It ends by checking the books: the costs shown == the receipts == what left the
wallet.
"""

from __future__ import annotations

from typing import Any

import anthropic
import httpx

from llm402 import Gateway, Policy, Wallet, current_receipt
from llm402.sandbox import SandboxConfig, SandboxServer

TOOL: Any = {
    "name": "get_weather",
    "description": "The weather of a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def main() -> None:
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet, funds = Wallet.create(), 1_000_000  # a throwaway wallet, funded with sandbox test USDC
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": funds})
        gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, policy=Policy(max_payment_usd="0.01"), ledger="memory://")
        # on a key-based gateway (AIsa, a plain one) pass the key as auth_token=gw.api_key instead
        client = anthropic.Anthropic(
            base_url=gw.base_url.removesuffix("/v1"), api_key=gw.api_key, http_client=gw.httpx2_client()
        )
        shown = 0
        messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
        while True:
            raw = client.messages.with_raw_response.create(
                model="sandbox/small", max_tokens=64, tools=[TOOL], messages=messages
            )
            message = raw.parse()
            shown += int(raw.headers["llm402-cost"])  # an exact payment: its cost, in micro-USDC
            uses = [block for block in message.content if block.type == "tool_use"]
            if not uses:
                break
            messages += [
                {"role": "assistant", "content": message.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"}]},
            ]
        print(f"tool loop: {message.content[0].text!r}")  # type: ignore[union-attr]
        with client.messages.stream(
            model="sandbox/small", max_tokens=64, messages=[{"role": "user", "content": "Explain x402"}]
        ) as stream:
            final = stream.get_final_message()
        receipt = current_receipt.get()
        assert receipt is not None
        shown += receipt.cost
        print(f"stream: {final.content[0].text!r}, {final.usage.output_tokens} tokens, {receipt.cost_usd} USD")  # type: ignore[union-attr]
        receipts = sum(r.cost for r in gw.receipts())
        charged = funds - int(httpx.get(f"{sandbox.url}/sandbox/balance/{wallet.address}").json()["balance"])
        print(f"shown {shown}, receipts {receipts}, charged {charged} (micro-USDC)")
        if shown == receipts == charged:
            print("books agree")
        else:
            raise SystemExit("the books disagree")


if __name__ == "__main__":
    main()
