"""The event loop's worst stall while another connection holds the SQLite ledger's write lock (invariant 10: async
clients do no ledger or signing I/O on the loop), and what keeping the ledger off the loop costs an async call.

    .venv/bin/python benchmarks/loop_stall.py [--hold 1.0] [--rounds 5] [--calls 300]

1. A thread with its own sqlite3 connection holds ``BEGIN IMMEDIATE`` on the ledger file for ``--hold`` seconds while
   an ``AsyncOpenAI`` call runs through llm402 against the embedded sandbox on 127.0.0.1; a heartbeat task on the same
   loop records its longest gap. Goal: under 10 ms (the call itself waits for the lock, the loop does not).
2. The median async unpaid call, ``AsyncOpenAI`` on llm402's client vs the plain client, interleaved (a b, b a, ...),
   with the SQLite ledger and the memory ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import openai

from llm402 import Gateway, Policy
from llm402.sandbox import SandboxConfig, SandboxServer

MESSAGES = [{"role": "user", "content": "keep the loop running"}]
HEARTBEAT = 0.001


def hold_write_lock(path: Path, seconds: float, holding: threading.Event) -> None:
    """What another process does to a shared ledger: take its write lock, and keep it for a while."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        holding.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def worst_stall(
    call: Callable[[], Awaitable[object]], ledger: Path, hold: float, wait: bool = False
) -> tuple[float, float]:
    """(the loop's longest gap beyond its heartbeat, how long the call took) while the ledger's lock is held; with
    ``wait``, the loop idles after the call until the lock is released (a plain client, which never waits for it)."""
    holding = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(ledger, hold, holding))
    holder.start()
    holding.wait()
    stop = False
    worst = 0.0

    async def heartbeat() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(HEARTBEAT)
            now = time.perf_counter()
            worst = max(worst, now - last - HEARTBEAT)
            last = now

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.05)  # the heartbeat is running before the call starts
    start = time.perf_counter()
    await call()
    while wait and holder.is_alive():
        await asyncio.sleep(0.01)
    took = time.perf_counter() - start
    stop = True
    await beat
    await asyncio.to_thread(holder.join)
    return worst, took


async def interleaved(
    a: Callable[[], Awaitable[object]], b: Callable[[], Awaitable[object]], n: int
) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, alternating which goes first."""
    xs: list[float] = []
    ys: list[float] = []
    for i in range(n):
        for fn, out in ((a, xs), (b, ys)) if i % 2 == 0 else ((b, ys), (a, xs)):
            start = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - start)
    return statistics.median(xs), statistics.median(ys)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch, SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        ledger = Path(scratch) / "ledger.db"
        base = f"{sandbox.url}/free/v1"
        on_sqlite = Gateway(base, ledger=f"sqlite:///{ledger}", policy=Policy())
        in_memory = Gateway(base, ledger="memory://", policy=Policy())
        ours = openai.AsyncOpenAI(base_url=base, api_key=on_sqlite.api_key, http_client=on_sqlite.async_http_client())
        ours_memory = openai.AsyncOpenAI(
            base_url=base, api_key=in_memory.api_key, http_client=in_memory.async_http_client()
        )
        plain = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)

        def chat(client: openai.AsyncOpenAI) -> Callable[[], Awaitable[object]]:
            return lambda: client.chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]

        for client in (ours, ours_memory, plain):
            for _ in range(20):
                await chat(client)()

        stalls = [await worst_stall(chat(ours), ledger, args.hold) for _ in range(args.rounds)]
        floor = [await worst_stall(chat(plain), ledger, args.hold, wait=True) for _ in range(args.rounds)]
        worst = max(s for s, _ in stalls)
        print(
            f"1. event loop's worst stall while the ledger's write lock is held {args.hold:g} s: "
            f"{worst * 1e3:.1f} ms (of {args.rounds} calls, each {min(t for _, t in stalls):.2f}"
            f"-{max(t for _, t in stalls):.2f} s long; goal < 10 ms); a plain client's call meanwhile: "
            f"{max(s for s, _ in floor) * 1e3:.1f} ms (this machine's floor)"
        )
        a, b = await interleaved(chat(ours), chat(plain), args.calls)
        print(f"2a. async unpaid call, sqlite ledger: llm402 {a * 1e3:.3f} ms vs plain {b * 1e3:.3f} ms ({a / b:.3f}x)")
        a, b = await interleaved(chat(ours_memory), chat(plain), args.calls)
        print(f"2b. async unpaid call, memory ledger: llm402 {a * 1e3:.3f} ms vs plain {b * 1e3:.3f} ms ({a / b:.3f}x)")
        for client in (ours, ours_memory, plain):
            await client.close()
        on_sqlite.close()


def main() -> int:
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser()
    parser.add_argument("--hold", type=float, default=1.0, help="seconds the other connection holds the write lock")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
