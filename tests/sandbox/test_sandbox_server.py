"""Running the sandbox: fast start/stop without leaks, restart on a file keeps state, the CLI, upstream forwarding."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from starlette.applications import Starlette

from llm402.sandbox import SandboxConfig, SandboxServer, create_app
from llm402.sandbox.__main__ import build_parser
from llm402.sandbox.config import OTHER_PAYEE_ADDRESS, PAYEE_ADDRESS, PAYEE_KEY

from .conftest import CHAT, FUNDS, Kit


def test_start_and_stop_are_fast_and_leak_no_thread() -> None:
    before = set(threading.enumerate())
    for _ in range(3):
        started = time.monotonic()
        server = SandboxServer(SandboxConfig(db_path=":memory:")).start()
        assert time.monotonic() - started < 0.5
        assert server.url == f"http://127.0.0.1:{server.port}" and not server.url.endswith("/")
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        stopping = time.monotonic()
        server.stop()
        assert time.monotonic() - stopping < 0.5
        server.stop()  # idempotent
    assert set(threading.enumerate()) == before
    with pytest.raises(RuntimeError):
        _ = server.url


def test_loopback_round_trips_do_not_wait_for_delayed_acks(kit: Kit) -> None:
    timings = []
    for _ in range(15):
        started = time.perf_counter()
        kit.http.get("/health")
        timings.append(time.perf_counter() - started)
    assert sorted(timings)[len(timings) // 2] < 0.02, timings  # ~40 ms each without TCP_NODELAY


def test_create_app_and_fixed_payee() -> None:
    assert isinstance(create_app(SandboxConfig()), Starlette)
    assert Account.from_key(PAYEE_KEY).address == PAYEE_ADDRESS == SandboxConfig().payee
    changed = "0x" + hashlib.sha256(b"llm402 sandbox payee (changed)").hexdigest()
    assert Account.from_key(changed).address == OTHER_PAYEE_ADDRESS
    with pytest.raises(ValueError, match="default_dialect"):
        SandboxConfig(default_dialect="v3")  # type: ignore[arg-type]


def test_restart_on_a_file_keeps_state(tmp_path: Path) -> None:
    db = str(tmp_path / "sandbox.db")
    with SandboxServer(SandboxConfig(db_path=db)) as first:
        kit = Kit(first)
        account, key = kit.credit_wallet(1)
        kit.fund(account.address)
        challenge = kit.http.post("/v1/chat/completions", json=CHAT)
        payment = kit.sdk_headers(account, challenge)
        assert kit.http.post("/v1/chat/completions", json=CHAT, headers=payment).status_code == 200
        auth = {"Authorization": f"Bearer {key}"}
        assert kit.http.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
        siwe = kit.siwe(account)
        assert kit.http.get("/v1/auth/keys", params=siwe).status_code == 200
        usdc = kit.usdc(account.address)
        usage = kit.http.get(f"/v1/usage/{account.address}", headers=auth).json()
        topups = kit.http.get(f"/v1/topups/{account.address}", headers=auth).json()
        settlements = kit.settlements(account.address)
        stats = kit.stats(account.address)
        port = first.port
        kit.http.close()
    assert usdc == FUNDS - 21 and len(settlements) == 2

    with SandboxServer(SandboxConfig(db_path=db), port=port) as second:  # same host:port, so the SIWE domain matches
        kit = Kit(second)
        assert kit.usdc(account.address) == usdc
        assert kit.http.get(f"/v1/usage/{account.address}", headers=auth).json() == usage
        assert kit.http.get(f"/v1/topups/{account.address}", headers=auth).json() == topups
        assert kit.settlements(account.address) == settlements
        assert kit.stats(account.address) == stats
        replay = kit.http.post("/v1/chat/completions", json=CHAT, headers=payment)
        assert replay.status_code == 402 and replay.headers["x-sandbox-refusal"] == "nonce_already_used"
        reused = kit.http.get("/v1/auth/keys", params=siwe)
        assert reused.status_code == 401 and "nonce already used" in reused.json()["message"]
        assert kit.http.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
        assert kit.usdc(account.address) == usdc
        kit.http.close()


def test_cli_serves_and_prints_a_402_curl_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "llm402.sandbox",
        "--port",
        "0",
        "--db",
        str(tmp_path / "cli.db"),
        "--dialect",
        "v1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "llm402 sandbox listening on http://127.0.0.1:" in banner and "dialect v1" in banner
        url = banner.split("listening on ", 1)[1].split()[0]
        curl = process.stdout.readline()
        assert "curl -i" in curl and "/v1/chat/completions" in curl
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert response.status_code == 402 and response.json()["x402Version"] == 1
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert (tmp_path / "cli.db").exists()


def test_cli_parser() -> None:
    args = build_parser().parse_args(["--port", "9000", "--db", "x.db", "--host", "0.0.0.0", "--dialect", "kiosk"])
    assert (args.port, args.db, args.host, args.dialect) == (9000, "x.db", "0.0.0.0", "kiosk")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dialect", "v3"])


def test_forwarding_to_an_upstream(make_sandbox: Any) -> None:
    upstream: Kit = make_sandbox()
    upstream_wallet, upstream_key = upstream.credit_wallet(1)
    front: Kit = make_sandbox(upstream_url=f"{upstream.url}/v1", upstream_api_key=upstream_key)
    payer = front.wallet()
    plain = front.pay("/v1/chat/completions", CHAT, payer)
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] == "Echo: Explain x402 in one line"
    body = {**CHAT, "stream": True}
    first = front.http.post("/v1/chat/completions", json=body)
    with front.http.stream("POST", "/v1/chat/completions", json=body, headers=front.sdk_headers(payer, first)) as r:
        assert r.status_code == 200 and "payment-response" in r.headers
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["choices"] for c in chunks), "the usage chunk llm402 asked upstream for is not passed on"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Echo: Explain x402 in one line"
    assert front.usdc(payer.address) == FUNDS - 2 * 21
    report = upstream.http.get(
        f"/v1/usage/{upstream_wallet.address}", headers={"Authorization": f"Bearer {upstream_key}"}
    ).json()
    assert report["keys"][0]["request_count"] == 2 and report["keys"][0]["total_completion_tokens"] == 14

    front_wallet, front_key = front.credit_wallet(1)
    streamed = {**body, "stream_options": {"include_usage": True}}
    auth = {"Authorization": f"Bearer {front_key}"}
    with front.http.stream("POST", "/v1/chat/completions", json=streamed, headers=auth) as r:
        last = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")][-1]
    assert last["usage"]["completion_tokens"] == 7
    usage = front.http.get(f"/v1/usage/{front_wallet.address}", headers=auth).json()
    assert usage["keys"][0]["total_completion_tokens"] == 7 and usage["locked_usdc"] == 0


def test_unreachable_upstream_is_502_and_settles_nothing(make_sandbox: Any) -> None:
    front: Kit = make_sandbox(upstream_url="http://127.0.0.1:9/v1")
    payer = front.wallet()
    for body in (CHAT, {**CHAT, "stream": True}):
        first = front.http.post("/v1/chat/completions", json=body)
        response = front.http.post("/v1/chat/completions", json=body, headers=front.sdk_headers(payer, first))
        assert response.status_code == 502 and response.json()["error"] == "UPSTREAM_ERROR"
    assert front.usdc(payer.address) == FUNDS and front.stats(payer.address)["settled"] == 0
