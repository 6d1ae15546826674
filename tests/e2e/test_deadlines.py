"""Every read after the request has a deadline (invariant 5), a compressed body cannot make the meter work without
bound, whatever a hostile gateway does, and a ledger another process holds locked never stalls an event loop
(invariant 10).

The gateway here is a raw socket server on 127.0.0.1 that falls silent after the first chunk of a stream or byte of an
answer, trickles an answer or a 402's body a byte at a time, or sends a gzip bomb. The caller is an unchanged
``openai.OpenAI`` / ``AsyncOpenAI`` on llm402's clients: each call must end with an error within
``max_stream_seconds`` (plus a margin for a loaded machine), and still be reconciled: an aborted answer counts its
reservation, never $0.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import httpx2
import openai
import pytest

from llm402 import Gateway, Policy, Wallet
from llm402.pricing import ModelPrice
from llm402.receipts import Receipt, current_receipt
from llm402.sandbox import SandboxServer

MAX_STREAM = 1.5
MARGIN = 1.5
GIVE_UP = 8.0
"""The hostile server stops misbehaving after this long, so that a client without deadlines fails instead of hanging."""
MODEL = "hostile/model"
MESSAGES = [{"role": "user", "content": "hang on"}]
MiB = 1 << 20

FIRST_CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"hostile/model",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"},"finish_reason":null}]}\n\n'
)


def _gzip_bomb(mib: int) -> bytes:
    """A valid gzip member of ``mib`` MiB of zeros, about 1 KiB a MiB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = b"\0" * MiB
    one = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    tail = packer.flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(block, crc)
    trailer = crc.to_bytes(4, "little") + ((mib * MiB) & 0xFFFFFFFF).to_bytes(4, "little")
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + one * mib + tail + trailer


BOMB = _gzip_bomb(512)  # 512 MiB inflated from about 520 KiB


class HostileServer:
    """A gateway that misbehaves on purpose; the first path segment says how (``/stall/v1/chat/completions``)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._behaviours: dict[str, Callable[[socket.socket], None]] = {
            "ok": self._ok,
            "silent": self._silent,
            "stall": lambda conn: self._stall(conn, streamed=True),
            "stalljson": lambda conn: self._stall(conn, streamed=False),
            "trickle": lambda conn: self._trickle(conn, b"200 OK"),
            "trickle402": lambda conn: self._trickle(conn, b"402 Payment Required"),
            "bomb": lambda conn: self._bomb(conn, b"application/json"),
            "bombstream": lambda conn: self._bomb(conn, b"text/event-stream"),
        }

    def __enter__(self) -> HostileServer:
        accept = threading.Thread(target=self._serve, daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=GIVE_UP + 2)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            worker = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            worker.start()
            self._threads.append(worker)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                part = conn.recv(65536)
                if not part:
                    return
                data += part
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length:
                body += conn.recv(65536)
            mode = head.split(b" ", 2)[1].decode().strip("/").split("/", 1)[0]
            if b"\r\nx-hostile-mode: ok" in head.lower():  # a warm-up call
                mode = "ok"
            with contextlib.suppress(OSError):  # the client went away: that is what a deadline does
                self._behaviours[mode](conn)

    def _until_given_up(self) -> Iterator[float]:
        start = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - start < GIVE_UP:
            yield time.monotonic() - start

    def _ok(self, conn: socket.socket) -> None:
        answer = (
            b'{"id":"c","object":"chat.completion","created":0,"model":"hostile/model","choices":[{"index":0,'
            b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
        )
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (len(answer), answer)
        )

    def _silent(self, conn: socket.socket) -> None:
        self._hang_on(conn)

    def _hang_on(self, conn: socket.socket) -> None:
        """Send nothing more, until the client hangs up."""
        conn.settimeout(0.05)
        for _ in self._until_given_up():
            try:
                if not conn.recv(1):
                    return
            except TimeoutError:
                continue

    def _stall(self, conn: socket.socket, streamed: bool) -> None:
        if streamed:
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            conn.sendall(head + b"%x\r\n%s\r\n" % (len(FIRST_CHUNK), FIRST_CHUNK))
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
        self._hang_on(conn)

    def _trickle(self, conn: socket.socket, status: bytes) -> None:
        conn.sendall(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n{" % status)
        for _ in self._until_given_up():
            conn.sendall(b" ")
            time.sleep(0.05)

    def _bomb(self, conn: socket.socket, content_type: bytes) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (content_type, len(BOMB))
        )
        conn.sendall(BOMB)


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with HostileServer() as running:
        yield running


def gateway(server: HostileServer, mode: str) -> Gateway:
    return Gateway(
        f"{server.url}/{mode}/v1",
        ledger="memory://",
        policy=Policy(),
        prices={MODEL: ModelPrice.from_usd("10", "30")},
        max_stream_seconds=MAX_STREAM,
    )


def sync_client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), max_retries=0, timeout=10.0
    )


def async_client(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gw.base_url, api_key=gw.api_key, http_client=gw.async_http_client(), max_retries=0, timeout=10.0
    )


def reconciled(gw: Gateway, *, charged: bool, here: bool = True, warm_ups: int = 0) -> Receipt:
    """The one receipt of the call, with the ledger agreeing: nothing left reserved, the receipt's cost spent.
    ``here``: the call ran in this context (not in a task of its own), so its receipt is ``current_receipt`` here."""
    *before, receipt = gw.receipts()
    assert len(before) == warm_ups  # one receipt for the call
    assert receipt is gw.last_receipt
    if here:  # set in the caller's context, also when the ledger ran on a worker thread
        assert current_receipt.get() is receipt
    assert receipt.error is not None
    if charged:  # an answer cut short: counted by its reservation, not as free
        assert receipt.cost == receipt.reserved > 0
    else:  # a 402 whose body never arrived: nothing was signed, nothing is owed
        assert receipt.cost == 0 and receipt.payment is None
    totals = gw.ledger.totals(gw.agent, datetime.fromtimestamp(receipt.started_at, UTC).date().isoformat())
    assert totals.day_reserved == 0
    assert totals.day_spent == receipt.cost + sum(r.cost for r in before)
    return receipt


TIMEOUTS = (openai.APITimeoutError, httpx.ReadTimeout)
HOSTILE = [("stall", True), ("stalljson", False), ("trickle", False), ("trickle402", False)]
"""A stream silent after its first chunk, an answer silent after its first byte, an answer and a 402 body that
trickle a byte every 50 ms: each read arrives in time, the body never ends."""


def call(client: openai.OpenAI, stream: bool) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100, stream=stream)  # type: ignore[call-overload]
    if stream:
        for _ in reply:
            pass


async def acall(client: openai.AsyncOpenAI, stream: bool) -> None:
    reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100, stream=stream)  # type: ignore[call-overload]
    if stream:
        async for _ in reply:
            pass


@pytest.mark.parametrize(("mode", "stream"), HOSTILE)
def test_a_hostile_body_ends_by_its_deadline(server: HostileServer, mode: str, stream: bool) -> None:
    gw = gateway(server, mode)
    client = sync_client(gw)
    start = time.monotonic()
    with pytest.raises(TIMEOUTS):
        call(client, stream)
    elapsed = time.monotonic() - start
    assert elapsed < MAX_STREAM + MARGIN, f"{mode}: the call ended after {elapsed:.2f} s"
    receipt = reconciled(gw, charged=mode != "trickle402")
    assert receipt.error == "ReadTimeout"


@pytest.mark.parametrize(("mode", "stream"), HOSTILE)
async def test_a_hostile_body_ends_by_its_deadline_async(server: HostileServer, mode: str, stream: bool) -> None:
    gw = gateway(server, mode)
    client = async_client(gw)
    start = time.monotonic()
    with pytest.raises(TIMEOUTS):
        await acall(client, stream)
    elapsed = time.monotonic() - start
    assert elapsed < MAX_STREAM + MARGIN, f"{mode}: the call ended after {elapsed:.2f} s"
    receipt = reconciled(gw, charged=mode != "trickle402")
    assert receipt.error == "ReadTimeout"
    await client.close()


def read_whole(client: httpx2.Client, url: str, body: dict[str, object]) -> None:
    with client.stream("POST", url, json=body) as response:
        response.read()


@pytest.mark.parametrize(("mode", "stream"), HOSTILE)
def test_the_httpx2_stack_keeps_the_deadlines_too(server: HostileServer, mode: str, stream: bool) -> None:
    gw = gateway(server, mode)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": stream}
    start = time.monotonic()
    with gw.httpx2_client(timeout=10.0) as client, pytest.raises(httpx2.ReadTimeout):
        read_whole(client, f"{gw.base_url}/chat/completions", body)
    elapsed = time.monotonic() - start
    assert elapsed < MAX_STREAM + MARGIN, f"{mode}: the call ended after {elapsed:.2f} s"
    reconciled(gw, charged=mode != "trickle402")


@pytest.mark.parametrize(("mode", "stream"), HOSTILE)
async def test_the_async_httpx2_stack_keeps_the_deadlines_too(server: HostileServer, mode: str, stream: bool) -> None:
    gw = gateway(server, mode)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": stream}
    start = time.monotonic()
    async with gw.async_httpx2_client(timeout=10.0) as client:
        with pytest.raises(httpx2.ReadTimeout):
            async with client.stream("POST", f"{gw.base_url}/chat/completions", json=body) as response:
                await response.aread()
    elapsed = time.monotonic() - start
    assert elapsed < MAX_STREAM + MARGIN, f"{mode}: the call ended after {elapsed:.2f} s"
    reconciled(gw, charged=mode != "trickle402")


def test_a_request_of_llm402s_own_is_not_awaited_forever(server: HostileServer) -> None:
    """On a credit gateway without a key, llm402 first asks for one (its own request, not the caller's): a gateway
    that never answers it holds the call no longer than the deadline either."""
    gw = Gateway(
        f"{server.url}/silent/v1",
        wallet=Wallet.create(),
        profile="token-kiosk",
        ledger="memory://",
        policy=Policy(),
        prices={MODEL: ModelPrice.from_usd("10", "30")},
        max_stream_seconds=MAX_STREAM,
    )
    start = time.monotonic()
    with pytest.raises(TIMEOUTS):
        call(sync_client(gw), stream=False)
    elapsed = time.monotonic() - start
    assert elapsed < MAX_STREAM + MARGIN, f"the key mint was awaited {elapsed:.2f} s"


@pytest.mark.parametrize(("mode", "stream"), [("silent", False), ("stall", True), ("stalljson", False)])
async def test_a_call_the_caller_cancels_still_leaves_its_receipt(
    server: HostileServer, mode: str, stream: bool
) -> None:
    """The caller's own deadline (``asyncio.wait_for``) cancels the call, waiting for the headers or the body: the
    cancellation goes on at once, and the call is still reconciled."""
    gw = gateway(server, mode)
    client = async_client(gw)
    warm = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, extra_headers={"x-hostile-mode": "ok"}
    )  # type: ignore[arg-type]
    assert warm.choices  # the SDK's first-call set-up is done: the cancellation below lands in llm402's hands
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(acall(client, stream), 0.3)
    assert time.monotonic() - start < 1.0
    receipt = reconciled(
        gw, charged=mode != "silent", here=False, warm_ups=1
    )  # silent: no answer began, nothing is owed
    assert receipt.error == "CancelledError"
    await client.close()


@pytest.mark.parametrize("mode", ["bomb", "bombstream"])
def test_a_gzip_bomb_costs_the_meter_little_and_reaches_the_caller_unchanged(server: HostileServer, mode: str) -> None:
    gw = gateway(server, mode)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": mode == "bombstream"}
    with gw.http_client(timeout=10.0) as client:
        cpu = time.thread_time()  # the meter runs in the thread that reads the body
        with client.stream("POST", f"{gw.base_url}/chat/completions", json=body) as response:
            raw = b"".join(response.iter_raw())
        cpu = time.thread_time() - cpu
    assert raw == BOMB
    assert cpu < 0.3, f"reading a {len(BOMB) >> 10} KiB gzip bomb cost {cpu:.2f} s of CPU"
    (receipt,) = gw.receipts()
    assert receipt.error is None and receipt.prompt_tokens == 0  # no usage read from it...
    assert receipt.cost == receipt.reserved > 0  # ...so counted by its reservation


# --- invariant 10: the ledger's I/O never runs on the event loop -------------------------------------------------


def _hold_write_lock(path: Path, seconds: float, holding: threading.Event) -> None:
    """What another process sharing the ledger does: take SQLite's write lock and keep it a while."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        holding.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_a_held_ledger_lock_does_not_stall_the_event_loop(sandbox: SandboxServer, tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    gw = Gateway(f"{sandbox.url}/free/v1", ledger=f"sqlite:///{path}", policy=Policy())
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.async_http_client())
    await client.chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    holding = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, 1.0, holding))
    holder.start()
    assert holding.wait(5)
    worst, beating = 0.0, True

    async def heartbeat() -> None:
        nonlocal worst
        last = time.monotonic()
        while beating:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            worst, last = max(worst, now - last), now

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.02)
    start = time.monotonic()
    reply = await client.chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    took = time.monotonic() - start
    beating = False
    await beat
    await asyncio.to_thread(holder.join)
    assert reply.choices
    assert took > 0.8, "the call did not wait for the ledger's lock: this test measures nothing"
    assert worst < 0.2, f"the event loop stalled {worst:.3f} s while the ledger's write lock was held"
    assert current_receipt.get() is gw.last_receipt is not None
    await client.close()
    gw.close()
