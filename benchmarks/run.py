"""llm402 benchmarks: every figure is a ratio against the raw baseline, measured in one run on this machine.

    .venv/bin/python benchmarks/run.py [--calls N] [--json PATH]

Runs against the embedded sandbox on 127.0.0.1. Prints a table (figure, llm402, baseline, ratio) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
from rich.console import Console
from rich.table import Table

from llm402 import Gateway, Policy, Wallet
from llm402.sandbox import SandboxConfig, SandboxServer
from llm402.x402 import parse_challenge, select_requirement, sign_payment

MESSAGES = [{"role": "user", "content": "benchmark the paying transport"}]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def interleaved(a: Callable[[], object], b: Callable[[], object], n: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, alternating calls so drift hits both alike."""
    xs, ys = [], []
    for _ in range(n):
        xs += timed(a, 1)
        ys += timed(b, 1)
    return statistics.median(xs), statistics.median(ys)


def first_chunk(client: openai.OpenAI, model: str) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True, max_tokens=16)  # type: ignore[call-overload]
    for _ in stream:
        elapsed = time.perf_counter() - start
        break
    stream.close()
    return elapsed


def import_time() -> tuple[float, float]:
    def run(code: str) -> float:
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return run("import llm402"), run("pass")


def main() -> int:
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # streams closed early on purpose (time to first chunk)
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", default="benchmarks/results/latest.json")
    args = parser.parse_args()
    n = args.calls
    rows: list[dict[str, Any]] = []

    def row(figure: str, ours: float, base: float, unit: str, goal: str = "") -> None:
        rows.append(
            {"figure": figure, "llm402": ours, "baseline": base, "ratio": ours / base, "unit": unit, "goal": goal}
        )

    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet = Wallet.create()
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": 1_000_000_000})
        free = Gateway(f"{sandbox.url}/free/v1", ledger="memory://", policy=Policy())
        paid = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
        plain = openai.OpenAI(base_url=f"{sandbox.url}/free/v1", api_key="none", max_retries=0)
        ours_free = openai.OpenAI(base_url=free.base_url, api_key=free.api_key, http_client=free.http_client())
        ours_paid = openai.OpenAI(base_url=paid.base_url, api_key=paid.api_key, http_client=paid.http_client())

        def chat(client: openai.OpenAI) -> Callable[[], object]:
            return lambda: client.chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]

        for client in (plain, ours_free, ours_paid):  # warm connections and lazy imports
            for _ in range(5):
                chat(client)()
        ours, base = interleaved(chat(ours_free), chat(plain), n)
        row("unpaid call (OpenAI SDK, llm402 client vs plain client)", ours * 1e3, base * 1e3, "ms", "<= 1.05")
        paid_t, unpaid_t = interleaved(chat(ours_paid), chat(ours_free), n)
        row("paid call (402 + signed replay) vs unpaid call", paid_t * 1e3, unpaid_t * 1e3, "ms")
        ttfb_ours, ttfb_base = interleaved(
            lambda: first_chunk(ours_free, "sandbox/small"), lambda: first_chunk(plain, "sandbox/small"), n // 2
        )
        row("stream: time to first chunk vs plain client", ttfb_ours * 1e3, ttfb_base * 1e3, "ms", "<= 1.05")

        # payment payload creation (the SDK's EVM exact scheme through our Wallet, coincurve installed)
        challenge_resp = httpx.post(
            f"{paid.base_url}/chat/completions", json={"model": "sandbox/small", "messages": MESSAGES}
        )
        challenge = parse_challenge(challenge_resp.headers, challenge_resp.content)
        assert challenge is not None
        requirement = select_requirement(challenge, Policy(max_payment_usd="1"))
        sign_payment(challenge, requirement, wallet, paid.base_url)
        signing = statistics.median(timed(lambda: sign_payment(challenge, requirement, wallet, paid.base_url), 300))
        rows.append(
            {
                "figure": "payment payload creation (median)",
                "llm402": signing * 1e3,
                "baseline": None,
                "ratio": None,
                "unit": "ms",
                "goal": "<= 0.35 ms",
            }
        )
    ours_import, bare = import_time()
    row(
        "`import llm402` (python -c, incl. interpreter start)",
        ours_import * 1e3,
        bare * 1e3,
        "ms",
        "<= 150 ms of own cost",
    )

    table = Table(title=f"llm402 benchmarks ({platform.processor() or platform.machine()}, {n} calls each, loopback)")
    for column in ("figure", "llm402", "baseline", "ratio", "goal"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["figure"],
            f"{r['llm402']:.3f} {r['unit']}",
            "-" if r["baseline"] is None else f"{r['baseline']:.3f} {r['unit']}",
            "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
            r["goal"],
        )
    Console().print(table)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": platform.platform(), "python": platform.python_version(), "rows": rows}, indent=2)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
