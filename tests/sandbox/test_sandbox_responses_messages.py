"""The sandbox serves the OpenAI Responses API (``/v1/responses``) and Anthropic Messages (``/v1/messages``) on every
mount chat completions is served on: text, streaming, tool calls, truncation, usage as each API reports it; paid in
every dialect (exact, and upto settled to the metered cost), by credit, by AIsa credit (with ``usage.cost``) and
free. Raw httpx; payments are signed by the official x402 SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llm402.sandbox import SandboxServer
from llm402.sandbox.models import token_cost

from .conftest import FUNDS, Kit, unb64
from .test_sandbox_upto import offers, upto_header

PROMPT = "Explain x402 in one line"
RESPONSES = {"model": "sandbox/small", "instructions": "Be brief.", "input": PROMPT, "max_output_tokens": 32}
MESSAGES = {
    "model": "sandbox/small",
    "system": "Be brief.",
    "max_tokens": 32,
    "messages": [{"role": "user", "content": PROMPT}],
}
CHAT = {
    "model": "sandbox/small",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
    "max_tokens": 32,
}
ANSWER = f"Echo: {PROMPT}"
PROMPT_TOKENS = (4 + 3) + (4 + 5)  # "Be brief." = 3 tokens, the prompt 5, 4 a message
ANSWER_TOKENS = 7
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}
PAID_MOUNTS = ["", "/x402v2", "/x402v1", "/kiosk"]


def events(text: str) -> list[tuple[str | None, Any]]:
    """An SSE body as (event name, data JSON) pairs; comments as (``":"``, text)."""
    out: list[tuple[str | None, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        if block.startswith(":"):
            out.append((":", block[1:].strip()))
            continue
        name = None
        data: list[str] = []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        out.append((name, json.loads("\n".join(data))))
    return out


def responses_usage(data: dict[str, Any]) -> tuple[int, int]:
    usage = data["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    return usage["input_tokens"], usage["output_tokens"]


def messages_usage(data: dict[str, Any]) -> tuple[int, int]:
    usage = data["usage"]
    assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 0
    return usage["input_tokens"], usage["output_tokens"]


@pytest.fixture(scope="module")
def free(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{sandbox.url}/free/v1", timeout=20) as client:
        yield client


# --- the Responses API: answers ----------------------------------------------------------------------------------------


def test_a_response_answers_as_chat_completions_do_with_the_same_tokens(free: httpx.Client) -> None:
    data = free.post("/responses", json=RESPONSES).json()
    chat = free.post("/chat/completions", json=CHAT).json()
    assert data["object"] == "response" and data["status"] == "completed" and data["id"].startswith("resp_")
    [item] = data["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"] == [{"type": "output_text", "text": ANSWER, "annotations": [], "logprobs": []}]
    assert responses_usage(data) == (PROMPT_TOKENS, ANSWER_TOKENS)
    assert (chat["usage"]["prompt_tokens"], chat["usage"]["completion_tokens"]) == (PROMPT_TOKENS, ANSWER_TOKENS)
    assert chat["choices"][0]["message"]["content"] == ANSWER


def test_a_response_cut_by_max_output_tokens_is_incomplete(free: httpx.Client) -> None:
    data = free.post("/responses", json={**RESPONSES, "max_output_tokens": 3}).json()
    assert data["status"] == "incomplete" and data["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["output"][0]["content"][0]["text"] == "Echo: Explain"
    assert responses_usage(data) == (PROMPT_TOKENS, 3)


def test_a_response_stream_carries_its_usage_in_response_completed(free: httpx.Client) -> None:
    response = free.post("/responses", json={**RESPONSES, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    seen = events(response.text)
    names = [name for name, _ in seen]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(payload["type"] == name for name, payload in seen)
    assert [p["sequence_number"] for _, p in seen] == list(range(len(seen)))
    deltas = [p["delta"] for name, p in seen if name == "response.output_text.delta"]
    assert "".join(deltas) == ANSWER and len(deltas) == ANSWER_TOKENS
    assert seen[0][1]["response"]["usage"] is None
    final = seen[-1][1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == ANSWER
    assert responses_usage(final) == (PROMPT_TOKENS, ANSWER_TOKENS)
    assert "[DONE]" not in response.text


def test_a_response_stream_cut_by_max_output_tokens_ends_incomplete(free: httpx.Client) -> None:
    seen = events(free.post("/responses", json={**RESPONSES, "max_output_tokens": 2, "stream": True}).text)
    assert seen[-1][0] == "response.incomplete"
    assert responses_usage(seen[-1][1]["response"]) == (PROMPT_TOKENS, 2)


def test_responses_tool_calls_and_their_results(free: httpx.Client) -> None:
    tool = {"type": "function", "name": WEATHER["name"], "parameters": WEATHER["schema"], "strict": True}
    body = {"model": "sandbox/small", "input": "Weather in Paris for 3 days?", "tools": [tool]}
    data = free.post("/responses", json=body).json()
    [call] = data["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert json.loads(call["arguments"]) == {"city": "Weather in Paris for 3 days?", "days": 3}
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    streamed = events(free.post("/responses", json={**body, "stream": True}).text)
    arguments = "".join(p["delta"] for name, p in streamed if name == "response.function_call_arguments.delta")
    assert arguments == call["arguments"]
    assert streamed[-1][1]["response"]["output"][0]["arguments"] == call["arguments"]
    assert responses_usage(streamed[-1][1]["response"]) == responses_usage(data)
    follow_up = {
        **body,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris for 3 days?"}]},
            {k: call[k] for k in ("type", "call_id", "name", "arguments")},
            {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"},
        ],
    }
    answer = free.post("/responses", json=follow_up).json()
    assert answer["output"][0]["content"][0]["text"] == "The tool returned: sunny"


def test_responses_structured_output_follows_its_schema(free: httpx.Client) -> None:
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER["schema"], "strict": True}
    body = {"model": "sandbox/small", "input": "Paris, 2 days", "text": {"format": fmt}}
    data = free.post("/responses", json=body).json()
    assert json.loads(data["output"][0]["content"][0]["text"]) == {"city": "Paris, 2 days", "days": 2}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "sandbox/small"}, "'input'"),
        ({**RESPONSES, "previous_response_id": "resp_1"}, "no conversation state"),
        ({**RESPONSES, "input": [{"type": "item_reference", "id": "x"}]}, "unsupported input item"),
        ({**RESPONSES, "tools": [{"type": "web_search"}]}, "only function tools"),
        ({**RESPONSES, "max_output_tokens": 0}, "max_output_tokens"),
        ({**RESPONSES, "reasoning": {"effort": "high"}}, "not supported"),
        ({**RESPONSES, "model": "nope"}, "Unknown model"),
    ],
)
def test_a_bad_responses_request_is_a_400_before_any_402(kit: Kit, body: dict[str, Any], says: str) -> None:
    response = kit.http.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert says in response.json()["message"]


# --- Anthropic Messages: answers -----------------------------------------------------------------------------------------


def test_a_message_answers_as_chat_completions_do_with_the_same_tokens(free: httpx.Client) -> None:
    data = free.post("/messages", json=MESSAGES).json()
    assert data["type"] == "message" and data["role"] == "assistant" and data["id"].startswith("msg_")
    assert data["content"] == [{"type": "text", "text": ANSWER}]
    assert data["stop_reason"] == "end_turn" and data["stop_sequence"] is None
    assert messages_usage(data) == (PROMPT_TOKENS, ANSWER_TOKENS)
    cut = free.post("/messages", json={**MESSAGES, "max_tokens": 3}).json()
    assert cut["stop_reason"] == "max_tokens" and messages_usage(cut) == (PROMPT_TOKENS, 3)


def test_a_message_stream_has_input_in_message_start_and_output_in_message_delta(free: httpx.Client) -> None:
    response = free.post("/messages", json={**MESSAGES, "stream": True})
    seen = events(response.text)
    names = [name for name, _ in seen]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = seen[0][1]["message"]["usage"]
    assert (start["input_tokens"], start["output_tokens"]) == (PROMPT_TOKENS, 1), "as Anthropic sends it"
    text = "".join(p["delta"]["text"] for name, p in seen if name == "content_block_delta")
    assert text == ANSWER
    delta = seen[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"] == {"output_tokens": ANSWER_TOKENS}
    assert "[DONE]" not in response.text


def test_message_tool_use_and_tool_result(free: httpx.Client) -> None:
    tool = {"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["schema"]}
    question = "Weather in Paris for 3 days?"
    body = {
        "model": "sandbox/small",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": question}],
        "tools": [tool],
    }
    data = free.post("/messages", json=body).json()
    [use] = data["content"]
    assert data["stop_reason"] == "tool_use"
    assert use["type"] == "tool_use" and use["name"] == "get_weather" and use["id"].startswith("toolu_")
    assert use["input"] == {"city": question, "days": 3}
    seen = events(free.post("/messages", json={**body, "stream": True}).text)
    assert seen[1][1]["content_block"] == {**use, "input": {}}
    partial = "".join(p["delta"]["partial_json"] for name, p in seen if name == "content_block_delta")
    assert json.loads(partial) == use["input"]
    assert seen[-2][1]["usage"]["output_tokens"] == data["usage"]["output_tokens"]
    follow_up = {
        **body,
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "sunny"}]},
        ],
    }
    answer = free.post("/messages", json=follow_up).json()
    assert answer["content"] == [{"type": "text", "text": "The tool returned: sunny"}]
    forced = free.post("/messages", json={**body, "tool_choice": {"type": "tool", "name": "get_weather"}}).json()
    assert forced["content"][0]["name"] == "get_weather"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({k: v for k, v in MESSAGES.items() if k != "max_tokens"}, "'max_tokens' is required"),
        ({**MESSAGES, "messages": []}, "'messages'"),
        ({**MESSAGES, "messages": [{"role": "system", "content": "x"}]}, "role"),
        ({**MESSAGES, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "not supported"),
        ({**MESSAGES, "messages": [{"role": "user", "content": [{"type": "document"}]}]}, "unsupported content"),
    ],
)
def test_a_bad_messages_request_is_a_400_before_any_402(kit: Kit, body: dict[str, Any], says: str) -> None:
    response = kit.http.post("/v1/messages", json=body)
    assert response.status_code == 400, response.text
    assert says in response.json()["message"]


# --- paid: every mount and dialect ---------------------------------------------------------------------------------------


def _usage_of(endpoint: str, response: httpx.Response, stream: bool) -> tuple[int, int]:
    if not stream:
        data = response.json()
        return responses_usage(data) if endpoint == "responses" else messages_usage(data)
    seen = events(response.text)
    if endpoint == "responses":
        return responses_usage(seen[-1][1]["response"])
    start = next(p for name, p in seen if name == "message_start")["message"]["usage"]
    delta = next(p for name, p in seen if name == "message_delta")["usage"]
    return start["input_tokens"], delta["output_tokens"]


@pytest.mark.parametrize("mount", PAID_MOUNTS)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["responses", "messages"])
def test_exact_payment_in_every_dialect(kit: Kit, mount: str, stream: bool, endpoint: str) -> None:
    body = {**(RESPONSES if endpoint == "responses" else MESSAGES), "stream": stream}
    path = f"{mount}/v1/{endpoint}"
    quote = Kit.price(kit.http.post(path, json=body))
    assert quote == token_cost(kit.config.models[0], PROMPT_TOKENS, 32)
    account = kit.wallet()
    response = kit.pay(path, body, account)
    assert response.status_code == 200, response.text
    assert _usage_of(endpoint, response, stream) == (PROMPT_TOKENS, ANSWER_TOKENS)
    assert FUNDS - kit.usdc(account.address) == quote, "exact: the quoted price"
    [settlement] = kit.settlements(account.address)
    assert settlement["amount"] == quote


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["responses", "messages"])
def test_upto_payment_settles_the_metered_cost(kit: Kit, stream: bool, endpoint: str) -> None:
    if endpoint == "responses":
        body = {**RESPONSES, "max_output_tokens": 400, "stream": stream}
    else:
        body = {**MESSAGES, "max_tokens": 400, "stream": stream}
    path = f"/upto/v1/{endpoint}"
    challenge = kit.http.post(path, json=body)
    offer = offers(challenge)["upto"]
    account = kit.wallet()
    header = upto_header(account, offer, str(challenge.request.url))
    response = kit.http.post(path, json=body, headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 200, response.text
    charged = FUNDS - kit.usdc(account.address)
    metered = token_cost(kit.config.models[0], *_usage_of(endpoint, response, stream))
    assert charged == metered < int(offer["amount"]), "upto: the metered cost, below the 400-token ceiling"
    if not stream:
        assert int(unb64(response.headers["payment-response"])["amount"]) == charged
        return
    assert "payment-response" not in response.headers
    seen = events(response.text)
    last = "response.completed" if endpoint == "responses" else "message_stop"
    assert [name for name, _ in seen[-2:]] == [":", last], "the settlement comment just before the last event"
    report = unb64(seen[-2][1].removeprefix("payment-response "))
    assert int(report["amount"]) == charged and report["payer"] == account.address


@pytest.mark.parametrize("endpoint", ["responses", "messages"])
def test_a_cut_stream_sends_no_final_usage(kit: Kit, endpoint: str) -> None:
    body = {**(RESPONSES if endpoint == "responses" else MESSAGES), "stream": True}
    with (
        kit.http.stream(
            "POST", f"/free/v1/{endpoint}", json=body, headers={"X-Sandbox-Fault": "stream_cut=2"}
        ) as response,
        pytest.raises(httpx.HTTPError),
    ):
        response.read()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["responses", "messages"])
def test_credit_mode_charges_the_key_by_usage(kit: Kit, stream: bool, endpoint: str) -> None:
    account, key = kit.credit_wallet(1)

    def available() -> int:
        return int(kit.http.get(f"/v1/balance/{account.address}").json()["available_usdc"])

    before = available()
    body = {**(RESPONSES if endpoint == "responses" else MESSAGES), "stream": stream}
    response = kit.http.post(f"/v1/{endpoint}", json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    assert int(response.headers["x-sandbox-charge-reserved"]) == token_cost(kit.config.models[0], PROMPT_TOKENS, 32)
    assert before - available() == token_cost(kit.config.models[0], PROMPT_TOKENS, ANSWER_TOKENS)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["responses", "messages"])
def test_aisa_reports_its_cost_in_each_apis_usage(kit: Kit, stream: bool, endpoint: str) -> None:
    key = kit.http.post("/sandbox/aisa/keys", json={"credits_usd": 1}).json()["key"]
    body = {**(RESPONSES if endpoint == "responses" else MESSAGES), "stream": stream}
    response = kit.http.post(f"/aisa/v1/{endpoint}", json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    cost = token_cost(kit.config.models[0], PROMPT_TOKENS, ANSWER_TOKENS) / 1_000_000
    if not stream:
        usage = response.json()["usage"]
    else:
        seen = events(response.text)
        usage = seen[-1][1]["response"]["usage"] if endpoint == "responses" else seen[-2][1]["usage"]
    assert usage["cost"] == pytest.approx(cost) and usage["credits_remaining"] == pytest.approx(1 - cost)


@pytest.mark.parametrize("endpoint", ["responses", "messages"])
def test_aisa_without_a_key_pays_per_call(kit: Kit, endpoint: str) -> None:
    body = RESPONSES if endpoint == "responses" else MESSAGES
    account = kit.wallet()
    response = kit.pay(f"/aisa/v1/{endpoint}", body, account)
    assert response.status_code == 200, response.text
    assert FUNDS - kit.usdc(account.address) == token_cost(kit.config.models[0], PROMPT_TOKENS, 32)
