"""llm402 benchmarks: every figure is a ratio against the raw baseline on this machine, measured in one run.

    .venv/bin/python benchmarks/run.py [--calls N] [--json PATH] [--memory-calls N]

Runs against the embedded sandbox on 127.0.0.1 (and a throwaway redis-server when one is installed). Prints a table
(figure, llm402, baseline, ratio, goal) and writes JSON. Absolute times are medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
from ledgers import measure as ledger_figures  # benchmarks/ledgers.py, beside this script
from rich.console import Console
from rich.table import Table

from llm402 import Gateway, Policy, Wallet
from llm402.sandbox import SandboxConfig, SandboxServer
from llm402.transport import PaymentTransport
from llm402.x402 import parse_challenge, select_requirement, sign_payment

MESSAGES = [{"role": "user", "content": "benchmark the paying transport"}]
SDK_SIGNING = """
import statistics, time, base64, json
from eth_account import Account
from x402.mechanisms.evm.exact.client import ExactEvmScheme
from x402.schemas import PaymentRequirements
req = PaymentRequirements.model_validate({"scheme": "exact", "network": "eip155:84532",
    "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "amount": "5000", "payTo": "0x" + "ab" * 20,
    "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}})
scheme = ExactEvmScheme(Account.create())
for _ in range(10):
    scheme.create_payment_payload(req)
samples = []
for _ in range(200):
    t = time.perf_counter()
    inner = scheme.create_payment_payload(req)
    base64.b64encode(json.dumps({"x402Version": 2, "payload": inner}).encode())
    samples.append(time.perf_counter() - t)
print(statistics.median(samples))
"""


def median_of(fn: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved(a: Callable[[], object], b: Callable[[], object], n: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, alternating (a b, b a, a b, ...) so drift on a noisy machine, and whatever
    the call before leaves behind (caches, the other thread's leftover work), hit both alike."""
    xs, ys = [], []
    for i in range(n):
        if i % 2:
            ys.append(median_of(b, 1))
            xs.append(median_of(a, 1))
        else:
            xs.append(median_of(a, 1))
            ys.append(median_of(b, 1))
    return statistics.median(xs), statistics.median(ys)


def stream_figures(client: openai.OpenAI, max_tokens: int) -> tuple[float, float]:
    """(time to first chunk, chunks per second) of one streamed answer."""
    start = time.perf_counter()
    first = 0.0
    chunks = 0
    stream = client.chat.completions.create(
        model="sandbox/small",
        messages=[{"role": "user", "content": "word " * max_tokens}],
        stream=True,
        max_tokens=max_tokens,
    )  # type: ignore[call-overload]
    for _ in stream:
        chunks += 1
        if chunks == 1:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return first, chunks / total


async def async_interleaved(a: Callable[[], Any], b: Callable[[], Any], n: int) -> tuple[float, float]:
    """`interleaved` for coroutine functions: medians of ``a()`` and ``b()`` awaited alternately in both orders."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(n):
        order = ((a, times[0]), (b, times[1])) if i % 2 == 0 else ((b, times[1]), (a, times[0]))
        for fn, samples in order:
            t = time.perf_counter()
            await fn()
            samples.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def import_cost() -> tuple[float, float]:
    def run(code: str) -> float:
        samples = []
        for _ in range(9):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return run("import llm402"), run("pass")


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_growth(calls: int) -> tuple[float, float]:
    """RSS (MiB) after 10% of ``calls`` mixed calls and after all of them, through the paying transport over an
    in-memory gateway (1 in 10 paid with a real signature, streams and plain answers mixed)."""
    import base64

    challenge = {
        "x402Version": 2,
        "accepts": [
            {
                "scheme": "exact",
                "network": "eip155:84532",
                "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                "amount": "50",
                "payTo": "0x" + "ab" * 20,
                "maxTimeoutSeconds": 60,
                "extra": {"name": "USDC", "version": "2"},
            }
        ],
    }
    header = base64.b64encode(json.dumps(challenge).encode()).decode()
    answer = b'{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}'
    sse = (
        b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
    )

    def gateway(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/paid") and "payment-signature" not in request.headers:
            return httpx.Response(402, headers={"payment-required": header}, json={})
        return httpx.Response(200, content=sse if b'"stream":true' in request.content else answer)

    gw = Gateway("http://127.0.0.1:9/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy())
    client = httpx.Client(transport=PaymentTransport(gw.engine, httpx.MockTransport(gateway)))
    base = {"model": "m", "messages": MESSAGES}
    early = 0.0
    for index in range(calls):
        path = "/v1/paid" if index % 10 == 0 else "/v1/chat/completions"
        body = {**base, "stream": True} if index % 3 == 0 else base
        client.post(f"http://127.0.0.1:9{path}", json=body).read()
        if index == calls // 10:
            early = rss_mib()
    return rss_mib(), early


def paid_vs_x402_sdk(base: str, wallet: Wallet, n: int) -> tuple[float, float]:
    """Median paid call (a 402 round trip each time, async httpx) through llm402 and through the official x402 SDK's
    ``x402AsyncTransport`` paying the same sandbox route; each side pays with its own fresh wallet."""
    from eth_account import Account
    from x402 import x402Client
    from x402.http.clients.httpx import x402AsyncTransport
    from x402.mechanisms.evm.exact.client import ExactEvmScheme

    body = {"model": "sandbox/small", "messages": MESSAGES, "max_tokens": 16}
    account = Account.create()
    httpx.post(f"{base}/sandbox/faucet", json={"address": account.address, "amount": 10**12})
    sdk = x402Client().register("eip155:84532", ExactEvmScheme(account))
    gateway = Gateway(f"{base}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))

    async def measure() -> tuple[float, float]:
        import asyncio  # noqa: F401 (the loop `asyncio.run` gives both clients)

        async with gateway.async_http_client() as ours, httpx.AsyncClient(transport=x402AsyncTransport(sdk)) as theirs:

            async def pay_ours() -> None:
                response = await ours.post(f"{base}/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text

            async def pay_theirs() -> None:
                response = await theirs.post(f"{base}/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text

            await async_interleaved(pay_ours, pay_theirs, 10)  # warm both
            return await async_interleaved(pay_ours, pay_theirs, n)

    import asyncio

    return asyncio.run(measure())


def main() -> int:
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # streams closed early on purpose
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--memory-calls", type=int, default=100_000)
    parser.add_argument("--json", default="benchmarks/results/latest.json")
    args = parser.parse_args()
    n = args.calls
    rows: list[dict[str, Any]] = []

    def row(figure: str, ours: float, base: float | None, unit: str, goal: str = "", higher_is_better: bool = False):
        ratio = None if base in (None, 0) else ours / base  # type: ignore[operator]
        rows.append(
            {
                "figure": figure,
                "llm402": ours,
                "baseline": base,
                "ratio": ratio,
                "unit": unit,
                "goal": goal,
                "higher_is_better": higher_is_better,
            }
        )

    with SandboxServer(SandboxConfig(db_path=":memory:")) as sandbox:
        wallet = Wallet.create()
        httpx.post(f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": 10**12})
        free = Gateway(f"{sandbox.url}/free/v1", ledger="memory://", policy=Policy())
        paid = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="1"))
        warm = Gateway(
            f"{sandbox.url}/v1",
            wallet=wallet,
            ledger="memory://",
            policy=Policy(max_payment_usd="1", one_round_trip=True),
        )
        plain = openai.OpenAI(base_url=f"{sandbox.url}/free/v1", api_key="none", max_retries=0)
        ours = openai.OpenAI(base_url=free.base_url, api_key=free.api_key, http_client=free.http_client())
        ours_paid = openai.OpenAI(base_url=paid.base_url, api_key=paid.api_key, http_client=paid.http_client())
        ours_warm = openai.OpenAI(base_url=warm.base_url, api_key=warm.api_key, http_client=warm.http_client())

        def chat(client: openai.OpenAI) -> Callable[[], object]:
            return lambda: client.chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]

        for client in (plain, ours, ours_paid, ours_warm):
            for _ in range(10):
                chat(client)()
        a, b = interleaved(chat(ours), chat(plain), n)
        row("1. unpaid call: OpenAI SDK on the llm402 client vs the plain client", a * 1e3, b * 1e3, "ms", "<= 1.05")
        unpaid = a
        with tempfile.TemporaryDirectory() as scratch:
            durable = Gateway(f"{sandbox.url}/free/v1", ledger=f"sqlite:///{scratch}/bench.db", policy=Policy())
            ours_sqlite = openai.OpenAI(
                base_url=durable.base_url, api_key=durable.api_key, http_client=durable.http_client()
            )
            for _ in range(10):
                chat(ours_sqlite)()
            a, b = interleaved(chat(ours_sqlite), chat(plain), n)
            row("1b. unpaid call with the default SQLite ledger vs the plain client", a * 1e3, b * 1e3, "ms", "<= 1.15")
            durable.close()
        first = median_of(chat(ours_paid), max(n // 3, 20))
        row("2a. paid call, 402 round trip every call, vs unpaid call", first * 1e3, unpaid * 1e3, "ms")
        w, u = interleaved(chat(ours_warm), chat(ours), n)
        row("2b. warm paid call (one round trip) vs unpaid call", w * 1e3, u * 1e3, "ms", "<= 1.15")

        ours_sdk, theirs_sdk = paid_vs_x402_sdk(sandbox.url, wallet, max(n // 3, 30))
        row(
            "2c. paid call (402 round trip, async httpx) vs the x402 SDK's own httpx transport",
            ours_sdk * 1e3,
            theirs_sdk * 1e3,
            "ms",
            "<= 1.0",
        )

        response = httpx.post(
            f"{paid.base_url}/chat/completions", json={"model": "sandbox/small", "messages": MESSAGES}
        )
        challenge = parse_challenge(response.headers, response.content)
        assert challenge is not None
        requirement = select_requirement(challenge, Policy(max_payment_usd="1"))
        signing = median_of(lambda: sign_payment(challenge, requirement, wallet, paid.base_url), 300)
        env = {**os.environ, "ECC_BACKEND_CLASS": "eth_keys.backends.native.NativeECCBackend"}
        sdk = float(
            subprocess.run(
                [sys.executable, "-c", SDK_SIGNING], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
        row(
            "3. payment payload creation vs the x402 SDK without coincurve",
            signing * 1e3,
            sdk * 1e3,
            "ms",
            "<= 0.35 ms",
        )

        ttfb_ours, ttfb_plain, rate_ours, rate_plain = [], [], [], []
        pairs = [(ours, ttfb_ours, rate_ours), (plain, ttfb_plain, rate_plain)]
        for i in range(max(n // 5, 10)):  # alternating order, as `interleaved`
            for client, ttfb, rate in pairs if i % 2 == 0 else pairs[::-1]:
                t, r = stream_figures(client, 200)
                ttfb.append(t)
                rate.append(r)
        row(
            "5a. stream: time to first chunk vs the plain client",
            statistics.median(ttfb_ours) * 1e3,
            statistics.median(ttfb_plain) * 1e3,
            "ms",
            "<= 1.05",
        )
        row(
            "5b. stream: chunks per second vs the plain client",
            statistics.median(rate_ours),
            statistics.median(rate_plain),
            "chunks/s",
            ">= 0.95",
            higher_is_better=True,
        )

    ledger_rows = ledger_figures(seconds=1.5)
    ledger_goals = {"SQLite (WAL, synchronous=FULL": "5,000 on 1 thread", "Redis": "10,000 on 8 threads"}
    for entry in ledger_rows:
        if "one_thread" in entry:
            row(
                f"4. ledger reserve+settle per second, {entry['backend']}: 8 threads vs 1",
                entry["eight_threads"],
                entry["one_thread"],
                "pairs/s",
                next((goal for name, goal in ledger_goals.items() if entry["backend"].startswith(name)), ""),
                higher_is_better=True,
            )
    flush = next(entry["flush_ms"] for entry in ledger_rows if "flush_ms" in entry) / 1e3
    full = next(entry for entry in ledger_rows if entry["backend"].startswith("SQLite (WAL, synchronous=FULL"))
    row(
        "4b. SQLite (FULL), one thread vs this disk's bound (two fdatasyncs a pair)",
        full["one_thread"],
        1 / (2 * flush),
        "pairs/s",
        "<= 1 (physics)",
        higher_is_better=True,
    )

    total, bare = import_cost()
    row(
        "6. `import llm402` (fresh interpreter) vs a bare interpreter",
        total * 1e3,
        bare * 1e3,
        "ms",
        "own cost <= 150 ms",
    )
    after, early = memory_growth(args.memory_calls)
    row(
        f"7. resident memory after {args.memory_calls:,} mixed calls vs after 10%",
        after,
        early,
        "MiB",
        "flat (<= 1.05)",
    )

    table = Table(
        title=f"llm402 benchmarks: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, loopback, {n} calls per figure"
    )
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
    Console(width=160).print(table)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(), "rows": rows},
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
