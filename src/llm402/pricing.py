"""Prices and cost estimation in integer micro-USDC. No tokenizer at runtime: estimates are upper bounds."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .money import ATOMIC_PER_USD

log = logging.getLogger("llm402")
_unpriced_warned: set[tuple[str, str]] = set()
_unpriced_lock = threading.Lock()


def warn_unpriced(origin: str, model: str) -> None:
    """Log, once per process for each gateway and model, that an unpaid answer was priced at nothing."""
    with _unpriced_lock:
        if (origin, model) in _unpriced_warned:
            return
        _unpriced_warned.add((origin, model))
    log.warning(
        "llm402: %s answered %r without a payment and its price is unknown, so the call is counted at its reservation "
        "(nothing); give the gateway prices= or profile='plain' (then, under a cap, such calls are refused). Warned "
        "once for this model",
        origin,
        model,
    )


DEFAULT_MAX_TOKENS = 1024
TOKENS_PER_IMAGE = 1600
TOKENS_PER_MESSAGE = 8
_MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's price in micro-USDC per 1M tokens, with its capability facts when the catalog gives them."""

    prompt_per_1m: int
    completion_per_1m: int
    context_length: int | None = None

    @classmethod
    def from_usd(cls, prompt_usd_per_1m: Decimal | str, completion_usd_per_1m: Decimal | str, **kw: Any) -> ModelPrice:
        """From USD per 1M tokens (the catalog's unit); converted once, exactly."""
        return cls(_usd_per_1m(prompt_usd_per_1m), _usd_per_1m(completion_usd_per_1m), **kw)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Cost of a call, rounded up to the next micro-USDC."""
        numerator = prompt_tokens * self.prompt_per_1m + completion_tokens * self.completion_per_1m
        return -(-numerator // _MILLION)


def _usd_per_1m(value: Decimal | str | int | float) -> int:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not a price: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"price must be a non-negative number, got {value!r}")
    return int((amount * ATOMIC_PER_USD).to_integral_value(rounding="ROUND_CEILING"))


class PriceCatalog:
    """Model id -> price. Built from a gateway's ``/v1/models`` (when it lists prices) or configured."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self._prices: dict[str, ModelPrice] = dict(prices or {})

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, model: object) -> bool:
        return model in self._prices

    def models(self) -> dict[str, ModelPrice]:
        """A copy of the table."""
        return dict(self._prices)

    def lookup(self, model: str | None) -> ModelPrice | None:
        """The price of ``model``; ``provider/model`` and bare ``model`` names match each other."""
        if model is None:
            return None
        if model in self._prices:
            return self._prices[model]
        bare = model.split("/", 1)[-1]
        for name, price in self._prices.items():
            if name.split("/", 1)[-1] == bare:
                return price
        return None

    def merged(self, other: PriceCatalog) -> PriceCatalog:
        """This catalog with ``other``'s entries added where this one has none (configured prices win)."""
        return PriceCatalog({**other._prices, **self._prices})

    @classmethod
    def from_models_response(cls, body: bytes | Mapping[str, Any]) -> PriceCatalog:
        """Parse ``GET /v1/models``: Token Kiosk fields (``promptPricePer1MTokens``...) or OpenRouter-style
        ``pricing.prompt`` per token. Entries without prices are skipped; malformed ones too."""
        data: Any = json.loads(body) if isinstance(body, bytes) else body
        entries = data.get("data") if isinstance(data, Mapping) else None
        prices: dict[str, ModelPrice] = {}
        if not isinstance(entries, list):
            return cls()
        for entry in entries:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
                continue
            ctx = entry.get("contextLength", entry.get("context_length"))
            context = ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else None
            try:
                if "promptPricePer1MTokens" in entry:
                    completion = entry.get("completionPricePer1M", entry.get("completionPricePer1MTokens"))
                    prices[entry["id"]] = ModelPrice.from_usd(
                        entry["promptPricePer1MTokens"], completion, context_length=context
                    )
                elif isinstance(entry.get("pricing"), Mapping):
                    per_token = entry["pricing"]
                    prices[entry["id"]] = ModelPrice(
                        _usd_per_1m(Decimal(str(per_token["prompt"])) * _MILLION),
                        _usd_per_1m(Decimal(str(per_token["completion"])) * _MILLION),
                        context_length=context,
                    )
            except (ValueError, KeyError, TypeError, InvalidOperation):
                continue
        return cls(prices)


_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())


def _text_bytes(content: Any) -> tuple[int, int]:
    """(utf-8 bytes, number of images) of a message content: a string, or parts / content blocks (chat completions,
    the Responses API, Anthropic Messages, Gemini). Text parts count their text; images a flat `TOKENS_PER_IMAGE`;
    a tool result its content; any other part (a tool call, a document, audio) its whole JSON, an upper bound."""
    if isinstance(content, str):
        return len(content.encode()), 0
    if content is None:
        return 0, 0
    if not isinstance(content, list):
        return _json_bytes(content), 0
    size = images = 0
    for part in content:
        if isinstance(part, str):
            size += len(part.encode())
            continue
        if not isinstance(part, Mapping):
            size += _json_bytes(part)
            continue
        kind = part.get("type")
        if kind in _IMAGE_PARTS or "inline_data" in part or "inlineData" in part:
            images += 1
        elif isinstance(part.get("text"), str) and (kind is None or kind in _TEXT_PARTS):
            size += len(part["text"].encode())
        elif kind in ("tool_result", "function_call_output"):  # Anthropic / Responses: the result's own content
            s, i = _text_bytes(part.get("content", part.get("output")))
            size += s + TOKENS_PER_MESSAGE
            images += i
        else:
            size += _json_bytes(part)
    return size, images


def _message_tokens(message: Mapping[str, Any]) -> int:
    """A chat message, a Responses API input item or an Anthropic message: its content, calls and overhead."""
    if "content" not in message and "role" not in message:
        if message.get("type") == "function_call_output":  # a Responses API tool result: its output, like content
            size, images = _text_bytes(message.get("output"))
            return size + images * TOKENS_PER_IMAGE + TOKENS_PER_MESSAGE
        return _json_bytes(message) + TOKENS_PER_MESSAGE  # a function call, a reasoning item...: all of its JSON
    size, images = _text_bytes(message.get("content"))
    total = size + images * TOKENS_PER_IMAGE + TOKENS_PER_MESSAGE
    for key in ("tool_calls", "function_call"):
        if message.get(key):
            total += _json_bytes(message[key])
    return total


def _input_tokens(value: Any) -> int:
    """``input``: an embeddings input (text, texts, token ids, lists of token ids) or the Responses API's input (a
    string, or a list of messages and items)."""
    if isinstance(value, str):
        return len(value.encode()) + TOKENS_PER_MESSAGE
    if isinstance(value, int) and not isinstance(value, bool):
        return 1  # a token id
    if isinstance(value, list):
        return sum(_input_tokens(x) if not isinstance(x, str) else len(x.encode()) for x in value)
    if isinstance(value, Mapping):
        return _message_tokens(value)
    return 0 if value is None else _json_bytes(value)


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """An upper bound of the prompt's tokens: one per UTF-8 byte (no byte-level BPE emits more), plus per-message
    overhead, images, tool definitions and output schemas.

    Read: chat ``messages``; the Responses API's ``instructions`` and ``input`` (a string or a list of items);
    Anthropic's ``system`` (a string or text blocks) and ``messages`` with content blocks (text, images, tool use,
    tool results); Gemini's ``contents`` and ``systemInstruction``; embeddings' ``input``; a legacy ``prompt``."""
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        total += sum(_message_tokens(m) for m in messages if isinstance(m, Mapping))
    for key in ("system", "instructions"):  # Anthropic Messages; the Responses API
        value = body.get(key)
        if value:
            size, images = _text_bytes(value)
            total += size + images * TOKENS_PER_IMAGE + TOKENS_PER_MESSAGE
    contents = body.get("contents")  # Gemini native
    if isinstance(contents, Mapping):
        contents = [contents]
    system = body.get("systemInstruction", body.get("system_instruction"))
    if isinstance(contents, list) or isinstance(system, Mapping):
        items = [*(contents if isinstance(contents, list) else []), *([system] if isinstance(system, Mapping) else [])]
        for item in items:
            if isinstance(item, Mapping):
                size, images = _text_bytes(item.get("parts"))
                total += size + images * TOKENS_PER_IMAGE + TOKENS_PER_MESSAGE
    if "input" in body:  # embeddings; the Responses API
        total += _input_tokens(body["input"])
    if isinstance(body.get("prompt"), str):
        total += len(body["prompt"].encode())
    for key in ("tools", "functions", "response_format"):
        if body.get(key):
            total += _json_bytes(body[key])
    text = body.get("text")  # the Responses API's output format (a JSON schema)
    if isinstance(text, Mapping) and text.get("format"):
        total += _json_bytes(text["format"])
    return total


def max_completion_tokens(body: Mapping[str, Any], default: int = DEFAULT_MAX_TOKENS) -> int:
    """The completion budget the request allows: ``max_tokens`` (chat, Anthropic Messages),
    ``max_completion_tokens``, ``max_output_tokens`` (the Responses API) or Gemini's ``maxOutputTokens``."""
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    config = body.get("generationConfig")
    if isinstance(config, Mapping):
        value = config.get("maxOutputTokens")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def estimate_cost(price: ModelPrice | None, body: Mapping[str, Any] | None) -> int:
    """The reservation for a call: its price times (prompt upper bound + completion budget); 0 when unpriced."""
    if price is None or body is None:
        return 0
    return price.cost(estimate_prompt_tokens(body), max_completion_tokens(body))
