"""Usage sniffing on the way through: SSE or JSON, gzip or not, without holding back the stream.

`UsageMeter.feed` returns the bytes to hand to the caller. They are the input bytes unchanged, except when the
transport itself asked for ``stream_options.include_usage``: then the usage-only event the caller did not ask for is
dropped (events are forwarded whole, as soon as their blank line arrives).

A stream paid with x402 ``upto`` is settled after its content; such a gateway may report the settlement in an SSE
comment before ``[DONE]``: ``: payment-response <base64 JSON>`` (the ``PAYMENT-RESPONSE`` header's value). SSE
clients ignore comments; the meter keeps the value in `UsageMeter.settlement`.

A gzip or deflate body (sent despite ``accept-encoding: identity``) is inflated to be read, within a bound, so a gzip
bomb costs the meter no more than a few MiB of work: a non-streamed answer is inflated up to `MAX_JSON_BYTES` (past
that, its usage would not be read anyway), a stream up to `MAX_INFLATED_BYTES` or `MAX_INFLATE_RATIO` times the
compressed bytes seen, whichever is more (a real SSE stream compresses some 5-20 times; a bomb, a thousand). Past the
bound the meter stops inflating and reads nothing more: the call is counted by its reservation (``usage`` is None).
The caller still gets every byte, unchanged.

API shapes read (`usage_from_json` for one answer, `UsageMeter` for a stream):

- chat completions: ``usage.prompt_tokens`` / ``completion_tokens`` (a stream's usage chunk);
- the OpenAI Responses API: ``usage.input_tokens`` / ``output_tokens`` (``input_tokens_details``' cached and
  cache-write tokens are part of the input); a stream's usage is ``response.usage`` of its terminal
  ``response.completed`` (or ``response.incomplete`` / ``response.failed``) event;
- Anthropic Messages: ``usage.input_tokens`` / ``output_tokens``, plus ``cache_creation_input_tokens`` and
  ``cache_read_input_tokens`` (not part of ``input_tokens``: added to the prompt); a stream's input arrives in
  ``message_start`` (``message.usage``) and its cumulative output in ``message_delta`` (``usage``): the usage is
  known once ``message_delta`` came (a stream cut before it has none);
- Gemini: ``usageMetadata`` (thinking tokens, billed as output, are added to the candidates');
- ``usage.cost`` / ``usage.credits_remaining`` where a gateway reports them (AIsa).

A usage object without an input count (and without a cost) is not read: nothing found means ``usage`` is None, never
zeros, and the call is counted by its reservation (the core's rule). A complete answer that carried no usage llm402
could read is logged once per kind of answer (`warn_unmetered`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

log = logging.getLogger("llm402")

MAX_JSON_BYTES = 8 * 1024 * 1024
"""The most of a body the meter keeps to read usage from: a non-streamed answer, or one SSE event."""
MAX_INFLATED_BYTES = 16 * 1024 * 1024
"""A compressed stream is inflated up to this, or up to `MAX_INFLATE_RATIO` times its compressed size if more."""
MAX_INFLATE_RATIO = 32
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_EVENT_TAILS = (b"\n\n", b"\n\r\n")
_USAGE_OBJECT = re.compile(rb'"usage(?:Metadata)?"\s*:\s*\{')  # a literal prefix: searched fast
_MAYBE_USAGE = re.compile(rb'"usage(?:Metadata)?"\s*(?::\s*)?[{\r\n]')
"""A superset of `_USAGE_OBJECT` on raw wire bytes: also a usage key whose value may continue on the event's next
``data:`` line. Chunks it does not match carry no usage object (``"usage":null`` does not match)."""
SETTLEMENT_COMMENT = b": payment-response "
_PAYMENT_RECEIPT_EVENT = re.compile(rb"(?m)^event:\s*payment-receipt\s*$")


def _worth_reading(data: bytes | bytearray) -> bool:
    """Whether SSE bytes may hold something the meter reads: a usage object, the settlement comment or the end."""
    return b"[DONE]" in data or b"payment-re" in data or _MAYBE_USAGE.search(data) is not None


@dataclass(slots=True)
class Usage:
    """Token usage as the gateway reported it; ``cost_usd`` / ``credits_remaining`` when it reports them (AIsa)."""

    prompt_tokens: int = 0
    """All input tokens, cached or not (Anthropic's cache reads and writes added to its ``input_tokens``)."""
    completion_tokens: int = 0
    cost_usd: Decimal | None = None
    credits_remaining: Decimal | None = None
    cached_tokens: int = 0
    """Of ``prompt_tokens``, those read from a prompt cache (OpenAI ``cached_tokens``, Anthropic
    ``cache_read_input_tokens``, Gemini ``cachedContentTokenCount``)."""
    cache_write_tokens: int = 0
    """Of ``prompt_tokens``, those written to a prompt cache (Anthropic ``cache_creation_input_tokens``, OpenAI
    ``cache_write_tokens``)."""


def _count(value: Any) -> int | None:
    """A token count, or None when absent or not a non-negative integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _first_count(data: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = _count(data.get(key))
        if value is not None:
            return value
    return None


def _detail(data: Mapping[str, Any], key: str, field: str) -> int:
    details = data.get(key)
    return (_count(details.get(field)) or 0) if isinstance(details, Mapping) else 0


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount >= 0 else None


def read_usage(usage: Mapping[str, Any]) -> Usage | None:
    """One ``usage`` object: chat completions, the Responses API or Anthropic Messages (see the module's docstring).

    None when it has neither an input count nor a cost: such an object cannot price a call (a bare ``{}``, an
    Anthropic ``message_delta`` usage alone, a tool's JSON schema property named ``usage``)."""
    prompt = _first_count(usage, "prompt_tokens", "input_tokens")
    cost = _decimal(usage.get("cost"))
    if prompt is None and cost is None:
        return None
    cache_read = _count(usage.get("cache_read_input_tokens")) or 0  # Anthropic: not part of input_tokens
    cache_write = _count(usage.get("cache_creation_input_tokens")) or 0
    details = (
        "input_tokens_details" if isinstance(usage.get("input_tokens_details"), Mapping) else "prompt_tokens_details"
    )
    return Usage(  # OpenAI's details are part of its input count already
        prompt_tokens=(prompt or 0) + cache_read + cache_write,
        completion_tokens=_first_count(usage, "completion_tokens", "output_tokens") or 0,
        cost_usd=cost,
        credits_remaining=_decimal(usage.get("credits_remaining")),
        cached_tokens=cache_read + _detail(usage, details, "cached_tokens"),
        cache_write_tokens=cache_write + _detail(usage, details, "cache_write_tokens"),
    )


def _read_usage_metadata(meta: Mapping[str, Any]) -> Usage | None:
    """Gemini's ``usageMetadata`` (thinking and tool-use prompt tokens are billed: they are counted)."""
    prompt = _count(meta.get("promptTokenCount"))
    if prompt is None:
        return None
    return Usage(
        prompt_tokens=prompt + (_count(meta.get("toolUsePromptTokenCount")) or 0),
        completion_tokens=(_count(meta.get("candidatesTokenCount")) or 0)
        + (_count(meta.get("thoughtsTokenCount")) or 0),
        cached_tokens=_count(meta.get("cachedContentTokenCount")) or 0,
    )


def usage_from_json(data: Any) -> Usage | None:
    """Usage from an answer's top-level ``usage`` (any of the shapes read) or Gemini ``usageMetadata`` object."""
    if not isinstance(data, Mapping):
        return None
    usage = data.get("usage")
    if isinstance(usage, Mapping):
        return read_usage(usage)
    meta = data.get("usageMetadata")
    if isinstance(meta, Mapping):
        return _read_usage_metadata(meta)
    return None


_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
"""The Responses API's terminal stream events: each carries the whole response, ``usage`` included."""

_KIND_PARSE_BYTES = 64 * 1024
"""An answer without usage is parsed (to tell an error from an answer) only up to this size."""
_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_unmetered(kind: str) -> None:
    """Log, once per process for each kind of answer, that an answer carried no usage llm402 can read."""
    with _warned_lock:
        if kind in _warned:
            return
        _warned.add(kind)
    log.warning(
        "llm402: found no token usage llm402 can read in a %s; its receipt shows no tokens and, unless a payment or "
        "a reported cost prices it, it is counted by its reservation (an upper bound). Warned once for this kind",
        kind,
    )


def _answer_kind(body: bytes, streaming: bool) -> str | None:
    """What to call an answer without readable usage in the warning; None for an error or empty body (not a call
    that was answered)."""
    text = body.strip()
    if not text:
        return None
    if text.startswith(b"{") and len(text) > _KIND_PARSE_BYTES:  # an image, say: not an error body, not parsed
        return "JSON answer"
    if text.startswith(b"{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, Mapping):
            if data.get("error") is not None or data.get("type") == "error":
                return None
            label = data.get("object", data.get("type"))
            return f"JSON answer ({label})" if isinstance(label, str) else "JSON answer"
    return "streamed answer" if streaming else "answer"


_DECODER = json.JSONDecoder()


def _last_usage_object(body: bytes) -> re.Match[bytes] | None:
    """The last `_USAGE_OBJECT` match of ``body``, searched backwards (an answer's own usage comes last)."""
    end = len(body)
    while True:
        start = body.rfind(b'"usage', 0, end)
        if start < 0:
            return None
        match = _USAGE_OBJECT.match(body, start)
        if match is not None:
            return match
        end = start


def _tail_usage(body: bytes) -> Usage | None:
    """The last ``usage`` / ``usageMetadata`` object of a JSON answer, decoded alone (not the whole body)."""
    match = _last_usage_object(body)
    if match is None:
        return None
    key = "usageMetadata" if match.group(0).startswith(b'"usageMetadata') else "usage"
    text = body[match.end() - 1 :].decode("utf-8", errors="replace")
    with contextlib.suppress(ValueError):
        value, _ = _DECODER.raw_decode(text)
        return usage_from_json({key: value})
    return None


class UsageMeter:
    """Incremental parser of a response body. Feed raw wire bytes; read `usage` and `done` afterwards.

    ``done``: the stream reached its end marker (``[DONE]``), or the event that completes its usage (the Responses
    API's terminal event, Anthropic's ``message_delta``). ``warn_unread=False`` keeps `finish` from warning about an
    answer without usage (for requests that are not model calls)."""

    def __init__(
        self,
        *,
        streaming: bool,
        content_encoding: str | None = None,
        strip_usage_event: bool = False,
        warn_unread: bool = True,
    ):
        self.streaming = streaming
        self.usage: Usage | None = None
        self.done = False
        self.settlement: str | None = None
        """The base64 settlement report of a ``: payment-response`` comment, when the stream carried one."""
        self.bytes_seen = 0
        self.bytes_inflated = 0
        """How much the meter inflated of a gzip/deflate body (bounded: see the module's docstring)."""
        encoding = (content_encoding or "").lower().strip()
        self._encoding = encoding
        self._warn = warn_unread
        self._opening: Mapping[str, Any] | None = None  # an Anthropic stream's message_start usage
        self._inflate = zlib.decompressobj(wbits=47) if encoding in ("gzip", "deflate", "x-gzip") else None
        self._opaque = encoding not in ("", "identity", "gzip", "deflate", "x-gzip")
        # a readable stream is filtered event by event where it needs to be: the usage chunk llm402 asked for (only
        # with ``strip_usage_event``) and an MPP ``event: payment-receipt`` (always: SDKs would make it a chunk)
        self._strip = streaming and self._inflate is None and not self._opaque
        self._strip_usage = strip_usage_event
        self.receipt: Mapping[str, Any] | None = None
        """The JSON of an MPP stream's final ``event: payment-receipt`` (removed from what the caller reads)."""
        self._buffer = bytearray()
        self._parts: list[bytes] = []  # a non-streamed body, joined once at the end (no per-chunk copies)
        self._size = 0
        self._overflow = False
        self.body: bytes | None = None
        """The whole (decoded) body of a non-streamed answer, kept for the response cache."""

    def feed(self, chunk: bytes) -> bytes:
        """Account for ``chunk``; return what to pass on."""
        self.bytes_seen += len(chunk)
        if self._opaque:
            return chunk
        data = chunk
        if self._inflate is not None:
            room = self._inflate_room()
            try:
                data = self._inflate.decompress(chunk, room) if room > 0 else b""
            except zlib.error:
                self._opaque = True
                return chunk
            self.bytes_inflated += len(data)
            if room <= 0 or self._inflate.unconsumed_tail:  # the bound is reached: stop reading this body
                self._give_up()
                return chunk
        if not self.streaming:
            self._size += len(data)
            if self._size <= MAX_JSON_BYTES:
                self._parts.append(data)
            else:
                self._overflow = True
            return chunk
        if (
            not self._buffer
            and b"[DONE]" not in data
            and b"payment-re" not in data  # a settlement comment or an MPP payment-receipt event
            and _MAYBE_USAGE.search(data) is None  # `_worth_reading` inlined: this runs for every chunk
        ):
            if data.endswith(_EVENT_TAILS):
                # the common chunk: whole events without usage, settlement or end: nothing to read, hold or strip
                return chunk
            if not self._strip:  # nothing to read up to the event left open at the end: keep only that one
                lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\n\r\n")
                cut = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
                self._buffer += data[cut:] if len(data) - cut <= MAX_JSON_BYTES else b""
                return chunk
        if not self._strip:  # an event begun in an earlier chunk, or something to read: parse event by event
            self._buffer += data
            self._drain_events(None)
            return chunk
        self._buffer += data
        out = bytearray()
        self._drain_events(out)
        return bytes(out)

    def _inflate_room(self) -> int:
        """How many more bytes the meter may inflate."""
        if not self.streaming:
            limit = MAX_JSON_BYTES + 1  # one byte more than is kept: enough to know the body overflows
        else:
            limit = max(MAX_INFLATED_BYTES, MAX_INFLATE_RATIO * self.bytes_seen)
        return limit - self.bytes_inflated

    def _give_up(self) -> None:
        """Stop reading a body that inflates past the bound: pass the rest through, report no usage."""
        log.warning(
            "llm402: a compressed response inflates past %d bytes from %d; not metered, counted by its reservation",
            self.bytes_inflated,
            self.bytes_seen,
        )
        self._inflate = None
        self._opaque = True
        self._overflow = True
        self.usage = None
        self._parts.clear()
        self._buffer.clear()

    def finish(self) -> bytes:
        """End of body: parse what is left; return any held bytes still owed to the caller."""
        if self.streaming:
            rest = bytes(self._buffer)
            self._buffer.clear()
            if rest.strip():
                self._event(rest)
            if self.usage is None:
                self._unread(rest)
            return rest if self._strip else b""
        if not self._overflow and self._parts:
            self.body = b"".join(self._parts)
            self.usage = _tail_usage(self.body) or self.usage
        self._parts.clear()
        if self.usage is None:
            self._unread(self.body or b"")
        return b""

    def _unread(self, rest: bytes) -> None:
        """A whole answer without usage: warn once for its kind (not for an error body; past the inflate bound,
        `_give_up` warned already)."""
        if not self._warn or self._overflow or not self.bytes_seen:
            return
        if self._opaque:
            warn_unmetered(f"{self._encoding or 'compressed'}-encoded answer")
            return
        if self.streaming and not rest.strip():
            warn_unmetered("streamed answer")
            return
        kind = _answer_kind(rest, self.streaming)
        if kind is not None and kind not in ("JSON answer (list)", "JSON answer (model)"):  # listings carry no usage
            warn_unmetered(kind)

    def _drain_events(self, out: bytearray | None) -> None:
        while True:
            match = _EVENT_END.search(self._buffer)
            if match is None:
                if len(self._buffer) > MAX_JSON_BYTES:  # a hostile stream without separators
                    if out is not None:
                        out += self._buffer
                    self._buffer.clear()
                return
            block = bytes(self._buffer[: match.end()])
            del self._buffer[: match.end()]
            keep = self._event(block)
            if out is not None and keep:
                out += block

    def _event(self, block: bytes) -> bool:
        """Parse one SSE event; False when it is the usage-only chunk to strip."""
        lines = [line[5:].lstrip() for line in block.splitlines() if line.startswith(b"data:")]
        if lines and _PAYMENT_RECEIPT_EVENT.search(block) is not None:
            self._read_receipt(b"\n".join(lines))
            return False  # llm402's to read, not the caller's: an SDK would turn it into an empty chunk
        if not lines:
            if block.startswith(SETTLEMENT_COMMENT):
                self.settlement = block[len(SETTLEMENT_COMMENT) :].split(b"\n", 1)[0].strip().decode("ascii", "replace")
            return True
        payload = b"\n".join(lines).strip()
        if payload == b"[DONE]":
            self.done = True
            return True
        if _USAGE_OBJECT.search(payload) is None:  # most events carry no usage: skip the JSON parse
            return True
        try:
            data = json.loads(payload)
        except ValueError:
            return True
        if not isinstance(data, Mapping):
            return True
        kind = data.get("type")
        if isinstance(kind, str) and self._typed_event(kind, data):
            return True  # an event of the Responses API or Anthropic Messages: never stripped
        usage = usage_from_json(data)
        if usage is None:
            return True
        self.usage = usage
        usage_only = not data.get("choices") and kind is None  # a chat completions usage chunk
        return not (self._strip_usage and usage_only)

    def _read_receipt(self, payload: bytes) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if isinstance(data, Mapping):
            self.receipt = data

    def _typed_event(self, kind: str, data: Mapping[str, Any]) -> bool:
        """Read a Responses API or Anthropic Messages stream event; False when it is neither."""
        if kind.startswith("response."):
            response = data.get("response")
            usage = response.get("usage") if isinstance(response, Mapping) else None
            if kind in _RESPONSE_ENDS:  # earlier events' usage is null, or not final
                read = read_usage(usage) if isinstance(usage, Mapping) else None
                if read is not None:
                    self.usage = read
                self.done = True
            return True
        if kind == "message_start":
            message = data.get("message")
            usage = message.get("usage") if isinstance(message, Mapping) else None
            if isinstance(usage, Mapping):
                self._opening = usage  # the input count; the output is final only in message_delta
            return True
        if kind == "message_delta":
            usage = data.get("usage")
            if isinstance(usage, Mapping):
                opening = self._opening or {}
                merged = {**opening, **{k: v for k, v in usage.items() if v is not None}}  # cumulative counts
                read = read_usage(merged)
                if read is not None:
                    self.usage = read
                    self.done = True
            return True
        return False
