"""llm402 against the sandbox's MPP mounts, through an unchanged OpenAI SDK: ``/mpp/v1`` (MPP alone), ``/mpp-auth/v1``
(the credential in ``Payment-Authorization``) and the dual-rail ``/dual/v1``. The sandbox verifies every payment for
real and its own books (balances, settlements, signatures seen) are the independent side of every check."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import openai
import pytest

from llm402 import Gateway, Policy, Wallet
from llm402.openai import typed_error
from llm402.sandbox import SandboxServer
from llm402.x402 import parse_challenge, select_requirement, sign_payment
from sandbox_view import FUNDS, SandboxView

MESSAGES = [{"role": "user", "content": "Say hi"}]
MOUNTS = ["mpp", "mpp-auth", "dual"]


def gateway(sandbox: SandboxServer, mount: str, wallet: Wallet, **policy: Any) -> Gateway:
    policy.setdefault("max_payment_usd", "1")
    return Gateway(f"{sandbox.url}/{mount}/v1", wallet=wallet, ledger="memory://", policy=Policy(**policy))


def client(gw: Gateway, **kw: Any) -> openai.OpenAI:
    kw.setdefault("api_key", gw.api_key)
    return openai.OpenAI(base_url=gw.base_url, http_client=gw.http_client(), **kw)


def ledger_total(gw: Gateway) -> int:
    totals = gw.ledger.totals(gw.agent, time.strftime("%Y-%m-%d", time.gmtime()))
    return int(totals.day_spent + totals.day_reserved)


def check_books(view: SandboxView, gw: Gateway, wallet: Wallet, calls: int) -> None:
    """Receipts equal to the sandbox's settlements to the atomic unit, one signature per call, the ledger the same."""
    receipts = list(gw.receipts())
    settlements = view.settlements(wallet.address)
    stats = view.stats(wallet.address)
    assert len(receipts) == len(settlements) == calls
    assert stats["signatures_seen"] == calls, "one signature per call"
    assert [r.cost for r in receipts] == [s["amount"] for s in settlements]
    assert [r.payment.amount for r in receipts if r.payment] == [s["amount"] for s in settlements]
    assert sum(r.cost for r in receipts) == view.spent(wallet.address) == ledger_total(gw)


@pytest.mark.parametrize("mount", MOUNTS)
def test_sync_and_streamed_calls(sandbox: SandboxServer, view: SandboxView, wallet: Wallet, mount: str) -> None:
    gw = gateway(sandbox, mount, wallet)
    sdk = client(gw)
    reply = sdk.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    stream = sdk.chat.completions.create(model="sandbox/small", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks), "the usage chunk llm402 asked for is not passed on"
    sdk.embeddings.create(model="sandbox/small", input="hello")
    check_books(view, gw, wallet, 3)


@pytest.mark.parametrize("mount", MOUNTS)
async def test_async_calls(sandbox: SandboxServer, view: SandboxView, wallet: Wallet, mount: str) -> None:
    gw = gateway(sandbox, mount, wallet)
    sdk = openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.async_http_client())
    reply = await sdk.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    stream = await sdk.chat.completions.create(model="sandbox/small", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await sdk.close()
    check_books(view, gw, wallet, 2)


def test_dual_rail_pays_by_x402_and_names_the_transaction(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = gateway(sandbox, "dual", wallet)
    client(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    [settlement] = view.settlements(wallet.address)
    receipt = gw.last_receipt
    assert receipt is not None and receipt.payment is not None
    assert receipt.payment.transaction == settlement["transaction"]


def test_mpp_receipts_name_the_transaction(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = gateway(sandbox, "mpp", wallet)
    client(gw).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    [settlement] = view.settlements(wallet.address)
    receipt = gw.last_receipt
    assert receipt is not None and receipt.payment is not None
    assert receipt.payment.transaction == settlement["transaction"]


def test_over_ticket_is_refused_locally(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = gateway(sandbox, "mpp", wallet, max_payment_usd="0.0001")
    with pytest.raises(openai.APIStatusError) as refused:
        client(gw, max_retries=0).chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    error = typed_error(refused.value)
    assert error is not None and error.code == "payment_over_ticket"
    assert view.stats(wallet.address)["signatures_seen"] == 0
    assert view.balance(wallet.address) == FUNDS


def test_a_lost_answer_is_never_paid_again(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    gw = gateway(sandbox, "mpp", wallet)
    sdk = client(gw, max_retries=2)
    for _ in range(2):
        with pytest.raises(openai.APIStatusError):
            sdk.chat.completions.create(
                model="sandbox/small",
                messages=MESSAGES,  # type: ignore[arg-type]
                extra_headers={"X-Sandbox-Fault": "fail_after_settle"},
            )
    stats = view.stats(wallet.address)
    assert stats["signatures_seen"] == 1 and stats["settled"] == 1
    assert stats["refused"] == {"nonce_already_used": 1}, "the retry re-sent the one credential; it was refused"
    assert sum(r.cost for r in gw.receipts()) == view.spent(wallet.address)


def _unpaid(url: str, body: dict[str, Any]) -> httpx.Response:
    response = httpx.post(url, json=body)
    assert response.status_code == 402
    return response


def test_the_sandbox_verifies_the_echo_for_real(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    """An echo that drops ``opaque``, a credential replayed with another body, or one replayed as is: refused."""
    url = f"{sandbox.url}/mpp/v1/chat/completions"
    body = {"model": "sandbox/small", "messages": MESSAGES}
    unpaid = _unpaid(url, body)
    challenge = parse_challenge(unpaid.headers, unpaid.content)
    assert challenge is not None
    payment = sign_payment(challenge, select_requirement(challenge, Policy()), wallet, url)
    token = json.loads(base64.urlsafe_b64decode(payment.header_value[8:] + "=="))
    stripped = {**token, "challenge": {k: v for k, v in token["challenge"].items() if k != "opaque"}}
    forged = "Payment " + base64.urlsafe_b64encode(json.dumps(stripped).encode()).decode().rstrip("=")
    refused = httpx.post(url, content=json.dumps(body).encode(), headers={"authorization": forged})
    assert refused.status_code == 402 and "invalid-challenge" in refused.json()["type"]
    other_body = httpx.post(url, json={**body, "max_tokens": 7}, headers={"authorization": payment.header_value})
    assert other_body.status_code == 402
    assert view.stats(wallet.address)["settled"] == 0


def test_a_replayed_credential_gets_403(sandbox: SandboxServer, view: SandboxView, wallet: Wallet) -> None:
    url = f"{sandbox.url}/mpp/v1/chat/completions"
    body = json.dumps({"model": "sandbox/small", "messages": MESSAGES}).encode()
    unpaid = httpx.post(url, content=body, headers={"content-type": "application/json"})
    challenge = parse_challenge(unpaid.headers, unpaid.content)
    assert challenge is not None
    payment = sign_payment(challenge, select_requirement(challenge, Policy()), wallet, url)
    headers = {"content-type": "application/json", "authorization": payment.header_value}
    first = httpx.post(url, content=body, headers=headers)
    assert first.status_code == 200 and first.headers["payment-receipt"]
    again = httpx.post(url, content=body, headers=headers)
    assert again.status_code == 403
    assert again.json()["type"] == "https://paymentauth.org/problems/verification-failed"
    assert view.stats(wallet.address)["settled"] == 1


def test_dual_rail_refuses_x402_without_the_route_binding(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    from dataclasses import replace

    url = f"{sandbox.url}/dual/v1/chat/completions"
    body = json.dumps({"model": "sandbox/small", "messages": MESSAGES}).encode()
    unpaid = httpx.post(url, content=body, headers={"content-type": "application/json"})
    challenge = parse_challenge(unpaid.headers, unpaid.content)
    assert challenge is not None
    plain = replace(challenge, extensions=None, requirements=challenge.requirements[:1])
    payment = sign_payment(plain, select_requirement(plain, Policy()), wallet, url)
    refused = httpx.post(
        url, content=body, headers={"content-type": "application/json", payment.header_name: payment.header_value}
    )
    assert refused.status_code == 402
    assert json.loads(base64.b64decode(refused.headers["payment-required"]))["error"] == "route_not_bound"
    assert view.stats(wallet.address)["settled"] == 0


def test_the_callers_authorization_goes_along_with_payment_authorization(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    gw = gateway(sandbox, "mpp-auth", wallet)
    raw = client(gw, api_key="sk-callers-own-key").chat.completions.with_raw_response.create(
        model="sandbox/small",
        messages=MESSAGES,  # type: ignore[arg-type]
    )
    assert raw.headers["x-sandbox-authorization"] == "present"
    check_books(view, gw, wallet, 1)


def test_one_round_trip_never_answers_an_mpp_challenge_twice(
    sandbox: SandboxServer, view: SandboxView, wallet: Wallet
) -> None:
    """A remembered MPP challenge is single-use (its id is the nonce): the next call of the same shape never signs it
    again. Today the guard in x402 refuses it locally; with the core's single_use check it pays the next 402."""
    gw = gateway(sandbox, "mpp", wallet, one_round_trip=True)
    sdk = client(gw, max_retries=0)
    sdk.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
    try:
        sdk.chat.completions.create(model="sandbox/small", messages=MESSAGES)  # type: ignore[arg-type]
        paid = 2
    except openai.APIStatusError as refused:
        error = typed_error(refused)
        assert error is not None and error.code == "mpp_challenge_reused"
        paid = 1
    stats = view.stats(wallet.address)
    assert stats["settled"] == stats["signatures_seen"] == paid
    assert stats["refused"] == {}
    assert sum(r.cost for r in gw.receipts()) == view.spent(wallet.address) == ledger_total(gw)
