"""The framework adapters pay MPP like x402: LangChain's ``ChatGateway`` and LlamaIndex's ``GatewayLLM`` on the
sandbox's MPP mounts and on pympp's own server, sync, async and streamed; receipts equal to what settled."""

from __future__ import annotations

import time
from typing import Any

import pytest
from pympp_server import PRICE_ATOMIC, PymppServer

from llm402 import Gateway, Policy, Wallet
from llm402.sandbox import SandboxServer
from sandbox_view import SandboxView


def ledger_total(gw: Gateway) -> int:
    totals = gw.ledger.totals(gw.agent, time.strftime("%Y-%m-%d", time.gmtime()))
    return int(totals.day_spent + totals.day_reserved)


def sandbox_gateway(sandbox: SandboxServer, mount: str, wallet: Wallet) -> Gateway:
    return Gateway(f"{sandbox.url}/{mount}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))


@pytest.mark.parametrize("mount", ["mpp", "dual"])
async def test_chat_gateway(sandbox: SandboxServer, view: SandboxView, wallet: Wallet, mount: str) -> None:
    pytest.importorskip("langchain_openai")
    from llm402.langchain import ChatGateway

    gw = sandbox_gateway(sandbox, mount, wallet)
    llm = ChatGateway(model="sandbox/small", gateway=gw)
    assert llm.invoke("hi").content
    assert "".join(str(chunk.content) for chunk in llm.stream("hi"))
    assert (await llm.ainvoke("hi")).content
    receipts = list(gw.receipts())
    settlements = view.settlements(wallet.address)
    assert [r.cost for r in receipts] == [s["amount"] for s in settlements]
    assert view.stats(wallet.address)["signatures_seen"] == len(receipts) == 3
    assert ledger_total(gw) == view.spent(wallet.address)


@pytest.mark.parametrize("mount", ["mpp", "dual"])
async def test_gateway_llm(sandbox: SandboxServer, view: SandboxView, wallet: Wallet, mount: str) -> None:
    pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    from llm402.llama_index import GatewayLLM

    gw = sandbox_gateway(sandbox, mount, wallet)
    llm = GatewayLLM(model="sandbox/small", gateway=gw)
    messages = [ChatMessage(role="user", content="hi")]
    assert llm.chat(messages).message.content
    assert "".join(r.delta or "" for r in llm.stream_chat(messages))
    assert (await llm.achat(messages)).message.content
    receipts = list(gw.receipts())
    settlements = view.settlements(wallet.address)
    assert [r.cost for r in receipts] == [s["amount"] for s in settlements]
    assert view.stats(wallet.address)["signatures_seen"] == len(receipts) == 3


@pytest.mark.parametrize("mount", ["mpp", "dual"])
def test_both_adapters_on_pympps_server(pympp_server: PymppServer, mount: str) -> None:
    pytest.importorskip("langchain_openai")
    pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    from llm402.langchain import ChatGateway
    from llm402.llama_index import GatewayLLM

    policy: dict[str, Any] = {"max_payment_usd": "0.01"}
    wallet = Wallet.create()
    gw = Gateway(f"{pympp_server.url}/{mount}/v1", wallet=wallet, ledger="memory://", policy=Policy(**policy))
    start = len(pympp_server.books.credentials)
    assert ChatGateway(model="pympp/small", gateway=gw, streaming=False).invoke("hi").content == "hi there"
    assert GatewayLLM(model="pympp/small", gateway=gw).chat([ChatMessage(role="user", content="hi")]).message.content
    settled = pympp_server.books.of(wallet.address)
    assert [s["amount"] for s in settled] == [PRICE_ATOMIC, PRICE_ATOMIC]
    assert [r.cost for r in gw.receipts()] == [s["amount"] for s in settled]
    assert len(pympp_server.books.credentials) - start == 2, "one credential per call"
