"""The ``llm402`` command's error boundary, run as a real subprocess: against the sandbox and against a closed port.

Every failure is exactly one line on stderr (one JSON object with ``--json``), nothing on stdout, and its own exit
code: 2 usage, 3 configuration, 4 refused by policy, 5 gateway error, 6 network, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import SandboxView

from llm402 import Wallet, __version__
from llm402.cli import ENVIRONMENT, EXIT_CODES, build_parser
from llm402.sandbox import SandboxConfig, SandboxServer

CLI = [sys.executable, "-m", "llm402.cli"]


def cli(*argv: str, key: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if key is not None:
        env["LLM402_PRIVATE_KEY"] = key
    return subprocess.run(
        [*CLI, *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code`` and said why in exactly one stderr line (no traceback, nothing on stdout)."""
    lines = done.stderr.splitlines()
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    return lines[0]


def json_error(done: subprocess.CompletedProcess[str], code: int) -> dict[str, Any]:
    """With ``--json`` the one line is ``{"error": {"code", "message", "exit_code"}}``."""
    line = one_line(done, code)
    error: dict[str, Any] = json.loads(line)["error"]
    assert isinstance(error["code"], str) and error["message"] and error["exit_code"] == code
    return error


@pytest.fixture
def key(wallet: Wallet) -> str:
    return wallet.export_private_key()


# --- network ---------------------------------------------------------------------------------------------------


def test_connection_refused_is_one_line_and_exit_6(key: str) -> None:
    port = closed_port()
    base = f"http://127.0.0.1:{port}/v1"
    line = one_line(
        cli("chat", "--base-url", base, "--model", "m", "--message", "hi", "--ledger", "memory://", key=key), 6
    )
    assert line == f"llm402: connection refused by 127.0.0.1:{port}: is the gateway running there?"
    line = one_line(cli("models", "--base-url", base), 6)
    assert "connection refused" in line
    error = json_error(cli("models", "--base-url", base, "--json"), 6)
    assert error["code"] == "connection_refused" and f"127.0.0.1:{port}" in error["message"]
    error = json_error(cli("quote", "--base-url", base, "--model", "m", "--json"), 6)
    assert error["code"] == "connection_refused"


def test_dns_failure_is_one_line_and_exit_6(key: str) -> None:
    base = "http://no-such-gateway.invalid/v1"
    line = one_line(
        cli("chat", "--base-url", base, "--model", "m", "--message", "hi", "--ledger", "memory://", key=key), 6
    )
    assert line == "llm402: cannot resolve no-such-gateway.invalid: DNS lookup failed (check --base-url)"
    assert json_error(cli("models", "--base-url", base, "--json"), 6)["code"] == "dns_failure"


def test_unreachable_redis_ledger_is_one_line_and_exit_6_without_its_password() -> None:
    ledger = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    line = one_line(cli("spend", "--ledger", ledger), 6)
    assert line.startswith("llm402: cannot reach the ledger at redis://127.0.0.1:") and "is Redis running?" in line
    assert "hunter2" not in line
    error = json_error(cli("receipts", "--ledger", ledger, "--json"), 6)
    assert error["code"] == "ledger_unreachable" and "hunter2" not in error["message"]


# --- usage (the parser checks values) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["spend", "--since", "7parsecs"], "--since"),
        (["spend", "--since", "2025-13-45"], "--since"),
        (["topup", "--amount", "five", "--base-url", "http://127.0.0.1:9/v1"], "--amount"),
        (["topup", "--amount", "0.0000001", "--base-url", "http://127.0.0.1:9/v1"], "--amount"),
        (["topup", "--amount", "-1", "--base-url", "http://127.0.0.1:9/v1"], "--amount"),
        (["chat", "--model", "m", "--base-url", "gateway.example/v1"], "--base-url"),
        (["chat", "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--max-tokens", "many"], "--max-tokens"),
        (["chat", "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--timeout", "0"], "--timeout"),
        (["sandbox", "--port", "70000"], "--port"),
        (["spend", "--by", "colour"], "--by"),
        (["no-such-command"], "invalid choice"),
        (["chat", "--message", "hi"], "--model"),
    ],
)
def test_bad_values_are_usage_errors(argv: list[str], names: str) -> None:
    line = one_line(cli(*argv), 2)
    assert line.startswith("llm402") and names in line and "--help" in line
    error = json_error(cli(*argv, "--json"), 2)
    assert error["code"] == "usage" and names in error["message"]


def test_good_values_are_accepted(tmp_path: Path) -> None:
    ledger = f"sqlite:///{tmp_path}/ledger.db"
    for since in ("7d", "7days", "24h", "30m", "2w", "today", "2025-01-31", "2025-01-31T08:00", "2025-01-31T08:00Z"):
        done = cli("spend", "--since", since, "--ledger", ledger, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["totals"]["calls"] == 0
    assert not (tmp_path / "ledger.db").exists(), "a report never creates a ledger"


def test_keys_revoke_without_id_is_a_usage_error_and_sends_nothing(sandbox: SandboxServer, key: str) -> None:
    base = f"{sandbox.url}/kiosk/v1"
    line = one_line(cli("keys", "revoke", "--base-url", base, "--profile", "token-kiosk", key=key), 2)
    assert line.startswith("llm402 keys: revoke needs --id")
    # Against a closed port too: the command stops before any request (a request would be exit 6).
    one_line(cli("keys", "revoke", "--base-url", f"http://127.0.0.1:{closed_port()}/v1", key=key), 2)


# --- configuration, policy, gateway ------------------------------------------------------------------------------


def test_configuration_errors_exit_3(sandbox: SandboxServer, key: str, tmp_path: Path) -> None:
    base = f"{sandbox.url}/v1"
    line = one_line(cli("chat", "--base-url", base, "--model", "sandbox/small", "--message", "hi"), 3)
    assert line.startswith("llm402: wallet error: no wallet configured: set LLM402_PRIVATE_KEY")
    chat = ("chat", "--base-url", base, "--model", "sandbox/small", "--message", "hi", "--ledger", "memory://")
    line = one_line(cli(*chat, "--policy", str(tmp_path / "missing.toml"), key=key), 3)
    assert "cannot read policy file" in line
    (tmp_path / "typo.toml").write_text('max_paymnt_usd = "1"\n')
    error = json_error(cli(*chat, "--policy", str(tmp_path / "typo.toml"), "--json", key=key), 3)
    assert error["code"] == "configuration_error" and "max_paymnt_usd" in error["message"]
    line = one_line(cli("spend", "--ledger", "ftp://ledger"), 3)
    assert "unknown ledger URL scheme" in line
    line = one_line(cli("receipts", "--ledger", "redis://:hunter2@localhost:noport/0"), 3)
    assert line.startswith("llm402: invalid ledger URL redis://localhost:noport/0") and "hunter2" not in line


def test_a_policy_refusal_exits_4_and_pays_nothing(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    argv = ["chat", "--base-url", f"{sandbox.url}/v1", "--model", "sandbox/large", "--message", "hi"]
    argv += ["--max-tokens", "100000", "--ledger", "memory://"]
    line = one_line(cli(*argv, key=wallet.export_private_key()), 4)
    assert line.startswith("llm402: refused by policy (payment_over_ticket):") and "max ticket of $1.000000" in line
    error = json_error(cli(*argv, "--json", key=wallet.export_private_key()), 4)
    assert error["code"] == "payment_over_ticket" and error["details"]["cap"] == 1_000_000
    assert view.spent(wallet.address) == 0


def test_a_gateway_error_exits_5(sandbox: SandboxServer, key: str) -> None:
    argv = ["chat", "--base-url", f"{sandbox.url}/v1", "--model", "sandbox/nope", "--message", "hi"]
    line = one_line(cli(*argv, "--ledger", "memory://", key=key), 5)
    assert line.startswith("llm402: gateway error: HTTP 400") and "Unknown model" in line
    error = json_error(cli(*argv, "--ledger", "memory://", "--json", key=key), 5)
    assert error["details"] == {"status": 400}


# --- output ------------------------------------------------------------------------------------------------------


def test_version_and_help() -> None:
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"llm402 {__version__}"
    done = cli("--help")
    assert done.returncode == 0
    for name, _ in ENVIRONMENT:
        assert name in done.stdout
    for code, _ in EXIT_CODES:
        assert re.search(rf"^\s+{code}\s+\S", done.stdout, re.MULTILINE), code
    for name in ("LLM402_PRIVATE_KEY", "LLM402_KEYSTORE_PASSWORD", "LLM402_POLICY", "LLM402_LEDGER", "AISA_API_KEY"):
        assert name in done.stdout


def test_every_option_has_help() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"sandbox", "demo", "spend", "receipts", "quote", "chat", "models", "topup"} <= set(commands.choices)
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"llm402 {name} {action.option_strings or action.dest} has no help"
        assert any("--json" in a.option_strings for a in sub._actions), f"llm402 {name} takes --json"


def test_a_closed_stdout_is_not_an_error(sandbox: SandboxServer) -> None:
    """``llm402 models --json | head``: the reader goes away before the output is written."""
    proc = subprocess.Popen(
        [*CLI, "models", "--base-url", f"{sandbox.url}/v1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""
    done = subprocess.run(
        f"{' '.join(CLI)} models --base-url {sandbox.url}/v1 --json | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout == "[" and done.stderr == ""


def test_chat_stream_reports_tokens_from_the_receipt(sandbox: SandboxServer, key: str) -> None:
    argv = ["chat", "--base-url", f"{sandbox.url}/v1", "--model", "sandbox/small", "--message", "count my tokens"]
    done = cli(*argv, "--stream", "--ledger", "memory://", key=key)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Echo: count my tokens"
    match = re.search(r"sandbox/small · (\d+)\+(\d+) tokens · \$0\.\d{6}", done.stderr)
    assert match and int(match[1]) > 0 and int(match[2]) > 0, done.stderr
    data = json.loads(cli(*argv, "--stream", "--ledger", "memory://", "--json", key=key).stdout)
    assert data["receipt"]["prompt_tokens"] > 0 and data["cost_usd"] == data["receipt"]["cost_usd"]


@contextmanager
def ctrl_c_reaches_children() -> Iterator[None]:
    """Start children with SIGINT's default action, as a shell in a terminal does. Run from a background job
    (``pytest &``) the tests inherit SIGINT ignored, and an ignored signal stays ignored across exec, so Ctrl-C would
    not reach the CLI at all; a handled one is reset to the default there."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_stream_says_what_it_cost(tmp_path: Path) -> None:
    with SandboxServer(SandboxConfig(db_path=":memory:", faults="stream_forever")) as server:
        view = SandboxView(server)
        wallet = view.funded_wallet()
        env = {**os.environ, "LLM402_PRIVATE_KEY": wallet.export_private_key()}
        argv = ["chat", "--base-url", f"{server.url}/v1", "--model", "sandbox/small", "--message", "go on forever"]
        with ctrl_c_reaches_children():
            proc = subprocess.Popen(
                [*CLI, *argv, "--stream", "--ledger", f"sqlite:///{tmp_path}/ledger.db"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        deadline = time.monotonic() + 30
        while view.spent(wallet.address) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        paid = view.spent(wallet.address)
        assert paid > 0, "the stream is paid and running"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"llm402: interrupted: this call cost ${paid / 1e6:.6f} so far (sandbox/small, ")


def test_demo_and_sandbox_take_json() -> None:
    done = cli("demo", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    demo = json.loads(done.stdout)
    assert demo["balanced"] is True and len(demo["calls"]) == 7
    assert demo["total"] == sum(c["cost"] for c in demo["calls"]) and re.fullmatch(r"\d+\.\d{6}", demo["total_usd"])
    with ctrl_c_reaches_children():
        proc = subprocess.Popen(
            [*CLI, "sandbox", "--json", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert httpx.get(f"{info['base_url']}/models", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out == "" and err == "", err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = str(taken.getsockname()[1])
        assert "cannot listen on 127.0.0.1:" in one_line(cli("sandbox", "--port", port), 3)
        assert json_error(cli("sandbox", "--port", port, "--json"), 3)["code"] == "configuration_error"
    finally:
        taken.close()
