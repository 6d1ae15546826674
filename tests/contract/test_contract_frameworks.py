"""Token Kiosk's framework pages (LangChain, LlamaIndex) replayed with llm402's adapters: ``ChatGateway``,
LlamaIndex's unchanged ``OpenAILike`` on llm402's http clients, and ``GatewayLLM``."""

from __future__ import annotations

from typing import Any

from contract_support import KIOSK_URL, WireLog, uses_cassette
from llama_index.llms.openai_like import OpenAILike

from llm402 import Gateway
from llm402.langchain import ChatGateway
from llm402.llama_index import GatewayLLM
from llm402.pricing import ModelPrice

FLASH = "gemini/gemini-2.5-flash"
API_KEY = "sk-your-api-key"
FLASH_PRICE = ModelPrice.from_usd("0.15", "0.60", context_length=1048576)


def kiosk() -> Gateway:
    return Gateway(KIOSK_URL, profile="token-kiosk", api_key=API_KEY, ledger="memory://")


@uses_cassette("token_kiosk/integrations")
def test_langchain_page_invoke_and_stream(wire: WireLog, vcr: Any) -> None:
    """LangChain: ``ChatOpenAI(base_url=..., api_key=..., model=...).invoke("Hello!")``, as ``ChatGateway``."""
    gw = kiosk()
    assert gw.load_prices().lookup(FLASH) == FLASH_PRICE
    llm = ChatGateway(model=FLASH, gateway=gw)
    answer = llm.invoke("Hello!")
    assert answer.content == "Hello! How can I help?"
    assert answer.usage_metadata is not None
    assert (answer.usage_metadata["input_tokens"], answer.usage_metadata["output_tokens"]) == (20, 9)
    assert answer.response_metadata["cost"] == f"{FLASH_PRICE.cost(20, 9) / 1_000_000:.6f}"

    chunks = list(llm.stream("Hello!"))
    assert "".join(str(c.content) for c in chunks) == "Hello!"
    costs = [c.response_metadata["cost"] for c in chunks if "cost" in c.response_metadata]
    assert costs == [f"{FLASH_PRICE.cost(9, 2) / 1_000_000:.6f}"]
    assert all(s.headers.get("authorization") == f"Bearer {API_KEY}" for s in wire.to("/chat/completions"))
    assert vcr.all_played


@uses_cassette("token_kiosk/integrations")
def test_llamaindex_page_openai_like_unchanged(wire: WireLog) -> None:
    """LlamaIndex: ``OpenAILike(api_base=..., api_key=..., model=..., is_chat_model=True).complete("Hello!")`` with
    llm402's http clients injected (the class itself unchanged)."""
    gw = kiosk()
    llm = OpenAILike(
        model=FLASH,
        api_base=gw.base_url,
        api_key=gw.api_key,
        is_chat_model=True,
        http_client=gw.http_client(),
        async_http_client=gw.async_http_client(),
    )
    assert str(llm.complete("Hello!")) == "Hello! How can I help?"
    receipt = gw.last_receipt
    assert receipt is not None
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (20, 9)
    assert wire.to("/chat/completions")[0].headers["authorization"] == f"Bearer {API_KEY}"


@uses_cassette("token_kiosk/integrations")
def test_llamaindex_gateway_llm_reads_the_catalog_and_reports_cost(wire: WireLog, vcr: Any) -> None:
    gw = kiosk()
    llm = GatewayLLM(model=FLASH, gateway=gw)  # fetch_prices: GET /v1/models gives the context window and prices
    assert llm.metadata.context_window == 1048576
    response = llm.complete("Hello!")
    assert response.text == "Hello! How can I help?"
    assert response.additional_kwargs["cost_micro_usdc"] == FLASH_PRICE.cost(20, 9)
    pieces = list(llm.stream_complete("Hello!"))
    assert "".join(p.delta or "" for p in pieces) == "Hello!"
    assert pieces[-1].additional_kwargs["cost_micro_usdc"] == FLASH_PRICE.cost(9, 2)
    assert vcr.all_played
