"""Where the benchmark's hot paths spend their time, client thread and sandbox thread apart.

    .venv/bin/python benchmarks/hotpaths.py split                 # CPU per call of each thread, no profiler
    .venv/bin/python benchmarks/hotpaths.py diff warm unpaid      # cProfile own time per call, A minus B
    .venv/bin/python benchmarks/hotpaths.py profile stream        # pyinstrument call trees (a ``dev`` extra)

Scenarios (the calls of ``benchmarks/run.py``, same sandbox on 127.0.0.1): ``plain`` (the OpenAI SDK's own client),
``unpaid`` (through llm402), ``warm`` (paid, ``one_round_trip=True``), ``stream`` and ``stream-plain`` (200 chunks).
``split`` runs them interleaved and prints medians of wall time, client-thread CPU and sandbox-thread CPU (Linux:
``/proc/self/task/<tid>/schedstat``); the sandbox runs in this process, so both threads share one GIL and their CPU
adds up to the wall time. Profiles inflate small functions; read them for where, ``split`` and ``run.py`` for how much.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai

from llm402 import Gateway, Policy, Wallet
from llm402.sandbox import SandboxConfig, SandboxServer

MESSAGES = [{"role": "user", "content": "benchmark the paying transport"}]
Call = Callable[[], object]


def scenarios(sandbox: SandboxServer) -> dict[str, Call]:
    """The benchmark's calls, warmed up."""
    wallet = Wallet.create()
    httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": 10**12})
    free = Gateway(f"{sandbox.url}/free/v1", ledger="memory://", policy=Policy())
    warm = Gateway(
        f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1", one_round_trip=True)
    )
    plain = openai.OpenAI(base_url=f"{sandbox.url}/free/v1", api_key="none", max_retries=0)
    ours = openai.OpenAI(base_url=free.base_url, api_key=free.api_key, http_client=free.http_client())
    paid = openai.OpenAI(base_url=warm.base_url, api_key=warm.api_key, http_client=warm.http_client())

    def chat(client: openai.OpenAI) -> Call:
        return lambda: client.chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]

    def stream(client: openai.OpenAI) -> Call:
        def run() -> None:
            for _ in client.chat.completions.create(
                model="sandbox/small",
                messages=[{"role": "user", "content": "word " * 200}],
                stream=True,
                max_tokens=200,
            ):
                pass

        return run

    calls = {
        "plain": chat(plain),
        "unpaid": chat(ours),
        "warm": chat(paid),
        "stream": stream(ours),
        "stream-plain": stream(plain),
    }
    for call in calls.values():
        for _ in range(10):
            call()
    return calls


class SandboxThread:
    """The sandbox's event-loop thread: its CPU time, and profilers started and stopped inside it."""

    def __init__(self, sandbox: SandboxServer) -> None:
        server: Any = sandbox._server  # a measuring tool reaches in on purpose
        self._loop: asyncio.AbstractEventLoop = server.servers[0].get_loop()
        self._tid = next(t.native_id for t in threading.enumerate() if t.name == "llm402-sandbox")

    def cpu(self) -> float:
        """Seconds of CPU the thread has used (Linux)."""
        with open(f"/proc/self/task/{self._tid}/schedstat") as stat:
            return int(stat.read().split()[0]) / 1e9

    def run(self, fn: Callable[[], object]) -> None:
        async def call() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(call(), self._loop).result()


def split(calls: dict[str, Call], names: list[str], n: int, thread: SandboxThread) -> None:
    """Medians of wall, client CPU and sandbox CPU per call, the scenarios interleaved (order alternating)."""
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    for i in range(n):
        for name in names if i % 2 == 0 else names[::-1]:
            server, wall, cpu = thread.cpu(), time.perf_counter(), time.thread_time()
            calls[name]()
            cpu, wall, server = time.thread_time() - cpu, time.perf_counter() - wall, thread.cpu() - server
            samples[name].append((wall, cpu, server))
    print(f"{'scenario':14s} {'wall ms':>9s} {'client CPU ms':>14s} {'sandbox CPU ms':>15s}   (medians of {n})")
    for name, rows in samples.items():
        wall, cpu, server = (statistics.median(column) for column in zip(*rows, strict=True))
        print(f"{name:14s} {wall * 1e3:9.3f} {cpu * 1e3:14.3f} {server * 1e3:15.3f}")


def own_times(call: Call, n: int, thread: SandboxThread | None) -> dict[tuple[str, int, str], tuple[int, float]]:
    """cProfile (calls, own seconds) per function over ``n`` calls, in this thread or the sandbox's."""
    profiler = cProfile.Profile()
    thread.run(profiler.enable) if thread else profiler.enable()
    for _ in range(n):
        call()
    thread.run(profiler.disable) if thread else profiler.disable()
    stats: Any = pstats.Stats(profiler)
    return {key: (row[1], row[2]) for key, row in stats.stats.items()}


def diff(calls: dict[str, Call], a: str, b: str, n: int, thread: SandboxThread, limit: int) -> None:
    """Own time per call of ``a`` minus ``b``, per function, client and sandbox threads."""
    for side, where in (("client", None), ("sandbox", thread)):
        ta, tb = own_times(calls[a], n, where), own_times(calls[b], n, where)
        total = (sum(t for _, t in ta.values()) - sum(t for _, t in tb.values())) / n
        print(f"--- {side} thread: {a} - {b} = {total * 1e6:.0f} us own time per call (cProfile-inflated) ---")
        rows = []
        for key in ta.keys() | tb.keys():
            (ca, oa), (cb, ob) = ta.get(key, (0, 0.0)), tb.get(key, (0, 0.0))
            rows.append(((oa - ob) / n, (ca - cb) / n, key))
        for own, count, (path, line, name) in sorted(rows, reverse=True)[:limit]:
            short = path.split("site-packages/")[-1].split("/src/")[-1]
            print(f"{own * 1e6:8.1f} us {count:+6.1f} calls  {short}:{line}({name})")


def profile(calls: dict[str, Call], name: str, n: int, thread: SandboxThread) -> None:
    """pyinstrument trees of both threads."""
    from pyinstrument import Profiler

    client, server = Profiler(interval=0.0005, async_mode="disabled"), Profiler(interval=0.0005, async_mode="disabled")
    thread.run(server.start)
    client.start()
    for _ in range(n):
        calls[name]()
    client.stop()
    thread.run(server.stop)
    print(f"--- client thread: {name} ---\n{client.output_text(time='percent_of_total')}")
    print(f"--- sandbox thread: {name} ---\n{server.output_text(time='percent_of_total')}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["split", "diff", "profile"])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--calls", type=int, default=500, help="calls per scenario (streams: a tenth)")
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        calls, thread = scenarios(sandbox), SandboxThread(sandbox)
        streams = any(name.startswith("stream") for name in args.names)
        n = max(args.calls // 10, 10) if streams else args.calls
        if args.mode == "split":
            split(calls, args.names or ["plain", "unpaid", "warm"], n, thread)
        elif args.mode == "diff":
            a, b = args.names or ["unpaid", "plain"]
            diff(calls, a, b, n, thread, args.limit)
        else:
            profile(calls, (args.names or ["unpaid"])[0], n, thread)
    return 0


if __name__ == "__main__":
    sys.exit(main())
