"""The AIsa LLM router skill (shared/seeds/001): its documented examples replayed through llm402's ``aisa`` profile
with the OpenAI SDK (and LangChain where the skill's use cases are framework-shaped)."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal
from typing import Any

import openai
import pytest
from contract_support import AISA_URL, Sent, WireLog, cassette_marks, uses_cassette
from langchain_core.messages import HumanMessage

from llm402 import Gateway, Policy
from llm402.compare import compare
from llm402.errors import GatewayAuthError, GatewayRateLimited, GatewayServerError, InsufficientCredits, ModelNotFound
from llm402.langchain import ChatGateway, GatewayInsufficientCredits
from llm402.openai import typed_error
from llm402.pricing import ModelPrice

AISA_KEY = "your-key"  # Quick Start: export AISA_API_KEY="your-key"

# The skill publishes no price table: its cost comes in each answer (usage.cost), so caps bind after each call.
UNPRICED = Policy(allow_unpriced=True)


@pytest.fixture
def aisa(monkeypatch: pytest.MonkeyPatch) -> Gateway:
    """The skill's setup: AISA_API_KEY in the environment, the OpenAI-compatible base URL."""
    monkeypatch.setenv("AISA_API_KEY", AISA_KEY)
    return Gateway(AISA_URL, profile="aisa", ledger="memory://", policy=UNPRICED)


def client_for(gw: Gateway, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), **kw)


def micro(cost: float | str) -> int:
    """``usage.cost`` (USD) in micro-USDC, rounded up."""
    return int((Decimal(str(cost)) * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def chat_sent(wire: WireLog) -> Sent:
    """The one chat request on the wire (a metered gateway may first ask ``GET /models`` for a price)."""
    (chat,) = wire.to("/chat/completions")
    assert [(s.method, s.path) for s in wire.sent if s is not chat] in ([], [("GET", "/v1/models")])
    return chat


CHATS = [
    pytest.param(
        {
            "model": "gpt-4.1",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Explain quantum computing in simple terms."},
            ],
            "temperature": 0.7,
            "max_tokens": 1000,
        },
        "Quantum computing uses...",
        (50, 200, "0.0025", "9.9975"),
        id="chat-completions-curl",
    ),
    pytest.param(
        {"model": "gpt-4.1", "messages": user("Hello!")}, "Hello!", (9, 9, "0.00018", "9.99732"), id="openai-sdk"
    ),
    pytest.param(
        {"model": "gpt-4.1", "messages": user("Hello, world!")}, "Hello!", (10, 7, "0.00017", "9.99715"), id="cli-basic"
    ),
    pytest.param(
        {
            "model": "claude-sonnet-4-5",
            "messages": [
                {"role": "system", "content": "You are a poet"},
                {"role": "user", "content": "Write about the moon"},
            ],
        },
        "Silver lantern",
        (16, 40, "0.00056", "9.99659"),
        id="cli-system-prompt",
    ),
    pytest.param(
        {
            "model": "gpt-4.1",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How are you?"},
            ],
        },
        "I'm doing well",
        (20, 9, "0.00029", "9.9963"),
        id="cli-multi-turn",
    ),
    pytest.param(
        {
            "model": "claude-3-sonnet",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Explain relativity."},
            ],
            "temperature": 0.7,
            "max_tokens": 500,
        },
        "Relativity",
        (22, 120, "0.00142", "9.99488"),
        id="python-sdk-with-options",
    ),
]


@pytest.mark.parametrize(("body", "answer", "usage"), CHATS)
@uses_cassette("aisa_router/chat_completions")
def test_usage_cost_and_credits_remaining_reach_the_receipt(
    aisa: Gateway, wire: WireLog, body: dict[str, Any], answer: str, usage: tuple[int, int, str, str]
) -> None:
    """Pricing: 'Every response includes usage.cost and usage.credits_remaining': the receipt's cost is the
    gateway's own ``usage.cost`` (no price table needed) and its ``credits_remaining`` is kept."""
    reply = client_for(aisa).chat.completions.create(**body)
    assert reply.choices[0].message.content.startswith(answer)
    prompt, completion, cost, credits = usage
    extra = reply.usage.model_dump() if reply.usage else {}
    assert (extra["cost"], extra["credits_remaining"]) == (float(cost), float(credits))
    receipt = aisa.last_receipt
    assert receipt is not None
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (prompt, completion)
    assert receipt.cost == micro(cost)
    assert receipt.credits_remaining is not None
    assert Decimal(receipt.credits_remaining) == Decimal(credits)
    assert receipt.payment is None
    assert chat_sent(wire).headers["authorization"] == f"Bearer {AISA_KEY}"


@pytest.mark.parametrize(
    ("model", "prompt", "text", "cost", "credits"),
    [
        pytest.param(
            "claude-sonnet-4-5", "Write a poem about AI.", "In circuits deep", "0.00016", "9.99984", id="curl"
        ),
        pytest.param("gpt-4o", "Tell me a story", "Long ago, a lobster", "0.00017", "9.99962", id="cli-stream"),
    ],
)
@uses_cassette("aisa_router/streaming")
def test_streaming_sse_is_metered_by_usage_cost(
    aisa: Gateway, wire: WireLog, model: str, prompt: str, text: str, cost: str, credits: str
) -> None:
    stream = client_for(aisa).chat.completions.create(model=model, messages=user(prompt), stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert all(c.choices for c in chunks)
    assert chat_sent(wire).json()["stream_options"] == {"include_usage": True}
    receipt = aisa.last_receipt
    assert receipt is not None
    assert receipt.streamed
    assert receipt.cost == micro(cost)
    assert receipt.credits_remaining == credits


@uses_cassette("aisa_router/streaming")
def test_langchain_streams_with_the_cost_on_one_chunk(aisa: Gateway) -> None:
    """Python SDK Usage > Streaming (gpt-4o, 'Write a story.') through ``ChatGateway``."""
    chat = ChatGateway(model="gpt-4o", gateway=aisa)
    chunks = list(chat.stream("Write a story."))
    assert "".join(str(c.content) for c in chunks) == "Once upon a time"
    costs = [c.response_metadata["cost"] for c in chunks if "cost" in c.response_metadata]
    assert costs == ["0.000150"]
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage
    assert (usage[-1]["input_tokens"], usage[-1]["output_tokens"]) == (11, 4)


@pytest.mark.parametrize(
    ("prompt", "answer", "cost"),
    [
        pytest.param("What is in this image?", "A red bicycle leaning on a wall.", "0.01138", id="curl"),
        pytest.param("Describe this image", "A red bicycle leaning on a brick wall in the sun.", "0.0114", id="cli"),
    ],
)
@uses_cassette("aisa_router/vision")
def test_vision_image_url_parts(aisa: Gateway, wire: WireLog, prompt: str, answer: str, cost: str) -> None:
    reply = client_for(aisa).chat.completions.create(
        model="gpt-4o",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": "https://example.com/image.jpg"}},
                ],
            }
        ],
    )
    assert reply.choices[0].message.content == answer
    assert aisa.last_receipt is not None
    assert aisa.last_receipt.cost == micro(cost)
    assert aisa.last_receipt.reserved == 0  # no price table (AIsa lists none): nothing to reserve, usage.cost bills


@uses_cassette("aisa_router/vision")
def test_langchain_vision_message(aisa: Gateway) -> None:
    """Python SDK Usage > Vision ('What's in this image?') as a LangChain multimodal message."""
    message = HumanMessage(
        content=[
            {"type": "text", "text": "What's in this image?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/image.jpg"}},
        ]
    )
    answer = ChatGateway(model="gpt-4o", gateway=aisa).invoke([message])
    assert answer.content == "A red bicycle."
    assert answer.response_metadata["cost"] == "0.011340"


@uses_cassette("aisa_router/function_calling")
def test_function_calling_with_functions_and_function_call(aisa: Gateway, wire: WireLog) -> None:
    reply = client_for(aisa).chat.completions.create(
        model="gpt-4.1",
        messages=user("What is the weather in Tokyo?"),  # type: ignore[arg-type]
        functions=[
            {
                "name": "get_weather",
                "description": "Get current weather for a location",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "location": {"type": "string", "description": "City name"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    },
                    "required": ["location"],
                },
            }
        ],
        function_call="auto",
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call is not None
    assert choice.message.function_call.name == "get_weather"
    assert choice.message.function_call.arguments == '{"location": "Tokyo"}'
    assert aisa.last_receipt is not None
    assert aisa.last_receipt.cost == micro("0.00098")


@uses_cassette("aisa_router/gemini_native")
def test_gemini_native_generate_content_is_metered_by_usage_metadata(
    monkeypatch: pytest.MonkeyPatch, wire: WireLog
) -> None:
    """Google Gemini Format: the model comes from the path, usage from ``usageMetadata``, the cost from the price
    table (Pricing: Gemini-2.5-Flash ~$0.001 / 1K tokens, i.e. $1 per 1M)."""
    monkeypatch.setenv("AISA_API_KEY", AISA_KEY)
    price = ModelPrice.from_usd("1", "1")
    gw = Gateway(AISA_URL, profile="aisa", ledger="memory://", policy=Policy(), prices={"gemini-2.5-flash": price})
    with gw.http_client() as http:
        response = http.post(
            f"{gw.base_url}/models/gemini-2.5-flash:generateContent",
            headers={"authorization": f"Bearer {gw.api_key}"},
            json={
                "contents": [{"role": "user", "parts": [{"text": "Explain machine learning."}]}],
                "generationConfig": {"temperature": 0.7, "maxOutputTokens": 1000},
            },
        )
    assert response.status_code == 200
    assert response.json()["candidates"][0]["content"]["parts"][0]["text"].startswith("Machine learning")
    receipt = gw.last_receipt
    assert receipt is not None
    assert (receipt.model, receipt.prompt_tokens, receipt.completion_tokens) == ("gemini-2.5-flash", 4, 120)
    assert receipt.cost == price.cost(4, 120) == 124
    assert receipt.reserved >= receipt.cost  # the reservation used maxOutputTokens


@uses_cassette("aisa_router/models")
def test_models_list_without_prices_leaves_the_catalog_empty(aisa: Gateway, wire: WireLog) -> None:
    """CLI Usage > List supported models: the list carries no prices ('Check marketplace.aisa.one/pricing'), so
    llm402 learns none and meters by ``usage.cost``."""
    assert len(aisa.load_prices()) == 0
    assert wire.sent[0].headers["authorization"] == f"Bearer {AISA_KEY}"


@uses_cassette("aisa_router/compare")
def test_compare_models(aisa: Gateway) -> None:
    """CLI / Python SDK > Compare models (gpt-4.1, claude-sonnet-4-5, gemini-2.5-flash; 'What is 2+2?'), run by
    ``llm402.compare`` on the async client."""
    rows = compare(aisa, ["gpt-4.1", "claude-sonnet-4-5", "gemini-2.5-flash"], user("What is 2+2?"))
    assert [r.model for r in rows] == ["gpt-4.1", "claude-sonnet-4-5", "gemini-2.5-flash"]
    assert all(r.ok and r.answer == "2 + 2 = 4." for r in rows)
    assert [r.cost for r in rows] == [micro("0.00018"), micro("0.00021"), micro("0.00011")]


@uses_cassette("aisa_router/fallback")
def test_fallback_strategy_with_the_openai_sdk(aisa: Gateway) -> None:
    """Use Cases > 2. Fallback Strategy, as the document writes it (try each model, move on on failure)."""
    client = client_for(aisa, max_retries=0)
    failures: list[Exception] = []
    answer = None
    for model in ["gpt-4.1", "claude-sonnet-4-5", "gemini-2.5-flash"]:
        try:
            answer = client.chat.completions.create(model=model, messages=user("Summarize x402."))  # type: ignore[arg-type]
            break
        except openai.APIStatusError as exc:
            failures.append(exc)
    assert answer is not None
    assert answer.model == "claude-sonnet-4-5"
    assert isinstance(typed_error(failures[0]), GatewayServerError)
    receipts = list(aisa.receipts())
    assert [(r.model, r.status, r.cost) for r in receipts] == [
        ("gpt-4.1", 500, 0),
        ("claude-sonnet-4-5", 200, micro("0.00021")),
    ]


@uses_cassette("aisa_router/fallback")
def test_fallback_strategy_with_langchain(aisa: Gateway) -> None:
    chain = ChatGateway(model="gpt-4.1", gateway=aisa, max_retries=0).with_fallbacks(
        [ChatGateway(model="claude-sonnet-4-5", gateway=aisa, max_retries=0)]
    )
    answer = chain.invoke("Summarize x402.")
    assert answer.content == "x402 turns HTTP 402 into a pay-per-request protocol."
    assert answer.response_metadata["cost"] == "0.000210"


def _row(name: str, status: int, kind: type, code: str, message: str) -> Any:
    return pytest.param(name, status, kind, code, message, id=name, marks=cassette_marks(f"aisa_router/errors/{name}"))


@pytest.mark.parametrize(
    ("name", "status", "kind", "code", "message"),
    [
        _row("model_not_found", 404, ModelNotFound, "model_not_found", "Model 'xyz' is not available"),
        _row("invalid_api_key", 401, GatewayAuthError, "invalid_api_key", "Invalid or missing API key"),
        _row("insufficient_credits", 402, InsufficientCredits, "insufficient_credits", "Insufficient credits"),
        _row("rate_limit_exceeded", 429, GatewayRateLimited, "rate_limit_exceeded", "Rate limit exceeded"),
        _row("server_error", 500, GatewayServerError, "server_error", "Server error"),
    ],
)
def test_error_envelope_maps_to_typed_errors(
    aisa: Gateway, vcr: Any, name: str, status: int, kind: type, code: str, message: str
) -> None:
    """Error Handling: '{"error": {"code", "message"}}' and the common error codes."""
    model = "xyz" if name == "model_not_found" else "gpt-4.1"
    with pytest.raises(openai.APIStatusError) as info:
        client_for(aisa, max_retries=0).chat.completions.create(model=model, messages=user("Hello!"))  # type: ignore[arg-type]
    assert info.value.status_code == status
    error = typed_error(info.value)
    assert isinstance(error, kind)
    assert (error.code, error.status) == (code, status)
    assert message in error.message
    assert aisa.last_receipt is not None
    assert aisa.last_receipt.cost == 0
    assert vcr.all_played


@uses_cassette("aisa_router/errors/insufficient_credits")
def test_insufficient_credits_in_langchain(aisa: Gateway) -> None:
    """402 - Insufficient credits: not an x402 challenge, so nothing to pay; LangChain sees the typed error."""
    chat = ChatGateway(model="gpt-4.1", gateway=aisa, max_retries=0)
    with pytest.raises(GatewayInsufficientCredits) as info:
        chat.invoke("Hello!")
    assert info.value.code == "insufficient_credits"
