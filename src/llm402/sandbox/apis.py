"""The OpenAI Responses API and Anthropic Messages on the scripted models.

Each request is read into the chat form (`ChatRequest`) and answered by the same scripted model as a chat
completion (echo, truncation, tools, structured output), so both APIs give the same answers and the same token counts
as ``/v1/chat/completions`` for the same conversation. What differs is the wire:

- ``POST /v1/responses``: ``instructions`` + ``input`` (a string, or messages, ``function_call`` and
  ``function_call_output`` items), flat function ``tools``, ``max_output_tokens``, ``text.format``; the answer is a
  ``response`` object with ``usage.input_tokens`` / ``output_tokens`` (``input_tokens_details``: no cache, 0s);
  a stream is ``event:``/``data:`` events from ``response.created`` to ``response.completed`` (``.incomplete`` when
  cut by ``max_output_tokens``), whose ``response.usage`` is the usage. No conversation state is kept
  (``previous_response_id`` is refused).
- ``POST /v1/messages``: ``system`` + ``messages`` with content blocks (text, image, ``tool_use``, ``tool_result``),
  ``tools`` with ``input_schema``, ``max_tokens`` (required); the answer is a ``message`` with
  ``usage.input_tokens`` / ``output_tokens`` (cache fields: 0); a stream is ``message_start`` (``message.usage``:
  the input tokens and ``output_tokens: 1``, as Anthropic sends it), content blocks, ``message_delta`` (``usage``:
  the cumulative output tokens) and ``message_stop``.

Stream event kinds (see `StreamEvent`): deltas are ``content`` (one token each); the event that carries the final
usage is ``usage`` (Anthropic's ``message_delta``) or ``final`` (the Responses API's terminal event, which also ends
the stream); ``message_stop`` is ``done``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping
from typing import Any

from .config import SandboxConfig
from .models import (
    BadRequest,
    ChatRequest,
    Generation,
    StreamEvent,
    check_model,
    count_tokens,
    prompt_tokens,
    reject_thinking,
)


def sse_event(name: str, payload: Mapping[str, Any]) -> bytes:
    """``event: <name>\\ndata: <json>\\n\\n`` (both APIs name their events)."""
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def parse_sse(data: bytes) -> tuple[str | None, Any]:
    """The event name (if any) and the JSON of one ``data:`` event written by `sse_event` or ``models.sse``."""
    name: str | None = None
    lines: list[str] = []
    for line in data.decode().splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            lines.append(line[5:].strip())
    return name, json.loads("\n".join(lines))


def encode_sse(name: str | None, payload: Mapping[str, Any]) -> bytes:
    """The inverse of `parse_sse`."""
    if name is not None:
        return sse_event(name, payload)
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def usage_object(payload: Any) -> dict[str, Any] | None:
    """The usage dict of an answer or stream event of any API the sandbox serves (to add AIsa's cost to)."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if isinstance(usage, dict):
        return usage
    response = payload.get("response")
    if isinstance(response, dict) and isinstance(response.get("usage"), dict):
        found: dict[str, Any] = response["usage"]
        return found
    return None


def _stream_flag(body: Mapping[str, Any]) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    return stream


def _budget(config: SandboxConfig, value: Any, name: str) -> int:
    if value is None:
        return config.default_max_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{name} must be a positive integer")
    return value


def _checked(config: SandboxConfig, request: ChatRequest, name: str) -> ChatRequest:
    if request.prompt_tokens + request.max_tokens > request.spec.context_length:
        raise BadRequest(
            f"prompt ({request.prompt_tokens}) + {name} ({request.max_tokens}) exceeds the context length "
            f"{request.spec.context_length}"
        )
    return request


def _id(prefix: str, *parts: object) -> str:
    return prefix + hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:24]


# --- the Responses API -------------------------------------------------------------------------------------------


def _response_content(content: Any) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("a message's content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, Mapping):
            raise BadRequest("content parts must be objects")
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise BadRequest("a text part needs 'text'")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal", ""))})
        elif kind == "input_image":
            parts.append({"type": "input_image"})
        else:
            raise BadRequest(f"unsupported content part type {str(kind)[:40]!r}")
    return parts


def _output_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return " ".join(str(p.get("text", "")) for p in output if isinstance(p, Mapping))
    raise BadRequest("a function_call_output needs 'output'")


def _response_items(items: list[Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, Mapping):
            raise BadRequest("every input item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest("every message needs a role: user, assistant, system or developer")
            messages.append(
                {"role": "system" if role == "developer" else role, "content": _response_content(item.get("content"))}
            )
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise BadRequest("a function_call needs 'name' and 'call_id'")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": str(item.get("arguments", ""))},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": _output_text(item.get("output"))}
            )
        elif kind == "reasoning":
            continue
        else:
            raise BadRequest(f"unsupported input item type {str(kind)[:40]!r}")
    return messages


def _response_tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array")
    converted: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise BadRequest("only function tools with a 'name' are supported")
        converted.append({"type": "function", "function": {"name": tool["name"], "parameters": tool.get("parameters")}})
    return converted


def _response_tool_choice(choice: Any) -> Any:
    if isinstance(choice, Mapping):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        raise BadRequest("tool_choice must be none, auto, required or a function")
    return choice


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, Mapping) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    if kind in ("json_object", "text"):
        return {"type": kind}
    raise BadRequest("text.format must be text, json_object or json_schema")


def read_responses_request(config: SandboxConfig, body: Any) -> ChatRequest:
    """Validate a ``POST /v1/responses`` body and read it as a chat. Raises `BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    spec = check_model(config, body.get("model"))
    reject_thinking(body)
    reasoning = body.get("reasoning")
    if isinstance(reasoning, Mapping) and reasoning.get("effort") is not None:
        raise BadRequest("Thinking/reasoning models are not supported")
    if body.get("previous_response_id") is not None or body.get("conversation") is not None:
        raise BadRequest("the sandbox keeps no conversation state: send the whole input")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string")
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list) and raw:
        messages += _response_items(raw)
    else:
        raise BadRequest("'input' must be a string or a non-empty array of items")
    chat: dict[str, Any] = {"model": spec.id, "messages": messages}
    tools = _response_tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _response_tool_choice(body["tool_choice"])
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    budget = _budget(config, body.get("max_output_tokens"), "max_output_tokens")
    request = ChatRequest(spec, chat, messages, budget, _stream_flag(body), False, prompt_tokens(messages))
    request.extra["source"] = body
    return _checked(config, request, "max_output_tokens")


def response_usage(gen: Generation) -> dict[str, Any]:
    """The Responses API's ``usage``."""
    return {
        "input_tokens": gen.prompt_tokens,
        "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": 0},
        "output_tokens": gen.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, gen: Generation, status: str) -> dict[str, Any]:
    assert gen.call is not None
    arguments = gen.call.arguments if status == "completed" else ""
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": gen.call.id,
        "name": gen.call.name,
        "arguments": arguments,
        "status": status,
    }


def _response(
    request: ChatRequest, response_id: str, created: int, status: str, output: list[dict[str, Any]], usage: Any
) -> dict[str, Any]:
    source: Mapping[str, Any] = request.extra["source"]
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": source.get("instructions"),
        "max_output_tokens": source.get("max_output_tokens"),
        "model": request.spec.id,
        "output": output,
        "parallel_tool_calls": source.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": source.get("temperature", 1.0),
        "text": source.get("text") or {"format": {"type": "text"}},
        "tool_choice": source.get("tool_choice", "auto"),
        "tools": source.get("tools") or [],
        "top_p": source.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": source.get("metadata") or {},
    }


def _ids(gen: Generation, response_id: str) -> str:
    return _id("fc_" if gen.kind != "text" else "msg_", response_id)


def response_object(gen: Generation, request: ChatRequest, response_id: str, created: int) -> dict[str, Any]:
    """The non-streamed ``response`` object."""
    item_id = _ids(gen, response_id)
    item = (
        _message_item(item_id, gen.content, "completed")
        if gen.kind == "text"
        else _call_item(item_id, gen, "completed")
    )
    status = "incomplete" if gen.finish_reason == "length" else "completed"
    return _response(request, response_id, created, status, [item], response_usage(gen))


def responses_stream(gen: Generation, request: ChatRequest, response_id: str, created: int) -> Iterator[StreamEvent]:
    """The Responses API's stream events, ``response.created`` to ``response.completed`` / ``.incomplete``."""
    sequence = itertools.count()

    def event(payload: dict[str, Any], tokens: int = 0, kind: Any = "other") -> StreamEvent:
        payload["sequence_number"] = next(sequence)
        return StreamEvent(sse_event(payload["type"], payload), tokens, kind)

    opening = _response(request, response_id, created, "in_progress", [], None)
    yield event({"type": "response.created", "response": opening})
    yield event({"type": "response.in_progress", "response": opening})
    item_id = _ids(gen, response_id)
    where = {"item_id": item_id, "output_index": 0}
    if gen.kind == "text":
        yield event(
            {"type": "response.output_item.added", "output_index": 0, "item": _message_item(item_id, "", "in_progress")}
        )
        empty = {"type": "output_text", "text": "", "annotations": []}
        yield event({"type": "response.content_part.added", **where, "content_index": 0, "part": empty})
        for piece in gen.pieces:
            delta = {"type": "response.output_text.delta", **where, "content_index": 0, "delta": piece, "logprobs": []}
            yield event(delta, 1 if piece else 0, "content")
        text = gen.content
        yield event({"type": "response.output_text.done", **where, "content_index": 0, "text": text, "logprobs": []})
        part = {"type": "output_text", "text": text, "annotations": []}
        yield event({"type": "response.content_part.done", **where, "content_index": 0, "part": part})
        item = _message_item(item_id, text, "completed")
    else:
        assert gen.call is not None
        added = {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": _call_item(item_id, gen, "in_progress"),
        }
        yield event(added, count_tokens(gen.call.name), "content")
        for piece in gen.pieces:
            yield event({"type": "response.function_call_arguments.delta", **where, "delta": piece}, 1, "content")
        done = {
            "type": "response.function_call_arguments.done",
            **where,
            "arguments": gen.call.arguments,
            "name": gen.call.name,
        }
        yield event(done)
        item = _call_item(item_id, gen, "completed")
    yield event({"type": "response.output_item.done", "output_index": 0, "item": item})
    status = "incomplete" if gen.finish_reason == "length" else "completed"
    final = _response(request, response_id, created, status, [item], response_usage(gen))
    yield event({"type": f"response.{status}", "response": final}, 0, "final")


# --- Anthropic Messages --------------------------------------------------------------------------------------------


def _block_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise BadRequest("a tool_result's content must be a string or a list of blocks")
    return " ".join(str(b.get("text", "")) for b in content if isinstance(b, Mapping) and b.get("type") == "text")


def _anthropic_message(message: Any) -> list[dict[str, Any]]:
    if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
        raise BadRequest("every message needs a role: user or assistant")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest("a message's content must be a string or a list of blocks")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append({"type": "image"})
        elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str):
            arguments = json.dumps(block.get("input") or {}, separators=(",", ":"))
            calls.append(
                {"id": block.get("id"), "type": "function", "function": {"name": block["name"], "arguments": arguments}}
            )
        elif kind == "tool_result" and role == "user":
            results.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": _block_text(block.get("content"))}
            )
        else:
            raise BadRequest(f"unsupported content block {str(kind)[:40]!r} in a {role} message")
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": parts or None}
        if calls:
            out["tool_calls"] = calls
        return [out]
    return [*results, *([{"role": "user", "content": parts}] if parts else [])]


def _anthropic_tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array")
    converted: list[dict[str, Any]] = []
    for tool in tools:
        if (
            not isinstance(tool, Mapping)
            or not isinstance(tool.get("name"), str)
            or tool.get("type", "custom") != "custom"
        ):
            raise BadRequest("only client tools with a 'name' and an 'input_schema' are supported")
        converted.append(
            {"type": "function", "function": {"name": tool["name"], "parameters": tool.get("input_schema")}}
        )
    return converted


def _anthropic_tool_choice(choice: Any) -> Any:
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    raise BadRequest("tool_choice.type must be auto, any, tool or none")


def read_messages_request(config: SandboxConfig, body: Any) -> ChatRequest:
    """Validate a ``POST /v1/messages`` body and read it as a chat. Raises `BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    spec = check_model(config, body.get("model"))
    reject_thinking(body)
    if "max_tokens" not in body:
        raise BadRequest("'max_tokens' is required")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty array")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        if not isinstance(system, str | list):
            raise BadRequest("'system' must be a string or a list of text blocks")
        messages.append({"role": "system", "content": _block_text(system)})
    for message in raw:
        messages += _anthropic_message(message)
    chat: dict[str, Any] = {"model": spec.id, "messages": messages}
    tools = _anthropic_tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    choice = _anthropic_tool_choice(body.get("tool_choice"))
    if choice is not None:
        chat["tool_choice"] = choice
    budget = _budget(config, body["max_tokens"], "max_tokens")
    request = ChatRequest(spec, chat, messages, budget, _stream_flag(body), False, prompt_tokens(messages))
    request.extra["source"] = body
    return _checked(config, request, "max_tokens")


def messages_usage(gen: Generation) -> dict[str, int]:
    """Anthropic's ``usage`` (the sandbox has no prompt cache: its cache fields are 0)."""
    return {
        "input_tokens": gen.prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": gen.completion_tokens,
    }


def _stop_reason(gen: Generation) -> str:
    if gen.kind != "text":
        return "tool_use"
    return "max_tokens" if gen.finish_reason == "length" else "end_turn"


def _tool_use_id(gen: Generation) -> str:
    assert gen.call is not None
    return "toolu_" + gen.call.id.removeprefix("call_")


def message_object(gen: Generation, request: ChatRequest, message_id: str) -> dict[str, Any]:
    """The non-streamed ``message``."""
    if gen.kind == "text":
        content: list[dict[str, Any]] = [{"type": "text", "text": gen.content}]
    else:
        assert gen.call is not None
        content = [
            {
                "type": "tool_use",
                "id": _tool_use_id(gen),
                "name": gen.call.name,
                "input": json.loads(gen.call.arguments),
            }
        ]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": request.spec.id,
        "content": content,
        "stop_reason": _stop_reason(gen),
        "stop_sequence": None,
        "usage": messages_usage(gen),
    }


def messages_stream(gen: Generation, request: ChatRequest, message_id: str) -> Iterator[StreamEvent]:
    """Anthropic's stream: ``message_start`` ... ``message_delta`` (the usage), ``message_stop``."""

    def event(payload: dict[str, Any], tokens: int = 0, kind: Any = "other") -> StreamEvent:
        return StreamEvent(sse_event(payload["type"], payload), tokens, kind)

    opening: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": request.spec.id,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**messages_usage(gen), "output_tokens": 1},  # as Anthropic sends it: final only in message_delta
    }
    yield event({"type": "message_start", "message": opening})
    if gen.kind == "text":
        yield event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        yield event({"type": "ping"})
        for piece in gen.pieces:
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
            yield event(delta, 1 if piece else 0, "content")
    else:
        assert gen.call is not None
        block = {"type": "tool_use", "id": _tool_use_id(gen), "name": gen.call.name, "input": {}}
        yield event(
            {"type": "content_block_start", "index": 0, "content_block": block}, count_tokens(gen.call.name), "content"
        )
        yield event({"type": "ping"})
        for piece in gen.pieces:
            delta = {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": piece},
            }
            yield event(delta, 1, "content")
    yield event({"type": "content_block_stop", "index": 0})
    finish = {"stop_reason": _stop_reason(gen), "stop_sequence": None}
    yield event(
        {"type": "message_delta", "delta": finish, "usage": {"output_tokens": gen.completion_tokens}}, 0, "usage"
    )
    yield event({"type": "message_stop"}, 0, "done")
