"""A hostile gateway (the sandbox's fault modes) cannot make llm402 pay twice, pay more, or leak a payment."""

from __future__ import annotations

import httpx
import openai
import pytest
from e2e_support import FUNDS, SandboxView

from llm402 import Gateway, Policy, Wallet
from llm402.openai import refusal_from_error
from llm402.sandbox import SandboxConfig, SandboxServer

MESSAGES = [{"role": "user", "content": "hostile"}]


def call(gw: Gateway, fault: str | None, **kw: object) -> openai.types.chat.ChatCompletion:
    headers = {"X-Sandbox-Fault": fault} if fault else {}
    client = openai.OpenAI(
        base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client(), default_headers=headers, **kw
    )  # type: ignore[arg-type]
    return client.chat.completions.create(model="sandbox/small", messages=MESSAGES, max_tokens=32)  # type: ignore[arg-type]


def refusal_code(gw: Gateway, fault: str | None, **kw: object) -> str:
    with pytest.raises(openai.APIStatusError) as info:
        call(gw, fault, **kw)
    refusal = refusal_from_error(info.value)
    assert refusal is not None, info.value.response.text
    return refusal.code


def gateway(sandbox: SandboxServer, wallet: Wallet, **policy: object) -> Gateway:
    return Gateway(
        f"{sandbox.url}/v1",
        wallet=wallet,
        ledger="memory://",
        max_stream_seconds=1.0,
        policy=Policy(max_payment_usd="0.05", **policy),  # type: ignore[arg-type]
    )


def test_redirect_after_payment_is_not_followed(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    with SandboxServer(SandboxConfig(db_path=":memory:")) as elsewhere:
        gw = gateway(sandbox, wallet)
        code = refusal_code(gw, f"redirect_after_402={elsewhere.url}/v1/chat/completions")
        assert code == "payment_redirected"
        assert httpx.get(f"{elsewhere.url}/sandbox/stats").json()["signatures_seen"] == 0
    assert view.stats(wallet.address)["signatures_seen"] == 1
    # the redirected gateway still holds a valid authorization: llm402 counts it as spent (conservative)
    assert view.balance(wallet.address) == FUNDS
    receipt = gw.last_receipt
    assert receipt is not None
    assert receipt.payment is not None
    assert receipt.cost == receipt.payment.amount > 0


@pytest.mark.parametrize("fault", ["change_payee_on_replay", "change_amount_on_replay", "replay_402"])
def test_a_second_402_after_paying_is_never_paid(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, fault: str
) -> None:
    gw = gateway(sandbox, wallet)
    assert refusal_code(gw, fault) == "payment_rejected"
    assert view.stats(wallet.address)["signatures_seen"] == 1
    assert view.balance(wallet.address) == FUNDS


@pytest.mark.parametrize(
    ("policy", "code"),
    [
        ({"allowed_networks": frozenset({"eip155:8453"})}, "network_not_allowed"),
        ({"allowed_assets": frozenset({"0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"})}, "asset_not_allowed"),
        ({"max_validity_seconds": 30}, "validity_too_long"),
        ({"allowed_payees": frozenset({"0x" + "ab" * 20})}, "payee_not_allowed"),
    ],
)
def test_what_the_policy_does_not_allow_is_never_signed(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet, policy: dict[str, object], code: str
) -> None:
    assert refusal_code(gateway(sandbox, wallet, **policy), None) == code
    assert view.stats(wallet.address)["signatures_seen"] == 0


def test_endless_stream_times_out_and_is_reconciled(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = gateway(sandbox, wallet)
    client = openai.OpenAI(
        base_url=gw.base_url,
        api_key=gw.api_key,
        http_client=gw.http_client(),
        default_headers={"X-Sandbox-Fault": "stream_forever"},
        timeout=httpx.Timeout(1.0, read=0.3),
        max_retries=0,
    )
    stream = client.chat.completions.create(model="sandbox/small", messages=MESSAGES, stream=True)  # type: ignore[call-overload]
    with pytest.raises((openai.APITimeoutError, httpx.TimeoutException, openai.APIConnectionError)):
        for _ in stream:
            pass
    receipt = gw.last_receipt
    assert receipt is not None
    assert receipt.payment is not None
    assert receipt.error is not None
    assert receipt.cost == receipt.payment.amount == FUNDS - view.balance(wallet.address)


def test_oversized_answer_does_not_break_metering(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = gateway(sandbox, wallet)
    reply = call(gw, "oversized=20000000")
    assert reply.choices
    assert gw.last_receipt is not None
    assert gw.last_receipt.cost == FUNDS - view.balance(wallet.address)


def test_settlement_for_another_payer_is_not_trusted(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = gateway(sandbox, wallet)
    call(gw, f"settlement_payer={'0x' + 'cd' * 20}")
    receipt = gw.last_receipt
    assert receipt is not None
    assert receipt.payment is not None
    assert receipt.payment.transaction is None
    assert receipt.cost == receipt.payment.amount == FUNDS - view.balance(wallet.address)
