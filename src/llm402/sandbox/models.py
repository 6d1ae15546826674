"""Scripted deterministic models: the tokenizer, prices, and what each endpoint answers.

Tokens are regex tokens ``\\w+|[^\\w\\s]``; a chat prompt costs those of every text part (and tool-call names and
arguments) + 4 per message + 85 per image part. The answer to a chat is ``"Echo: " + last user text`` truncated to
``max_tokens`` tokens (``finish_reason: "length"`` when cut), preceded by ``"Saw N image(s). "`` when images came in;
tools, legacy functions and ``response_format`` are answered from their JSON schemas. Usage is exact: it counts
what was answered (a tool call's tokens are capped at ``max_tokens``, which is what the caller is billed at most).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import ModelSpec, SandboxConfig

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_INT_RE = re.compile(r"-?\d+")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
MESSAGE_OVERHEAD = 4
IMAGE_TOKENS = 85
EMBEDDING_DIMENSIONS = 16
IMAGE_PART_TYPES = frozenset({"image_url", "image", "input_image"})
MAX_SCHEMA_DEPTH = 12


class BadRequest(ValueError):
    """A request the gateway rejects with 400 VALIDATION_ERROR."""


# --- tokens and prices ----------------------------------------------------------------------------------------


def count_tokens(text: str) -> int:
    """Regex tokens of ``text``."""
    return len(TOKEN_RE.findall(text))


def token_pieces(text: str) -> list[str]:
    """``text`` cut after every token, so that ``"".join(pieces)`` is ``text`` minus trailing whitespace."""
    pieces: list[str] = []
    start = 0
    for match in TOKEN_RE.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    return pieces


def content_text(content: Any) -> tuple[str, int]:
    """The text of a message ``content`` (a string or parts) and how many image parts it holds."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts")
    texts: list[str] = []
    images = 0
    for part in content:
        if not isinstance(part, Mapping):
            raise BadRequest("content parts must be objects")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest("a text part needs 'text'")
            texts.append(text)
        elif kind in IMAGE_PART_TYPES:
            images += 1
        else:
            raise BadRequest(f"unsupported content part type {str(kind)[:40]!r}")
    return " ".join(texts), images


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens of a chat: text tokens + 4 per message + 85 per image part."""
    total = 0
    for message in messages:
        text, images = content_text(message.get("content"))
        total += MESSAGE_OVERHEAD + count_tokens(text) + IMAGE_TOKENS * images
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                total += count_tokens(str(function.get("name", ""))) + count_tokens(str(function.get("arguments", "")))
        legacy = message.get("function_call")
        if isinstance(legacy, Mapping):
            total += count_tokens(str(legacy.get("name", ""))) + count_tokens(str(legacy.get("arguments", "")))
    return total


def _scaled(numerator: int, denominator: int, markup_bps: int) -> int:
    return -(-numerator * (10_000 + markup_bps) // (denominator * 10_000))


def token_cost(spec: ModelSpec, prompt: int, completion: int, markup_bps: int = 0) -> int:
    """``ceil((prompt*prompt_price + completion*completion_price) / 1M * (1 + markup))`` in micro-USDC."""
    numerator = prompt * spec.prompt_micro_per_1m + completion * spec.completion_micro_per_1m
    return _scaled(numerator, 1_000_000, markup_bps)


def flat_cost(micro: int, markup_bps: int = 0) -> int:
    """A fixed price with the markup, rounded up."""
    return _scaled(micro, 1, markup_bps)


def models_listing(config: SandboxConfig) -> dict[str, Any]:
    """``GET /v1/models`` (prices are USD per 1M tokens, the table's decimals as JSON numbers)."""
    return {"object": "list", "data": [model_entry(spec) for spec in config.models]}


def model_entry(spec: ModelSpec) -> dict[str, Any]:
    """One model of the listing, in the Token Kiosk's shape."""
    return {
        "id": spec.id,
        "object": "model",
        "name": spec.name,
        "provider": spec.provider,
        "owned_by": spec.provider,
        "contextLength": spec.context_length,
        "promptPricePer1MTokens": float(spec.prompt_price),
        "completionPricePer1M": float(spec.completion_price),
    }


# --- chat -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model makes."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Generation:
    """A scripted answer: text pieces (one per token) or one function/tool call, with exact usage."""

    kind: Literal["text", "tool_calls", "function_call"]
    pieces: list[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    call: ToolCall | None = None

    @property
    def content(self) -> str:
        """The answered text (tool calls: empty)."""
        return "".join(self.pieces) if self.kind == "text" else ""


@dataclass(slots=True)
class ChatRequest:
    """A validated chat request."""

    spec: ModelSpec
    body: dict[str, Any]
    messages: list[dict[str, Any]]
    max_tokens: int
    stream: bool
    include_usage: bool
    prompt_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


def check_model(config: SandboxConfig, model: Any) -> ModelSpec:
    """The price-table entry of ``model`` or 400."""
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required")
    spec = config.model(model)
    if spec is None:
        raise BadRequest(f"Unknown model: {model[:100]}")
    return spec


def _max_tokens(config: SandboxConfig, value: Any) -> int:
    if value is None:
        return config.default_max_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("max_tokens must be a positive integer")
    return value


def reject_thinking(body: Mapping[str, Any]) -> None:
    """``thinking`` / ``reasoning_effort`` are not supported (400)."""
    if "thinking" in body or "reasoning_effort" in body:
        raise BadRequest("Thinking/reasoning models are not supported")


def validate_chat(config: SandboxConfig, body: Any) -> ChatRequest:
    """Validate an OpenAI chat body. Raises `BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    spec = check_model(config, body.get("model"))
    reject_thinking(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("every message needs a 'role'")
    max_tokens = _max_tokens(config, body.get("max_tokens", body.get("max_completion_tokens")))
    n = body.get("n")
    if n not in (None, 1):
        raise BadRequest("only n=1 is supported")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    options = body.get("stream_options")
    include_usage = bool(isinstance(options, dict) and options.get("include_usage") is True)
    for name in ("tools", "functions"):
        if body.get(name) is not None and not isinstance(body.get(name), list):
            raise BadRequest(f"'{name}' must be an array")
    tokens = prompt_tokens(messages)
    if tokens + max_tokens > spec.context_length:
        raise BadRequest(
            f"prompt ({tokens}) + max_tokens ({max_tokens}) exceeds the context length {spec.context_length}"
        )
    return ChatRequest(spec, body, messages, max_tokens, stream, include_usage, tokens)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message ('' when none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))[0]
    return ""


def _image_count(messages: list[dict[str, Any]]) -> int:
    return sum(content_text(m.get("content"))[1] for m in messages)


def _first(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    return match.group(0) if match else None


def fill_schema(schema: Any, text: str, root: Any = None, depth: int = 0) -> Any:
    """A value that satisfies ``schema``, drawn from ``text`` (strings: the text; numbers: the first in it)."""
    root = schema if root is None else root
    if depth > MAX_SCHEMA_DEPTH or not isinstance(schema, Mapping):
        return text
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for key in ref[2:].split("/"):
            target = target.get(key) if isinstance(target, Mapping) else None
        return fill_schema(target, text, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            usable = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")] or options
            return fill_schema(usable[0], text, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "string":
        return text
    if kind == "integer":
        found = _first(_INT_RE, text)
        return int(found) if found else 1
    if kind == "number":
        found = _first(_NUMBER_RE, text)
        return float(found) if found else 1.0
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "null":
        return None
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return {}
    required = schema.get("required")
    names = [n for n in required if n in properties] if isinstance(required, list) and required else list(properties)
    return {name: fill_schema(properties[name], text, root, depth + 1) for name in names}


def _text_generation(answer: str, request: ChatRequest) -> Generation:
    pieces = token_pieces(answer)
    truncated = len(pieces) > request.max_tokens
    pieces = pieces[: request.max_tokens]
    return Generation("text", pieces, "length" if truncated else "stop", request.prompt_tokens, len(pieces))


def _call_generation(
    kind: Literal["tool_calls", "function_call"], name: str, arguments: Any, request: ChatRequest
) -> Generation:
    args = json.dumps(arguments, separators=(",", ":"))
    call_id = "call_" + hashlib.sha256(f"{name}:{args}:{request.prompt_tokens}".encode()).hexdigest()[:24]
    tokens = min(count_tokens(name) + count_tokens(args), request.max_tokens)
    finish = "tool_calls" if kind == "tool_calls" else "function_call"
    return Generation(kind, token_pieces(args), finish, request.prompt_tokens, tokens, ToolCall(call_id, name, args))


def _function_defs(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    defs: list[Mapping[str, Any]] = []
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise BadRequest("every tool needs function.name")
        defs.append(function)
    return defs


def _legacy_defs(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    defs = [f for f in body.get("functions") or [] if isinstance(f, Mapping)]
    if any(not isinstance(f.get("name"), str) for f in defs):
        raise BadRequest("every function needs a name")
    return defs


def _pick(defs: list[Mapping[str, Any]], named: str | None, text: str) -> Mapping[str, Any]:
    if named is not None:
        for function in defs:
            if function["name"] == named:
                return function
        raise BadRequest(f"the chosen tool {named[:80]!r} is not among the offered tools")
    if len(defs) == 1:
        return defs[0]
    lowered = text.lower()
    for function in defs:
        if str(function["name"]).lower() in lowered:
            return function
    return defs[0]


def generate_chat(request: ChatRequest) -> Generation:
    """The scripted answer to a validated chat request."""
    body, messages = request.body, request.messages
    text = last_user_text(messages)
    last_role = messages[-1].get("role")
    tools = _function_defs(body)
    choice = body.get("tool_choice")
    if tools and choice != "none":
        if last_role == "tool":
            result, _ = content_text(messages[-1].get("content"))
            return _text_generation(f"The tool returned: {result}", request)
        named = None
        if isinstance(choice, Mapping):
            function = choice.get("function")
            named = str(function.get("name")) if isinstance(function, Mapping) else None
        picked = _pick(tools, named, text)
        return _call_generation(
            "tool_calls", str(picked["name"]), fill_schema(picked.get("parameters") or {}, text), request
        )
    functions = _legacy_defs(body)
    legacy_choice = body.get("function_call")
    if functions and legacy_choice != "none":
        if last_role == "function":
            result, _ = content_text(messages[-1].get("content"))
            return _text_generation(f"The function returned: {result}", request)
        named = str(legacy_choice.get("name")) if isinstance(legacy_choice, Mapping) else None
        picked = _pick(functions, named, text)
        return _call_generation(
            "function_call", str(picked["name"]), fill_schema(picked.get("parameters") or {}, text), request
        )
    answer = f"Echo: {text}"
    images = _image_count(messages)
    if images:
        answer = f"Saw {images} image{'s' if images != 1 else ''}. {answer}"
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            if not isinstance(schema, Mapping):
                raise BadRequest("response_format.json_schema.schema is required")
            answer = json.dumps(fill_schema(schema, text))
        elif kind == "json_object":
            answer = json.dumps({"answer": answer})
        elif kind not in (None, "text"):
            raise BadRequest(f"unsupported response_format type {str(kind)[:40]!r}")
    return _text_generation(answer, request)


def usage_dict(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI ``usage``."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(gen: Generation, model: str, completion_id: str, created: int) -> dict[str, Any]:
    """The non-streamed ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": gen.content if gen.kind == "text" else None}
    if gen.call is not None and gen.kind == "tool_calls":
        message["tool_calls"] = [
            {
                "id": gen.call.id,
                "type": "function",
                "function": {"name": gen.call.name, "arguments": gen.call.arguments},
            }
        ]
    elif gen.call is not None:
        message["function_call"] = {"name": gen.call.name, "arguments": gen.call.arguments}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": gen.finish_reason, "logprobs": None}],
        "usage": usage_dict(gen.prompt_tokens, gen.completion_tokens),
    }


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One SSE event: its bytes, how many completion tokens it carries, and its kind (``usage``: it carries the final
    usage; ``done``: the stream's end marker; ``final``: both, the Responses API's terminal event)."""

    data: bytes
    tokens: int = 0
    kind: Literal["content", "finish", "usage", "done", "final", "other"] = "other"


def sse(payload: Mapping[str, Any] | str) -> bytes:
    """``data: <json>\\n\\n``."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def chat_stream(
    gen: Generation, model: str, completion_id: str, created: int, include_usage: bool
) -> Iterator[StreamEvent]:
    """``chat.completion.chunk`` events: one per token, the finish chunk, the usage chunk if asked, ``[DONE]``."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            out["usage"] = None
        return out

    if gen.kind == "text":
        pieces = gen.pieces or [""]
        for index, piece in enumerate(pieces):
            delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
            yield StreamEvent(sse(chunk(delta)), 1 if piece else 0, "content")
    elif gen.call is not None:
        call = gen.call
        if gen.kind == "tool_calls":
            head = {"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            yield StreamEvent(
                sse(chunk({"role": "assistant", "content": None, "tool_calls": [head]})),
                count_tokens(call.name),
                "content",
            )
            for piece in gen.pieces:
                yield StreamEvent(
                    sse(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})), 1, "content"
                )
        else:
            yield StreamEvent(
                sse(
                    chunk({"role": "assistant", "content": None, "function_call": {"name": call.name, "arguments": ""}})
                ),
                count_tokens(call.name),
                "content",
            )
            for piece in gen.pieces:
                yield StreamEvent(sse(chunk({"function_call": {"arguments": piece}})), 1, "content")
    yield StreamEvent(sse(chunk({}, gen.finish_reason)), 0, "finish")
    if include_usage:
        usage = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage_dict(gen.prompt_tokens, gen.completion_tokens),
        }
        yield StreamEvent(sse(usage), 0, "usage")
    yield StreamEvent(sse("[DONE]"), 0, "done")


# --- embeddings, images, Gemini -------------------------------------------------------------------------------


def embedding_inputs(body: Mapping[str, Any]) -> list[str | list[int]]:
    """The ``input`` of an embeddings body as a list of strings or token arrays. Raises `BadRequest`."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, str) for x in raw):
            return list(raw)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            return [list(raw)]
        if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
            return [list(x) for x in raw]
    raise BadRequest("'input' must be a string, an array of strings or token arrays")


def embedding_tokens(inputs: list[str | list[int]]) -> int:
    """Input tokens of an embeddings request."""
    return sum(count_tokens(x) if isinstance(x, str) else len(x) for x in inputs)


def embedding_vector(item: str | list[int], dimensions: int) -> list[float]:
    """A deterministic unit vector for ``item``."""
    seed = item.encode() if isinstance(item, str) else json.dumps(item).encode()
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        values += [(b - 127.5) / 127.5 for b in digest]
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def embeddings_response(
    body: Mapping[str, Any], model: str, inputs: list[str | list[int]], tokens: int
) -> dict[str, Any]:
    """The OpenAI embeddings answer (``encoding_format`` float or base64 little-endian float32)."""
    dimensions = body.get("dimensions", EMBEDDING_DIMENSIONS)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
        raise BadRequest("'dimensions' must be an integer in 1..4096")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("encoding_format must be 'float' or 'base64'")
    data: list[dict[str, Any]] = []
    for index, item in enumerate(inputs):
        vector = embedding_vector(item, dimensions)
        encoded: Any = vector
        if encoding == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def tiny_png(seed: str, size: int = 8) -> bytes:
    """A deterministic ``size`` x ``size`` solid-colour RGB PNG."""
    r, g, b = hashlib.sha256(seed.encode()).digest()[:3]
    raw = b"".join(b"\x00" + bytes((r, g, b)) * size for _ in range(size))

    def block(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + block(b"IHDR", header) + block(b"IDAT", zlib.compress(raw)) + block(b"IEND", b"")


def image_count(body: Mapping[str, Any]) -> int:
    """How many images an images body asks for (1..10). Raises `BadRequest`."""
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        raise BadRequest("'prompt' is required")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
        raise BadRequest("'n' must be an integer in 1..10")
    if body.get("response_format", "b64_json") not in (None, "b64_json", "url"):
        raise BadRequest("response_format must be 'b64_json' or 'url'")
    return n


def images_response(body: Mapping[str, Any], n: int, created: int) -> dict[str, Any]:
    """The OpenAI images answer: tiny PNGs as base64 (default) or as ``data:`` URLs."""
    data: list[dict[str, Any]] = []
    for index in range(n):
        encoded = base64.b64encode(tiny_png(f"{body['prompt']}#{index}")).decode()
        if body.get("response_format") == "url":
            data.append({"url": f"data:image/png;base64,{encoded}", "revised_prompt": body["prompt"]})
        else:
            data.append({"b64_json": encoded, "revised_prompt": body["prompt"]})
    return {"created": created, "data": data}


def gemini_to_chat(config: SandboxConfig, model: str, body: Any) -> ChatRequest:
    """A Gemini ``generateContent`` body as a chat request. Raises `BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    spec = check_model(config, model)
    generation = body.get("generationConfig") or {}
    if not isinstance(generation, dict):
        raise BadRequest("generationConfig must be an object")
    reject_thinking(body)
    if "thinkingConfig" in generation:
        raise BadRequest("Thinking/reasoning models are not supported")
    contents = body.get("contents")
    if isinstance(contents, dict):
        contents = [contents]
    if not isinstance(contents, list) or not contents:
        raise BadRequest("'contents' must be a non-empty array")
    messages: list[dict[str, Any]] = []
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, dict):
        messages.append({"role": "system", "content": _gemini_parts(system.get("parts"))})
    for content in contents:
        if not isinstance(content, dict):
            raise BadRequest("every content needs parts")
        role = "assistant" if content.get("role") == "model" else "user"
        messages.append({"role": role, "content": _gemini_parts(content.get("parts"))})
    max_tokens = _max_tokens(config, generation.get("maxOutputTokens"))
    tokens = prompt_tokens(messages)
    if tokens + max_tokens > spec.context_length:
        raise BadRequest("prompt + maxOutputTokens exceeds the context length")
    return ChatRequest(spec, {"model": model, "messages": messages}, messages, max_tokens, False, False, tokens)


def _gemini_parts(parts: Any) -> list[dict[str, Any]]:
    if not isinstance(parts, list):
        raise BadRequest("'parts' must be an array")
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif isinstance(part, dict) and ("inlineData" in part or "inline_data" in part or "fileData" in part):
            out.append({"type": "image_url", "image_url": {"url": "inline"}})
        else:
            raise BadRequest("a part needs 'text' or 'inlineData'")
    return out


def gemini_response(gen: Generation, model: str) -> dict[str, Any]:
    """A ``generateContent`` answer in Gemini's shape, with ``usageMetadata``."""
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": gen.content}]},
                "finishReason": "MAX_TOKENS" if gen.finish_reason == "length" else "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": gen.prompt_tokens,
            "candidatesTokenCount": gen.completion_tokens,
            "totalTokenCount": gen.prompt_tokens + gen.completion_tokens,
        },
        "modelVersion": model,
    }
