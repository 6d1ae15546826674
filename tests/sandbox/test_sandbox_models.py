"""The scripted models over HTTP: echo, truncation, tools, legacy functions, structured output, vision, streaming."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from llm402.sandbox import SandboxServer
from llm402.sandbox.config import ModelSpec
from llm402.sandbox.models import count_tokens, flat_cost, token_cost, token_pieces

from .conftest import Kit

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "verbose": {"type": "boolean"},
            },
            "required": ["city", "days", "unit"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def chat(sandbox: SandboxServer) -> Iterator[Any]:
    """POST a chat with an API key that has credit; answers the parsed JSON (or the raw response for streams)."""
    kit = Kit(sandbox)
    _, key = kit.credit_wallet(5)

    def post(body: dict[str, Any], **kw: Any) -> Any:
        response = kit.http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, **kw)
        assert response.status_code == 200, response.text
        return response.json()

    post.key = key  # type: ignore[attr-defined]
    post.kit = kit  # type: ignore[attr-defined]
    yield post
    kit.http.close()


def user(text: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_echo_with_exact_usage(chat: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *user("What's 2+2, friend?")]
    data = chat({"model": "sandbox/medium", "messages": messages})
    assert data["object"] == "chat.completion" and data["model"] == "sandbox/medium"
    assert data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Echo: What's 2+2, friend?"}
    assert choice["finish_reason"] == "stop"
    prompt = (4 + 3) + (4 + 9)  # "Be brief." = 3 tokens; "What's 2+2, friend?" = What ' s 2 + 2 , friend ? = 9
    assert data["usage"] == {"prompt_tokens": prompt, "completion_tokens": 11, "total_tokens": prompt + 11}


def test_truncated_answer_finishes_with_length(chat: Any) -> None:
    data = chat({"model": "sandbox/small", "messages": user("one two three four"), "max_tokens": 3})
    assert data["choices"][0]["message"]["content"] == "Echo: one"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3


def test_tool_call_from_the_schema(chat: Any) -> None:
    data = chat({"model": "sandbox/small", "messages": user("Weather in Tokyo for 3 days?"), "tools": [WEATHER]})
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {
        "city": "Weather in Tokyo for 3 days?",
        "days": 3,
        "unit": "celsius",
    }
    arguments = call["function"]["arguments"]
    assert data["usage"]["completion_tokens"] == count_tokens("get_weather") + count_tokens(arguments)


def test_tool_selection_rules(chat: Any) -> None:
    def called(body: dict[str, Any]) -> str:
        return str(chat(body)["choices"][0]["message"]["tool_calls"][0]["function"]["name"])

    base = {"model": "sandbox/small", "tools": [WEATHER, CLOCK]}
    assert called({**base, "messages": user("what is get_time now")}) == "get_time"
    assert called({**base, "messages": user("anything")}) == "get_weather"
    forced = {"type": "function", "function": {"name": "get_time"}}
    assert called({**base, "messages": user("weather"), "tool_choice": forced}) == "get_time"
    assert called({**base, "messages": user("x"), "tool_choice": "required"}) == "get_weather"
    no_tools = chat({**base, "messages": user("hi"), "tool_choice": "none"})
    assert no_tools["choices"][0]["message"]["content"] == "Echo: hi"
    loop_end = chat(
        {
            **base,
            "messages": [
                *user("weather in Oslo"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
            ],
        }
    )
    assert loop_end["choices"][0]["finish_reason"] == "stop"
    assert "sunny, 21C" in loop_end["choices"][0]["message"]["content"]


def test_legacy_functions(chat: Any) -> None:
    functions = [{"name": "lookup", "parameters": {"type": "object", "properties": {"n": {"type": "number"}}}}]
    data = chat({"model": "sandbox/small", "messages": user("look up 2.5"), "functions": functions})
    choice = data["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "lookup"
    assert json.loads(choice["message"]["function_call"]["arguments"]) == {"n": 2.5}
    done = chat(
        {
            "model": "sandbox/small",
            "functions": functions,
            "messages": [*user("x"), {"role": "function", "name": "lookup", "content": "42"}],
        }
    )
    assert "42" in done["choices"][0]["message"]["content"]


def test_json_schema_and_json_object(chat: Any) -> None:
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "score": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "meta": {"$ref": "#/$defs/Meta"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["title", "score", "tags", "meta", "note"],
        "$defs": {"Meta": {"type": "object", "properties": {"ok": {"type": "boolean"}, "ratio": {"type": "number"}}}},
    }
    body = {
        "model": "sandbox/large",
        "messages": user("rate 7 out of 10"),
        "response_format": {"type": "json_schema", "json_schema": {"name": "Review", "schema": schema, "strict": True}},
    }
    content = json.loads(chat(body)["choices"][0]["message"]["content"])
    assert content == {
        "title": "rate 7 out of 10",
        "score": 7,
        "tags": [],
        "meta": {"ok": True, "ratio": 7.0},
        "note": "rate 7 out of 10",
    }
    as_object = chat({**body, "response_format": {"type": "json_object"}})
    assert json.loads(as_object["choices"][0]["message"]["content"]) == {"answer": "Echo: rate 7 out of 10"}


def test_vision_counts_images(chat: Any) -> None:
    parts = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}},
    ]
    data = chat({"model": "sandbox/vision", "messages": user(parts)})
    assert data["choices"][0]["message"]["content"] == "Saw 2 images. Echo: what is this"
    assert data["usage"]["prompt_tokens"] == 4 + 3 + 2 * 85


def test_streaming_chunks_and_usage(chat: Any) -> None:
    kit: Kit = chat.kit
    headers = {"Authorization": f"Bearer {chat.key}"}
    body = {"model": "sandbox/small", "messages": user("stream me please"), "stream": True}

    def events(extra: dict[str, Any]) -> list[Any]:
        with kit.http.stream("POST", "/v1/chat/completions", json={**body, **extra}, headers=headers) as response:
            assert response.status_code == 200
            raw = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert raw[-1] == "[DONE]"
        return [json.loads(r) for r in raw[:-1]]

    plain = events({})
    assert all(c["object"] == "chat.completion.chunk" and c["choices"] for c in plain)
    assert plain[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content") for c in plain[:-1]]
    assert pieces == ["Echo", ":", " stream", " me", " please"], "one chunk per token"
    assert plain[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    with_usage = events({"stream_options": {"include_usage": True}})
    assert with_usage[-1]["choices"] == []
    assert with_usage[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert all(c["usage"] is None for c in with_usage[:-1])
    tools = events({"tools": [WEATHER], "messages": user("Lima, 2 days")})
    head = tools[0]["choices"][0]["delta"]["tool_calls"][0]
    assert head["function"]["name"] == "get_weather" and head["id"].startswith("call_")
    arguments = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in tools[:-1])
    assert json.loads(arguments) == {"city": "Lima, 2 days", "days": 2, "unit": "celsius"}
    assert tools[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_openai_sdk_reads_the_sandbox(chat: Any) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{chat.kit.url}/v1", api_key=chat.key, max_retries=0)
    completion = client.chat.completions.create(model="sandbox/small", messages=user("hi"), max_tokens=5)
    assert completion.choices[0].message.content == "Echo: hi"
    streamed = client.chat.completions.create(
        model="sandbox/small", messages=user("hi"), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(streamed)
    assert "".join((c.choices[0].delta.content or "") for c in chunks if c.choices) == "Echo: hi"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    tool = client.chat.completions.create(model="sandbox/small", messages=user("Paris"), tools=[WEATHER])
    assert tool.choices[0].message.tool_calls[0].function.name == "get_weather"
    embedding = client.embeddings.create(model="sandbox/small", input="pay per call")
    assert len(embedding.data[0].embedding) == 16
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sandbox/small", messages=user("x"), reasoning_effort="low")


def test_streams_arrive_chunk_by_chunk(make_sandbox: Any) -> None:
    private: Kit = make_sandbox(stream_chunk_delay_ms=80)
    account = private.wallet()
    body = {"model": "sandbox/small", "messages": user("a b c d e f"), "stream": True}
    first = private.http.post("/v1/chat/completions", json=body)
    arrivals: list[float] = []
    with private.http.stream(
        "POST", "/v1/chat/completions", json=body, headers=private.sdk_headers(account, first)
    ) as r:
        assert r.status_code == 200 and "payment-response" in r.headers
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 10  # 8 tokens + finish chunk + [DONE]
    assert min(gaps[1:]) > 0.05, gaps  # the first gap may shrink: the first chunk can ride with the headers
    assert arrivals[-1] - arrivals[0] > 0.5


def test_prices_and_tokens_are_exact_integers() -> None:
    spec = ModelSpec("x/y", 1000, Decimal("0.15"), Decimal("0.60"))
    assert token_cost(spec, 9, 32) == math.ceil(20.55) == 21
    assert token_cost(spec, 0, 0) == 0
    assert token_cost(spec, 1, 0) == 1, "any fraction of a micro-USDC rounds up"
    assert token_cost(spec, 1_000_000, 1_000_000) == 750_000
    assert token_cost(spec, 1_000_000, 0, markup_bps=1_000) == 165_000
    assert flat_cost(40_000, 2_500) == 50_000
    assert count_tokens("Hello, world! x402") == 5
    assert "".join(token_pieces("  a  b.")) == "  a  b."
    with pytest.raises(ValueError, match="micro-USDC"):
        _ = ModelSpec("x/z", 1, Decimal("0.0000001"), Decimal(0)).prompt_micro_per_1m


def test_context_length_and_n_are_validated(chat: Any) -> None:
    kit: Kit = chat.kit
    too_long = {"model": "sandbox/small", "messages": user("hi"), "max_tokens": 200_000}
    n_two = {"model": "sandbox/small", "messages": user("hi"), "n": 2}
    bad_part = {"model": "sandbox/small", "messages": user([{"type": "audio"}])}
    for body in (too_long, n_two, bad_part, {"model": "sandbox/small", "messages": []}):
        response = kit.http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {chat.key}"})
        assert response.status_code == 400, body
    assert isinstance(httpx.Response(200).status_code, int)
