"""The meter inflates a compressed body only within a bound: a gzip bomb costs it a few MiB of work, is counted by its
reservation (no usage), and still reaches the caller byte for byte. Real compressed answers are still metered."""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib

from llm402.metering import MAX_INFLATE_RATIO, MAX_INFLATED_BYTES, MAX_JSON_BYTES, UsageMeter

MiB = 1 << 20
USAGE = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5}}


def gzip_bomb(mib: int, prefix: bytes = b"") -> bytes:
    """A valid gzip member of ``prefix`` and ``mib`` MiB of zeros, about 1 KiB a MiB (one compressed MiB, flushed so it
    stands alone, repeated)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = packer.compress(prefix) + packer.flush(zlib.Z_FULL_FLUSH)
    block = b"\0" * MiB
    one = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    tail = packer.flush()
    crc = zlib.crc32(prefix)
    for _ in range(mib):
        crc = zlib.crc32(block, crc)
    size = (len(prefix) + mib * MiB) & 0xFFFFFFFF
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + head + one * mib + tail + struct.pack("<II", crc, size)


def feed_all(meter: UsageMeter, wire: bytes, chunk: int = 16 * 1024) -> bytes:
    return b"".join(meter.feed(wire[i : i + chunk]) for i in range(0, len(wire), chunk)) + meter.finish()


def test_the_bomb_builder_is_a_real_gzip_body() -> None:
    bomb = gzip_bomb(3, prefix=b"{")
    assert gzip.decompress(bomb) == b"{" + b"\0" * (3 * MiB)
    assert len(bomb) < 8 * 1024


def test_a_non_streamed_bomb_is_inflated_only_as_far_as_usage_could_be_read() -> None:
    bomb = gzip_bomb(64)
    meter = UsageMeter(streaming=False, content_encoding="gzip")
    assert feed_all(meter, bomb) == bomb  # the caller's bytes, unchanged
    assert meter.bytes_inflated <= MAX_JSON_BYTES + 1
    assert meter.usage is None and meter.body is None  # counted by the reservation


def test_a_streamed_bomb_is_inflated_only_to_the_bound() -> None:
    bomb = gzip_bomb(96, prefix=b"data: " + json.dumps(USAGE).encode() + b"\n\n")
    meter = UsageMeter(streaming=True, content_encoding="gzip")
    assert feed_all(meter, bomb) == bomb
    assert meter.bytes_inflated <= max(MAX_INFLATED_BYTES, MAX_INFLATE_RATIO * len(bomb))
    assert meter.usage is None  # a usage read before the bomb is not trusted either: the reservation counts


def test_a_compressed_answer_with_usage_is_still_metered() -> None:
    body = json.dumps({"choices": [{"message": {"content": "x" * 100_000}}], **USAGE}).encode()
    meter = UsageMeter(streaming=False, content_encoding="gzip")
    packed = gzip.compress(body)
    assert feed_all(meter, packed, chunk=1000) == packed
    assert meter.usage is not None and meter.usage.prompt_tokens == 11
    assert meter.body == body


def test_a_long_compressed_stream_is_metered_past_the_fixed_bound() -> None:
    """A real stream compresses a few times, not a thousand: the ratio clause lets one past `MAX_INFLATED_BYTES`
    be read to its end."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n'
    events = [event % os.urandom(48).hex().encode() for _ in range(MAX_INFLATED_BYTES // 150 + 1000)]
    plain = b"".join(events) + b"data: " + json.dumps(USAGE).encode() + b"\n\ndata: [DONE]\n\n"
    assert len(plain) > MAX_INFLATED_BYTES
    packed = gzip.compress(plain, compresslevel=1)
    meter = UsageMeter(streaming=True, content_encoding="gzip")
    assert feed_all(meter, packed, chunk=64 * 1024) == packed
    assert meter.bytes_inflated == len(plain)
    assert meter.usage is not None and meter.usage.completion_tokens == 5
    assert meter.done
