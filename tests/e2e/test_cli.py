"""The ``llm402`` command against the sandbox: spend, quote, and the credit-gateway account commands."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from e2e_support import SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.cli import main
from llm402.sandbox import SandboxServer


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_spend_shows_costs_and_cache_savings(
    sandbox: SandboxServer, wallet: Wallet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = f"sqlite:///{tmp_path}/ledger.db"
    gw = Gateway(
        f"{sandbox.url}/v1",
        wallet=wallet,
        ledger=ledger,
        agent="cli",
        intent="judging",
        response_cache=True,
        policy=Policy(max_payment_usd="0.05"),
    )
    client = gw.http_client()
    body = {"model": "sandbox/small", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    for _ in range(3):
        assert client.post(f"{gw.base_url}/chat/completions", json=body).status_code == 200
    gw.close()
    report = run(capsys, "spend", "--by", "intent", "--ledger", ledger)
    assert isinstance(report, dict)
    (row,) = report["groups"]
    paid = [
        r for r in Gateway(f"{sandbox.url}/v1", ledger=ledger).receipts(every_gateway=True) if r.payment is not None
    ]
    assert row["key"] == "judging"
    assert row["calls"] == 3
    assert row["cost"] == paid[0].cost
    assert row["saved"] == 2 * paid[0].cost


def test_quote(sandbox: SandboxServer, capsys: pytest.CaptureFixture[str]) -> None:
    data = run(capsys, "quote", "--base-url", f"{sandbox.url}/v1", "--model", "sandbox/small", "--max-tokens", "64")
    assert isinstance(data, dict)
    assert data["network"] == "eip155:84532"
    assert data["amount"] > 0


def test_credit_account_commands(
    sandbox: SandboxServer,
    view: SandboxView,
    wallet: Wallet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM402_PRIVATE_KEY", wallet.export_private_key())
    monkeypatch.setenv("LLM402_POLICY", str(tmp_path / "policy.toml"))
    (tmp_path / "policy.toml").write_text('topup_max_usd = "2"\n')
    base = ["--base-url", f"{sandbox.url}/kiosk/v1", "--profile", "token-kiosk", "--ledger", "memory://"]
    topup = run(capsys, "topup", "--amount", "1", *base)
    assert isinstance(topup, list)
    assert topup[0]["amount"] == 1_000_000
    balance = run(capsys, "balance", *base)
    assert isinstance(balance, dict)
    assert balance["available_usdc"] == 1_000_000
    key_file = tmp_path / "cli.key"
    created = run(capsys, "keys", "create", "--label", "cli", "--key-store", str(key_file), *base)
    assert isinstance(created, list)
    assert key_file.read_text().startswith("sk-")
    assert "sk-" not in json.dumps(created), "a stored key is not printed"
    listed = run(capsys, "keys", "list", *base)
    assert isinstance(listed, list)
    assert [k["label"] for k in listed] == ["cli"]
    key = key_file.read_text().strip()
    httpx.post(
        f"{sandbox.url}/kiosk/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "sandbox/small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    ).raise_for_status()
    usage = run(capsys, "usage", "--api-key", key, *base)
    assert isinstance(usage, dict)
    assert usage["keys"][0]["request_count"] == 1
    revoked = run(capsys, "keys", "revoke", "--id", str(listed[0]["id"]), *base)
    assert isinstance(revoked, list)
    assert revoked[0]["revoked"] is True
    assert view.balance(wallet.address) < 5_000_000
