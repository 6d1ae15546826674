"""LlamaIndex against the sandbox gateway: the unchanged `OpenAILike` and `GatewayLLM` pay exactly once per logical
call, sync and async, streamed or not, with tools; the sandbox's own books are the independent check."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai_like import OpenAILike

from llm402 import Gateway, Policy, Wallet
from llm402.llama_index import GatewayLLM, track_gateway_costs

if TYPE_CHECKING:
    from conftest import SandboxView  # tests/llama_index/conftest.py
    from llm402.sandbox import SandboxServer

MESSAGES = [ChatMessage(role="user", content="Explain x402 in one line")]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llama_index_agent.py"


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def make_gateway(sandbox: SandboxServer, wallet: Wallet, **kw: object) -> Gateway:
    kw.setdefault("policy", Policy(max_payment_usd="0.05"))
    return Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", **kw)  # type: ignore[arg-type]


@pytest.fixture
def opened() -> Iterator[list[httpx.Client]]:
    """Sync clients a test opened, closed after it (async tests close theirs themselves)."""
    clients: list[httpx.Client] = []
    yield clients
    for client in clients:
        client.close()


def plain_llm(
    gw: Gateway, http: httpx.Client | None = None, ahttp: httpx.AsyncClient | None = None, **kw: object
) -> OpenAILike:
    """Exactly what the README shows: the unchanged class on llm402's clients (default max_retries=3)."""
    return OpenAILike(
        model="sandbox/small",
        api_base=gw.base_url,
        api_key=gw.api_key,
        is_chat_model=True,
        is_function_calling_model=True,
        http_client=http,
        async_http_client=ahttp,
        **kw,
    )


def assert_books_agree(view: SandboxView, wallet: Wallet, gw: Gateway, signatures: int) -> None:
    receipts = list(gw.receipts())
    stats = view.stats(wallet.address)
    assert stats["signatures_seen"] == signatures, stats
    assert stats["settled"] == signatures
    assert view.spent(wallet.address) == sum(r.cost for r in receipts) > 0


# --- the unchanged OpenAILike -------------------------------------------------------------------------------------


def test_plain_openai_like_sync(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, opened: list[httpx.Client]
) -> None:
    gw = make_gateway(sandbox, wallet)
    opened.append(gw.http_client())
    llm = plain_llm(gw, opened[-1])
    assert llm.chat(MESSAGES).message.content
    streamed = list(llm.stream_chat(MESSAGES))
    assert "".join(r.delta or "" for r in streamed) == streamed[-1].message.content
    assert llm.complete("Say hi").text
    assert_books_agree(view, wallet, gw, signatures=3)
    assert [r.streamed for r in gw.receipts()] == [False, True, False]
    assert all(r.completion_tokens > 0 for r in gw.receipts()), "streams are metered even without include_usage"


async def test_plain_openai_like_async(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = make_gateway(sandbox, wallet)
    async with gw.async_http_client() as ahttp:
        llm = plain_llm(gw, ahttp=ahttp)
        assert (await llm.achat(MESSAGES)).message.content
        streamed = [r async for r in await llm.astream_chat(MESSAGES)]
        assert streamed[-1].message.content
        assert (await llm.acomplete("Say hi")).text
    assert_books_agree(view, wallet, gw, signatures=3)


def test_plain_openai_like_tools(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, opened: list[httpx.Client]
) -> None:
    gw = make_gateway(sandbox, wallet)
    opened.append(gw.http_client())
    llm = plain_llm(gw, opened[-1])
    tool = FunctionTool.from_defaults(multiply)
    response = llm.chat_with_tools([tool], user_msg="multiply 6 by 6")
    calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("multiply", {"a": 6, "b": 6})]
    output = llm.predict_and_call([tool], user_msg="multiply 7 by 7")
    assert output.response == "49"
    assert_books_agree(view, wallet, gw, signatures=2)


def test_plain_openai_like_failure_after_settlement_signs_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, opened: list[httpx.Client]
) -> None:
    """LlamaIndex's tenacity layer (max_retries=3) retries the 500; llm402 re-sends the same authorization."""
    gw = make_gateway(sandbox, wallet)
    opened.append(gw.http_client())
    llm = plain_llm(gw, opened[-1], default_headers={"X-Sandbox-Fault": "fail_after_settle"})
    assert llm.max_retries == 3
    with pytest.raises(openai.APIError):
        llm.chat(MESSAGES)
    stats = view.stats(wallet.address)
    assert stats["signatures_seen"] == 1 and stats["settled"] == 1, stats
    assert view.spent(wallet.address) == sum(r.cost for r in gw.receipts()) > 0


# --- GatewayLLM -----------------------------------------------------------------------------------------------------


def test_gateway_llm_sync(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, opened: list[httpx.Client]
) -> None:
    gw = make_gateway(sandbox, wallet)
    http = gw.http_client()
    opened.append(http)
    llm = GatewayLLM(model="sandbox/small", gateway=gw, http_client=http)
    assert llm.context_window == 128_000, "from the sandbox's /v1/models"
    response = llm.chat(MESSAGES)
    streamed = list(llm.stream_chat(MESSAGES))
    completion = llm.complete("Say hi")
    costs = [response.additional_kwargs, streamed[-1].additional_kwargs, completion.additional_kwargs]
    receipts = list(gw.receipts())
    assert [c["cost_micro_usdc"] for c in costs] == [r.cost for r in receipts]
    assert [c["call_id"] for c in costs] == [r.call_id for r in receipts]
    assert streamed[-1].additional_kwargs["completion_tokens"] > 0
    assert all(c["payment"]["transaction"] for c in costs)
    assert_books_agree(view, wallet, gw, signatures=3)
    assert not http.is_closed


async def test_gateway_llm_async(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = make_gateway(sandbox, wallet)
    llm = GatewayLLM(model="sandbox/medium", gateway=gw)
    response = await llm.achat(MESSAGES)
    streamed = [r async for r in await llm.astream_chat(MESSAGES)]
    await llm.aclose()
    assert response.additional_kwargs["cost_micro_usdc"] > 0
    assert streamed[-1].additional_kwargs["cost_micro_usdc"] > 0
    assert_books_agree(view, wallet, gw, signatures=2)


def test_gateway_llm_from_plain_settings(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM402_PRIVATE_KEY", wallet.export_private_key())
    llm = GatewayLLM(
        model="sandbox/small",
        base_url=f"{sandbox.url}/v1",
        policy=Policy(max_payment_usd="0.05", daily_cap_usd="1"),
        ledger="memory://",
        agent="e2e-agent",
        intent="testing",
    )
    assert llm.chat(MESSAGES).additional_kwargs["cost_micro_usdc"] > 0
    llm.close()
    receipt = llm.gateway.last_receipt
    assert receipt is not None and (receipt.agent, receipt.intent) == ("e2e-agent", "testing")
    assert_books_agree(view, wallet, llm.gateway, signatures=1)


def test_gateway_llm_failure_after_settlement_signs_once(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = make_gateway(sandbox, wallet)
    llm = GatewayLLM(model="sandbox/small", gateway=gw, default_headers={"X-Sandbox-Fault": "fail_after_settle"})
    with track_gateway_costs() as costs, pytest.raises(openai.InternalServerError):
        llm.chat(MESSAGES)
    llm.close()
    assert_books_agree(view, wallet, gw, signatures=1)
    assert costs.total_micro_usdc == view.spent(wallet.address), "a paid failure is still counted"


async def test_cost_handler_totals_equal_the_ledger(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = make_gateway(sandbox, wallet, agent="mixed")
    small = GatewayLLM(model="sandbox/small", gateway=gw)
    large = GatewayLLM(model="sandbox/large", gateway=gw)
    tool = FunctionTool.from_defaults(multiply)
    with track_gateway_costs() as costs:
        small.chat(MESSAGES)
        list(large.stream_chat(MESSAGES))
        small.predict_and_call([tool], user_msg="multiply 3 by 3")
        await large.achat(MESSAGES)
        [r async for r in await small.astream_chat_with_tools([tool], user_msg="multiply 4 by 4")]
    for llm in (small, large):
        await llm.aclose()
    receipts = list(gw.receipts())
    assert costs.total_micro_usdc == sum(r.cost for r in receipts) == view.spent(wallet.address)
    assert costs.calls == len(receipts) == 5
    by_model: dict[str, int] = {}
    for r in receipts:
        by_model[r.model or ""] = by_model.get(r.model or "", 0) + r.cost
    assert costs.by_model == by_model and costs.by_agent == {"mixed": costs.total_micro_usdc}
    assert view.stats(wallet.address)["signatures_seen"] == 5


def test_example_agent_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused by the daily cap" in result.stdout
    assert "books agree" in result.stdout
