"""The meter's pass-through of whole usage-free chunks reads exactly what the event-by-event path reads.

A chunk that holds whole SSE events without a usage object, a settlement comment or ``[DONE]`` is handed on without
parsing. Fed one byte at a time, no chunk ever qualifies (a 1-byte chunk cannot end an event), so that is the
reference: every chunking must give the same bytes out, usage, settlement and end.
"""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from llm402.metering import UsageMeter

CONTENT = {"choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def _event(kind: str, crlf: bool) -> bytes:
    nl = b"\r\n" if crlf else b"\n"
    if kind == "content":
        return b"data: " + json.dumps(CONTENT, separators=(",", ":")).encode() + nl + nl
    if kind == "usage":
        return b"data: " + json.dumps(USAGE).encode() + nl + nl
    if kind == "usage-split":  # the usage key and its object on two data lines of one event
        return b'data: {"choices":[],"usage"' + nl + b'data: :{"prompt_tokens":5,"completion_tokens":4}}' + nl + nl
    if kind == "usage-split-after-colon":
        return b'data: {"choices":[],"usage":' + nl + b'data: {"prompt_tokens":6,"completion_tokens":1}}' + nl + nl
    if kind == "comment":
        return b": keep-alive" + nl + nl
    if kind == "settlement":
        return b": payment-response eyJzdWNjZXNzIjp0cnVlfQ==" + nl + nl
    return b"data: [DONE]" + nl + nl


def _read(wire: bytes, cuts: list[int], strip: bool) -> tuple[bytes, object, bool, str | None]:
    meter = UsageMeter(streaming=True, strip_usage_event=strip)
    points = sorted({0, len(wire), *(c for c in cuts if 0 < c < len(wire))})
    out = b"".join(meter.feed(wire[a:b]) for a, b in itertools.pairwise(points)) + meter.finish()
    usage = None if meter.usage is None else (meter.usage.prompt_tokens, meter.usage.completion_tokens)
    return out, usage, meter.done, meter.settlement


kinds = st.sampled_from(["content", "content", "content", "usage", "usage-split", "usage-split-after-colon", "comment"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(kinds, max_size=12),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.lists(st.integers(0, 4000), max_size=8),
)
def test_every_chunking_reads_what_byte_by_byte_reads(
    body: list[str], settle: bool, crlf: bool, strip: bool, cuts: list[int]
) -> None:
    events = [_event(kind, crlf) for kind in [*body, *(["settlement"] if settle else []), "done"]]
    wire = b"".join(events)
    reference = _read(wire, list(range(len(wire))), strip)
    boundaries = [sum(len(e) for e in events[:i]) for i in range(len(events))]
    assert _read(wire, boundaries, strip) == reference  # whole events per chunk: the pass-through path
    assert _read(wire, cuts, strip) == reference  # arbitrary cuts
    assert _read(wire, [], strip) == reference  # one chunk


def test_a_usage_object_split_across_data_lines_is_read_and_stripped() -> None:
    chunks = [_event("content", False), _event("usage-split", False), _event("done", False)]
    meter = UsageMeter(streaming=True, strip_usage_event=True)
    out = b"".join(meter.feed(chunk) for chunk in chunks) + meter.finish()
    assert meter.usage is not None and (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (5, 4)
    assert out == chunks[0] + chunks[2]
    assert meter.done


def test_a_settlement_comment_in_its_own_chunk_is_kept() -> None:
    meter = UsageMeter(streaming=True)
    for chunk in (_event("content", False), _event("settlement", False), _event("done", False)):
        assert meter.feed(chunk) == chunk
    meter.finish()
    assert meter.settlement == "eyJzdWNjZXNzIjp0cnVlfQ=="
    assert meter.done


def test_a_non_streamed_answer_reads_its_last_usage_object() -> None:
    body = json.dumps({"usage": {"prompt_tokens": 1}, "choices": [{"usage": None}], "usage ": 1}).encode()
    body = body[:-1] + b',"usage" : {"prompt_tokens":9,"completion_tokens":8}}'
    meter = UsageMeter(streaming=False)
    for i in range(0, len(body), 7):
        assert meter.feed(body[i : i + 7]) == body[i : i + 7]
    meter.finish()
    assert meter.body == body
    assert meter.usage is not None and (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (9, 8)
