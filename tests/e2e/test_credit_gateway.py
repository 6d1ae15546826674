"""Credit gateways over HTTP (Token Kiosk in the sandbox): SIWE keys, automatic top-up, quotes, the approver."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import openai
import pytest
from e2e_support import FUNDS, SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.approval import Approval, PaymentProposal
from llm402.openai import refusal_from_error
from llm402.sandbox import SandboxServer

MESSAGES = [{"role": "user", "content": "What is x402?"}]


def kiosk(sandbox: SandboxServer, wallet: Wallet, tmp_path: Path, **kw: object) -> Gateway:
    kw.setdefault("policy", Policy(max_payment_usd="0.05", daily_cap_usd="5", topup_max_usd="2"))
    gw = Gateway(
        f"{sandbox.url}/kiosk/v1",
        wallet=wallet,
        profile="token-kiosk",
        ledger="memory://",
        key_store=str(tmp_path / "keys" / "kiosk.key"),
        **kw,  # type: ignore[arg-type]
    )
    gw.load_prices()
    return gw


def client_for(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client())


def test_first_call_mints_a_key_tops_up_and_succeeds(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, tmp_path: Path
) -> None:
    gw = kiosk(sandbox, wallet, tmp_path)
    reply = client_for(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=64)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    key_file = tmp_path / "keys" / "kiosk.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = key_file.read_text().strip()
    assert key.startswith("sk-")
    assert len(key) == 67
    receipts = list(gw.receipts())
    topups = [r for r in receipts if r.payment is not None and r.payment.kind == "topup"]
    calls = [r for r in receipts if r.path.endswith("/chat/completions")]
    assert len(topups) == 1
    assert len(calls) == 1
    assert topups[0].payment is not None
    assert topups[0].payment.amount == 1_000_000  # the gateway's $1 minimum
    assert FUNDS - view.balance(wallet.address) == 1_000_000
    usage = httpx.get(f"{gw.base_url}/usage/{wallet.address}", headers={"authorization": f"Bearer {key}"}).json()
    assert usage["keys"][0]["request_count"] == 1
    assert usage["keys"][0]["total_charged_usdc"] == calls[0].cost > 0
    assert usage["keys"][0]["total_prompt_tokens"] == calls[0].prompt_tokens
    assert usage["keys"][0]["total_completion_tokens"] == calls[0].completion_tokens
    # a second gateway on the same key file reuses the key: no new mint, no new top-up
    again = kiosk(sandbox, wallet, tmp_path)
    client_for(again).chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=64)  # type: ignore[arg-type]
    assert [r for r in again.receipts() if r.payment is not None] == []
    assert httpx.get(f"{gw.base_url}/balance/{wallet.address}").json()["available_usdc"] < 1_000_000


def test_topup_above_the_policy_limit_is_refused_and_nothing_paid(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, tmp_path: Path
) -> None:
    gw = kiosk(sandbox, wallet, tmp_path, policy=Policy(topup_max_usd="0.50"))
    with pytest.raises(openai.APIStatusError) as info:
        client_for(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    refusal = refusal_from_error(info.value)
    assert refusal is not None
    assert refusal.code == "topup_refused"
    assert "top-up limit" in refusal.message
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS


def test_topup_above_the_remaining_budget_is_refused(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, tmp_path: Path
) -> None:
    gw = kiosk(sandbox, wallet, tmp_path, policy=Policy(daily_cap_usd="0.50", topup_max_usd="5"))
    with pytest.raises(openai.APIStatusError) as info:
        client_for(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=16)  # type: ignore[arg-type]
    refusal = refusal_from_error(info.value)
    assert refusal is not None
    assert refusal.code == "topup_refused"
    assert view.stats(wallet.address)["signatures_seen"] == 0


def test_revoked_key_names_the_fix(sandbox: SandboxServer, view: SandboxView, wallet: Wallet, tmp_path: Path) -> None:
    gw = kiosk(sandbox, wallet, tmp_path)
    with gw.credit_account() as account:
        account.topup("1")
        created = account.create_key("to-revoke")
        assert any(k["id"] == created["id"] for k in account.list_keys())
        assert account.revoke_key(created["id"])
    revoked = Gateway(
        f"{sandbox.url}/kiosk/v1", wallet=wallet, profile="token-kiosk", api_key=created["key"], ledger="memory://"
    )
    with pytest.raises(openai.AuthenticationError) as info:
        client_for(revoked).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    refusal = refusal_from_error(info.value)
    body = info.value.response.json()["error"]
    assert body["code"] == "api_key_rejected"
    assert "llm402 keys create" in body["message"]
    assert refusal is not None
    assert refusal.code == "api_key_rejected"  # a 401 the SDK raises as AuthenticationError, typed by llm402
    assert created["key"] not in info.value.response.text


def test_quote_is_exactly_what_the_call_charges(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(max_payment_usd="0.05"))
    body = {"model": "sandbox/medium", "messages": MESSAGES, "max_tokens": 128}
    quote = gw.quote(body)
    assert quote.requirement.network == "eip155:84532"
    assert quote.valid_until > quote.quoted_at
    client_for(gw).chat.completions.create(**body)  # type: ignore[arg-type]
    assert gw.last_receipt is not None
    assert gw.last_receipt.cost == quote.amount == FUNDS - view.balance(wallet.address)


def test_approver_denies_approves_or_supplies_the_header(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    seen: list[PaymentProposal] = []

    def deny(proposal: PaymentProposal) -> Approval:
        seen.append(proposal)
        return Approval.deny("treasury closed")

    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", approver=deny)
    with pytest.raises(openai.APIStatusError) as info:
        client_for(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    refusal = refusal_from_error(info.value)
    assert refusal is not None
    assert refusal.code == "approval_denied"
    assert "treasury closed" in refusal.message
    assert seen[0].amount > 0
    assert view.stats(wallet.address)["signatures_seen"] == 0

    approving = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", approver=lambda p: True)
    client_for(approving).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert view.stats(wallet.address)["signatures_seen"] == 1

    # a treasury signs elsewhere (here: another wallet, as a separate service would); llm402 only replays
    treasury = Wallet.create()
    view.fund(treasury.address)

    def external(proposal: PaymentProposal) -> Approval:
        from llm402.x402 import Challenge, sign_payment

        challenge = Challenge(proposal.dialect, (proposal.requirement,), None, None)
        return Approval.external(sign_payment(challenge, proposal.requirement, treasury, proposal.url).header_value)

    ext = Gateway(f"{sandbox.url}/v1", ledger="memory://", approver=external)
    client_for(ext).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert view.stats(treasury.address)["settled"] == 1
    assert ext.last_receipt is not None
    assert ext.last_receipt.payment is not None
    assert ext.last_receipt.payment.payer == treasury.address


def test_kiosk_strips_rejected_fields(sandbox: SandboxServer, wallet: Wallet, tmp_path: Path) -> None:
    gw = kiosk(sandbox, wallet, tmp_path)
    reply = client_for(gw).chat.completions.create(
        model="sandbox/small",
        messages=MESSAGES,  # type: ignore[arg-type]
        reasoning_effort="low",
        max_tokens=32,
    )
    assert reply.choices[0].message.content
