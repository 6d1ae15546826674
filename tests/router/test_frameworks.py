"""The router under unchanged framework classes, and under many concurrent calls (one receipt each, no mix-ups)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from router_support import Sandbox, tried

from llm402 import Gateway, Wallet
from llm402.budget import Ledger
from llm402.receipts import Receipt
from llm402.router import Route, Router

Start = Callable[..., list[Sandbox]]
MakeGateway = Callable[..., Gateway]


def test_langchain_and_llama_index_classes_unchanged(start: Start, gateway: MakeGateway) -> None:
    from langchain_openai import ChatOpenAI
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    a, b = start("status=500", "")
    router = Router([Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")])
    chat = ChatOpenAI(model="auto", base_url=router.base_url, api_key=router.api_key, http_client=router.http_client())  # type: ignore[arg-type]
    assert chat.invoke("hello from langchain").content == "Echo: hello from langchain"
    assert "".join(str(c.content) for c in chat.stream("streamed")) == "Echo: streamed"
    llm = OpenAILike(
        model="auto",
        api_base=router.base_url,
        api_key=router.api_key,
        is_chat_model=True,
        http_client=router.http_client(),
    )
    reply = llm.chat([ChatMessage(role="user", content="hello from llama")])
    assert reply.message.content == "Echo: hello from llama"
    assert router.last_receipt is not None and router.last_receipt.route == "B"


async def test_concurrent_calls_each_get_their_own_receipt(
    start: Start, gateway: MakeGateway, wallet: Wallet, ledger: Ledger
) -> None:
    a, b = start("status=500", "")
    router = Router([Route(gateway(a), "sandbox/small", name="A"), Route(gateway(b), "sandbox/small", name="B")])
    receipts: list[Receipt] = []
    router.on_receipt(receipts.append)
    async with router.async_http_client() as client:

        async def one(i: int) -> httpx.Response:
            body = {"model": "x", "messages": [{"role": "user", "content": f"call {i}"}], "stream": i % 2 == 0}
            return await client.post(f"{router.base_url}/chat/completions", json=body)

        responses = await asyncio.gather(*(one(i) for i in range(12)))
    assert all(r.status_code == 200 for r in responses)
    assert len(receipts) == 12
    for receipt in receipts:
        steps = [(x["route"], x["status"]) for x in tried(receipt)]
        assert steps == [("A", 500), ("B", 200)] and receipt.cost == tried(receipt)[1]["cost"] > 0
    call_ids = {x["call_id"] for r in receipts for x in tried(r)}
    assert len(call_ids) == 24, "every attempt is its own core call, attributed once"
    assert sum(r.cost for r in receipts) == sum(r.cost for r in ledger.receipts()) == b.charged(wallet.address)
