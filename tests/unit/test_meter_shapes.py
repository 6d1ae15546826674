"""The meter reads every API shape the agent frameworks call, streamed and not, split anywhere; what it cannot read
is None (counted by the reservation), never zeros; and the estimate reads each shape's prompt and output budget.

The events are shaped as the APIs send them: the OpenAI Responses API (``event:`` + ``data:``, usage only under
``response.usage`` of the terminal event) and Anthropic Messages (input tokens in ``message_start``, cumulative output
in ``message_delta``)."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
from typing import Any

import pytest

from llm402 import metering
from llm402.metering import Usage, UsageMeter, usage_from_json, warn_unmetered
from llm402.pricing import DEFAULT_MAX_TOKENS, ModelPrice, estimate_cost, estimate_prompt_tokens, max_completion_tokens

# --- wire builders ------------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather and its usage notes",
    # a property named "usage" in a schema: an object that is not a usage, in every event that echoes the tools
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "usage": {"type": "string"}}},
    "strict": False,
}


def event(name: str, payload: dict[str, Any], crlf: bool = False) -> bytes:
    nl = b"\r\n" if crlf else b"\n"
    return b"event: " + name.encode() + nl + b"data: " + json.dumps(payload).encode() + nl + nl


def response_object(status: str, usage: dict[str, Any] | None, text: str = "") -> dict[str, Any]:
    output = (
        []
        if status == "in_progress"
        else [
            {
                "type": "message",
                "id": "msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
    )
    return {
        "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654",
        "object": "response",
        "created_at": 1741290958,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": "You are a helpful assistant.",
        "max_output_tokens": 64,
        "model": "gpt-4.1-2025-04-14",
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [WEATHER_TOOL],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


RESPONSES_USAGE = {
    "input_tokens": 311,
    "input_tokens_details": {"cached_tokens": 128},
    "output_tokens": 42,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 353,
}


def responses_stream(final: str = "response.completed", crlf: bool = False, cut_before_end: bool = False) -> bytes:
    words = ["Hi", " there", ",", " friend", "!"]
    item = "msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654"
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"type": "response.created", "response": response_object("in_progress", None)}),
        ("response.in_progress", {"type": "response.in_progress", "response": response_object("in_progress", None)}),
        (
            "response.output_item.added",
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {"id": item, "type": "message", "status": "in_progress", "role": "assistant", "content": []},
            },
        ),
        (
            "response.content_part.added",
            {
                "type": "response.content_part.added",
                "item_id": item,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
        ),
        *(
            (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "item_id": item,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": word,
                    "logprobs": [],
                },
            )
            for word in words
        ),
        (
            "response.output_text.done",
            {
                "type": "response.output_text.done",
                "item_id": item,
                "output_index": 0,
                "content_index": 0,
                "text": "".join(words),
                "logprobs": [],
            },
        ),
    ]
    status = final.removeprefix("response.")
    if not cut_before_end:
        events.append((final, {"type": final, "response": response_object(status, RESPONSES_USAGE, "".join(words))}))
    return b"".join(event(name, {**payload, "sequence_number": i}, crlf) for i, (name, payload) in enumerate(events))


MESSAGES_START_USAGE = {
    "input_tokens": 311,
    "cache_creation_input_tokens": 1024,
    "cache_read_input_tokens": 2048,
    "output_tokens": 1,
}


def messages_stream(crlf: bool = False, upto: str = "message_stop", delta_usage: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-sonnet-4-5",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": MESSAGES_START_USAGE,
    }
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": message}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
        *(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
            )
            for t in ["Hello", "!", ' "usage": {} is only text']
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": delta_usage or {"output_tokens": 15},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    names = [name for name, _ in events]
    kept = events[: names.index(upto) + 1]
    return b"".join(event(name, payload, crlf) for name, payload in kept)


def read(wire: bytes, cuts: list[int], **kw: Any) -> tuple[bytes, UsageMeter]:
    meter = UsageMeter(streaming=True, **kw)
    points = sorted({0, len(wire), *(c for c in cuts if 0 < c < len(wire))})
    out = b"".join(meter.feed(wire[a:b]) for a, b in itertools.pairwise(points)) + meter.finish()
    return out, meter


def tokens(usage: Usage | None) -> tuple[int, int] | None:
    return None if usage is None else (usage.prompt_tokens, usage.completion_tokens)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metering, "_warned", set())


# --- the Responses API -----------------------------------------------------------------------------------------------


def test_a_responses_answer_is_read_with_its_cached_tokens() -> None:
    body = json.dumps(response_object("completed", RESPONSES_USAGE, "Hi there")).encode()
    meter = UsageMeter(streaming=False)
    for i in range(0, len(body), 50):
        assert meter.feed(body[i : i + 50]) == body[i : i + 50]
    meter.finish()
    assert meter.usage == Usage(311, 42, cached_tokens=128)  # cached tokens are part of input_tokens


@pytest.mark.parametrize("crlf", [False, True])
def test_a_responses_stream_is_read_from_its_completed_event_at_every_split(crlf: bool) -> None:
    wire = responses_stream(crlf=crlf)
    for split in range(len(wire) + 1):
        out, meter = read(wire, [split], strip_usage_event=True)
        assert out == wire, "no event of the Responses API is stripped or altered"
        assert tokens(meter.usage) == (311, 42), split
        assert meter.usage is not None and meter.usage.cached_tokens == 128
        assert meter.done
    out, meter = read(wire, list(range(len(wire))))  # one byte at a time
    assert out == wire and tokens(meter.usage) == (311, 42)


@pytest.mark.parametrize("final", ["response.incomplete", "response.failed"])
def test_a_responses_stream_ending_otherwise_still_counts_its_usage(final: str) -> None:
    _, meter = read(responses_stream(final), [100, 2000])
    assert tokens(meter.usage) == (311, 42)
    assert meter.done


def test_a_responses_stream_cut_before_its_end_has_no_usage() -> None:
    wire = responses_stream(cut_before_end=True)
    _, meter = read(wire, [777])
    assert meter.usage is None, "counted by its reservation, not as 0"
    assert not meter.done


# --- Anthropic Messages ------------------------------------------------------------------------------------------------


def test_an_anthropic_answer_adds_its_cache_reads_and_writes_to_the_input() -> None:
    body = {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "tool_use", "id": "toolu_01", "name": "log", "input": {"usage": {"n": 1}}}],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 311,
            "cache_creation_input_tokens": 1024,
            "cache_read_input_tokens": 2048,
            "cache_creation": {"ephemeral_5m_input_tokens": 1024, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 15,
            "service_tier": "standard",
        },
    }
    meter = UsageMeter(streaming=False)
    meter.feed(json.dumps(body).encode())
    meter.finish()
    assert meter.usage == Usage(311 + 1024 + 2048, 15, cached_tokens=2048, cache_write_tokens=1024)


@pytest.mark.parametrize("crlf", [False, True])
def test_an_anthropic_stream_joins_message_start_and_message_delta_at_every_split(crlf: bool) -> None:
    wire = messages_stream(crlf)
    for split in range(len(wire) + 1):
        out, meter = read(wire, [split], strip_usage_event=True)
        assert out == wire, "no event of Anthropic's stream is stripped or altered"
        assert tokens(meter.usage) == (311 + 1024 + 2048, 15), split  # not message_start's output_tokens: 1
        assert meter.done
    out, meter = read(wire, list(range(len(wire))))
    assert out == wire and tokens(meter.usage) == (3383, 15)


@pytest.mark.parametrize("upto", ["message_start", "content_block_delta", "content_block_stop"])
def test_an_anthropic_stream_cut_before_message_delta_has_no_usage(upto: str) -> None:
    _, meter = read(messages_stream(upto=upto), [40])
    assert meter.usage is None, "the input alone is not the call's usage: counted by its reservation"
    assert not meter.done


def test_an_anthropic_message_delta_with_cumulative_input_counts_overrides_message_start() -> None:
    delta = {"input_tokens": 400, "cache_creation_input_tokens": None, "cache_read_input_tokens": 0, "output_tokens": 9}
    _, meter = read(messages_stream(delta_usage=delta), [])
    assert tokens(meter.usage) == (400 + 1024 + 0, 9)  # a null keeps message_start's count


def test_a_message_delta_without_message_start_is_not_read_as_zero_input() -> None:
    wire = messages_stream()
    start = wire.index(b"event: content_block_start")
    _, meter = read(wire[start:], [])
    assert meter.usage is None


def test_a_gzipped_anthropic_stream_is_read() -> None:
    wire = messages_stream()
    packed = gzip.compress(wire)
    meter = UsageMeter(streaming=True, content_encoding="gzip")
    out = b"".join(meter.feed(packed[i : i + 9]) for i in range(0, len(packed), 9)) + meter.finish()
    assert out == packed
    assert tokens(meter.usage) == (3383, 15)


# --- the fast path ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("wire", "parsed"), [(responses_stream(), 3), (messages_stream(), 2)])
def test_only_events_that_can_hold_usage_are_parsed(wire: bytes, parsed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole events per chunk (how servers flush): deltas pass unparsed; only events with a usage object are read
    (Responses: the tools' schema echo in response.created and the completed event; Anthropic: start and delta)."""
    calls: list[bytes] = []
    original = UsageMeter._event

    def counting(self: UsageMeter, block: bytes) -> bool:
        calls.append(block)
        return original(self, block)

    monkeypatch.setattr(UsageMeter, "_event", counting)
    chunks = [c + b"\n\n" for c in wire.split(b"\n\n") if c]
    meter = UsageMeter(streaming=True)
    assert b"".join(meter.feed(c) for c in chunks) + meter.finish() == wire
    assert len(calls) == parsed
    assert meter.usage is not None


# --- what cannot be read ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"usage": {}},
        {"usage": {"total_tokens": 50}},
        {"usage": {"output_tokens": 15}},  # no input count
        {"usage": {"prompt_tokens": None, "completion_tokens": 3}},
        {"usageMetadata": {"candidatesTokenCount": 3}},
    ],
)
def test_a_usage_without_an_input_count_is_none_not_zero(data: dict[str, Any]) -> None:
    assert usage_from_json(data) is None


def test_a_usage_with_only_a_cost_is_read() -> None:
    usage = usage_from_json({"usage": {"cost": "0.0025"}})
    assert usage is not None and str(usage.cost_usd) == "0.0025"


def test_gemini_thinking_tokens_are_counted_as_output() -> None:
    meta = {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 100, "cachedContentTokenCount": 4}
    assert usage_from_json({"usageMetadata": meta}) == Usage(10, 105, cached_tokens=4)


def test_a_responses_answer_without_usage_is_none_despite_a_usage_property_in_its_tools(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = json.dumps(response_object("completed", None, "Hi")).encode()  # a gateway that drops usage
    caplog.set_level(logging.WARNING, logger="llm402")
    for _ in range(3):
        meter = UsageMeter(streaming=False)
        meter.feed(body)
        meter.finish()
        assert meter.usage is None, "not the tool schema's 'usage' property, and not zeros: the reservation counts"
    warnings = [r.getMessage() for r in caplog.records if "no token usage" in r.getMessage()]
    assert len(warnings) == 1, "one warning, not one per call"
    assert "JSON answer (response)" in warnings[0] and "reservation" in warnings[0]


def test_a_stream_without_usage_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llm402")
    for _ in range(2):
        _, meter = read(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n', [])
        assert meter.usage is None and meter.done
    assert sum("streamed answer" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":{"message":"bad","type":"invalid_request_error"}}',
        b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        b'{"error":"VALIDATION_ERROR","message":"max_tokens must be a positive integer"}',
        b'{"object":"list","data":[{"id":"sandbox/small","object":"model"}]}',
        b"",
    ],
)
def test_errors_listings_and_empty_bodies_do_not_warn(body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llm402")
    for streaming in (False, True):
        meter = UsageMeter(streaming=streaming)
        meter.feed(body)
        meter.finish()
        assert meter.usage is None
    assert not [r for r in caplog.records if "no token usage" in r.getMessage()]


def test_warn_unread_off_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llm402")
    meter = UsageMeter(streaming=False, warn_unread=False)
    meter.feed(b'{"created":1,"data":[{"b64_json":"AAAA"}]}')
    meter.finish()
    assert meter.usage is None
    assert not caplog.records
    warn_unmetered("images answer")
    warn_unmetered("images answer")
    assert len(caplog.records) == 1


# --- estimates ---------------------------------------------------------------------------------------------------------

PRICE = ModelPrice.from_usd("0.15", "0.60")
PROMPT = "word " * 400  # 2,000 bytes


def test_max_output_tokens_bounds_a_responses_reservation() -> None:
    body = {"model": "m", "input": "Say hi", "max_output_tokens": 16}
    assert max_completion_tokens(body) == 16
    assert estimate_cost(PRICE, body) == PRICE.cost(estimate_prompt_tokens(body), 16)
    assert max_completion_tokens({"model": "m", "input": "hi"}) == DEFAULT_MAX_TOKENS
    assert max_completion_tokens({"model": "m", "max_tokens": 64, "messages": []}) == 64  # Anthropic's field


def test_a_responses_prompt_is_estimated_from_its_instructions_and_input_items() -> None:
    as_string = {"model": "m", "instructions": "Be brief.", "input": PROMPT}
    assert estimate_prompt_tokens(as_string) >= 2000 + len("Be brief.")
    items = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": PROMPT},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": PROMPT}]},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": json.dumps({"city": PROMPT}),
            },
            {"type": "function_call_output", "call_id": "call_1", "output": PROMPT},
            {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
        ],
        "tools": [WEATHER_TOOL],
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
    }
    estimate = estimate_prompt_tokens(items)
    assert estimate >= 4 * 2000 + 1600 + len(json.dumps(WEATHER_TOOL)) // 2
    old_style = sum(8 for _ in items["input"])  # before: 8 tokens per item, whatever it held
    assert estimate > 100 * old_style


def test_an_anthropic_prompt_is_estimated_from_system_and_content_blocks() -> None:
    body = {
        "model": "m",
        "max_tokens": 16,
        "system": [{"type": "text", "text": PROMPT, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": PROMPT},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": PROMPT}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": PROMPT}]}
                ],
            },
        ],
    }
    assert estimate_prompt_tokens(body) >= 4 * 2000 + 1600
    assert estimate_cost(PRICE, body) == PRICE.cost(estimate_prompt_tokens(body), 16)


def test_embedding_token_arrays_count_one_token_per_id() -> None:
    assert estimate_prompt_tokens({"model": "m", "input": [[1, 2, 3] * 100, [4] * 50]}) == 350
    assert estimate_prompt_tokens({"model": "m", "input": list(range(70))}) == 70
    assert estimate_prompt_tokens({"model": "m", "input": ["ab", "cde"]}) == 5


def test_an_mpp_payment_receipt_event_is_read_and_removed_from_the_stream() -> None:
    import json as _json

    from llm402.metering import UsageMeter

    chunk = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    receipt = b'event: payment-receipt\ndata: {"status":"success","method":"evm","reference":"0xabc"}\n\n'
    stream = chunk + receipt + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        meter = UsageMeter(streaming=True)
        out = meter.feed(stream[:cut]) + meter.feed(stream[cut:]) + meter.finish()
        assert out == chunk + b"data: [DONE]\n\n", cut
        assert meter.receipt == _json.loads(receipt.split(b"data: ")[1])
