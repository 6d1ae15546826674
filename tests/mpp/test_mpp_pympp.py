"""llm402 against pympp's own server (from PyPI, on 127.0.0.1), through an unchanged OpenAI SDK on llm402's clients.

``/mpp/v1`` offers MPP ``evm/charge`` alone; ``/dual/v1`` is pympp's default EVM route, dual-rail (MPP, and x402
``exact`` that must carry mppx's route binding). The server's settle hook verifies every EIP-3009 signature itself
and keeps the books the receipts are compared with, to the atomic unit."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import openai
import pytest
from pympp_server import PRICE_ATOMIC, PymppServer

from llm402 import Gateway, Policy, Wallet
from llm402.openai import typed_error
from llm402.receipts import Receipt
from llm402.x402 import parse_challenge, select_requirement, sign_payment

MESSAGES = [{"role": "user", "content": "hi"}]
BODY = {"model": "pympp/small", "messages": MESSAGES}
CREDENTIAL_FIELD = {"mpp": "authorization", "dual": "payment-signature"}


def gateway(server: PymppServer, mount: str, **policy: Any) -> Gateway:
    policy.setdefault("max_payment_usd", "0.01")
    return Gateway(f"{server.url}/{mount}/v1", wallet=Wallet.create(), ledger="memory://", policy=Policy(**policy))


def client(gw: Gateway, **kw: Any) -> openai.OpenAI:
    kw.setdefault("api_key", gw.api_key)
    return openai.OpenAI(base_url=gw.base_url, http_client=gw.http_client(), **kw)


def aclient(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.async_http_client())


def ledger_total(gw: Gateway) -> int:
    totals = gw.ledger.totals(gw.agent, time.strftime("%Y-%m-%d", time.gmtime()))
    return int(totals.day_spent + totals.day_reserved)


def payer(gw: Gateway) -> str:
    assert gw.wallet is not None
    return gw.wallet.address


def credentials_since(server: PymppServer, start: int) -> list[tuple[str, str, str]]:
    with server.books.lock:
        return server.books.credentials[start:]


def check_books(server: PymppServer, gw: Gateway, receipts: list[Receipt], mount: str, start: int) -> None:
    """One credential per call, in the rail's field; every receipt equal to what settled; the ledger equal to both."""
    settled = server.books.of(payer(gw))
    presented = credentials_since(server, start)
    assert len(presented) == len(receipts) == len(settled), "one credential per call"
    assert {field for _, field, _ in presented} == {CREDENTIAL_FIELD[mount]}
    assert len({value for _, _, value in presented}) == len(presented)
    assert [r.cost for r in receipts] == [s["amount"] for s in settled] == [PRICE_ATOMIC] * len(receipts)
    assert [r.payment.amount for r in receipts if r.payment] == [s["amount"] for s in settled]
    assert ledger_total(gw) == sum(s["amount"] for s in settled)
    assert all(r.payment is not None and r.payment.payer == payer(gw) for r in receipts)


@pytest.mark.parametrize("mount", ["mpp", "dual"])
def test_sync_calls(pympp_server: PymppServer, mount: str) -> None:
    gw = gateway(pympp_server, mount)
    start = len(pympp_server.books.credentials)
    sdk = client(gw)
    for _ in range(3):
        reply = sdk.chat.completions.create(model="pympp/small", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "hi there"
    check_books(pympp_server, gw, list(gw.receipts()), mount, start)


@pytest.mark.parametrize("mount", ["mpp", "dual"])
def test_streamed_calls(pympp_server: PymppServer, mount: str) -> None:
    gw = gateway(pympp_server, mount)
    start = len(pympp_server.books.credentials)
    for _ in range(2):
        stream = client(gw).chat.completions.create(model="pympp/small", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == "hi there"
    receipts = list(gw.receipts())
    assert all(r.streamed and r.completion_tokens == 2 for r in receipts)
    check_books(pympp_server, gw, receipts, mount, start)


@pytest.mark.parametrize("mount", ["mpp", "dual"])
async def test_async_calls_and_streams(pympp_server: PymppServer, mount: str) -> None:
    gw = gateway(pympp_server, mount)
    start = len(pympp_server.books.credentials)
    sdk = aclient(gw)
    reply = await sdk.chat.completions.create(model="pympp/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "hi there"
    stream = await sdk.chat.completions.create(model="pympp/small", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == "hi there"
    await sdk.close()
    check_books(pympp_server, gw, list(gw.receipts()), mount, start)


def test_dual_rail_receipts_name_the_settled_transaction(pympp_server: PymppServer) -> None:
    gw = gateway(pympp_server, "dual")
    client(gw).chat.completions.create(model="pympp/small", messages=MESSAGES)  # type: ignore[arg-type]
    [settled] = pympp_server.books.of(payer(gw))
    receipt = gw.last_receipt
    assert receipt is not None and receipt.payment is not None
    assert receipt.payment.transaction == settled["reference"]
    assert receipt.payment.settled is True


def test_mpp_receipts_name_the_settled_transaction(pympp_server: PymppServer) -> None:
    gw = gateway(pympp_server, "mpp")
    client(gw).chat.completions.create(model="pympp/small", messages=MESSAGES)  # type: ignore[arg-type]
    [settled] = pympp_server.books.of(payer(gw))
    receipt = gw.last_receipt
    assert receipt is not None and receipt.payment is not None
    assert receipt.payment.transaction == settled["reference"]


def test_the_policy_can_prefer_mpp_on_a_dual_rail_route(pympp_server: PymppServer) -> None:
    policy = Policy(max_payment_usd="0.01", payment_protocols=("mpp", "x402"))
    gw = Gateway(f"{pympp_server.url}/dual/v1", wallet=Wallet.create(), ledger="memory://", policy=policy)
    start = len(pympp_server.books.credentials)
    client(gw).chat.completions.create(model="pympp/small", messages=MESSAGES)  # type: ignore[arg-type]
    [(_, field, _)] = credentials_since(pympp_server, start)
    assert field == "authorization"
    assert [s["amount"] for s in pympp_server.books.of(payer(gw))] == [PRICE_ATOMIC]


@pytest.mark.parametrize("mount", ["mpp", "dual"])
def test_over_ticket_is_refused_before_any_credential(pympp_server: PymppServer, mount: str) -> None:
    gw = gateway(pympp_server, mount, max_payment_usd="0.001")
    start = len(pympp_server.books.credentials)
    with pytest.raises(openai.APIStatusError) as refused:
        client(gw, max_retries=0).chat.completions.create(model="pympp/small", messages=MESSAGES)  # type: ignore[arg-type]
    error = typed_error(refused.value)
    assert error is not None and error.code == "payment_over_ticket"
    assert credentials_since(pympp_server, start) == []
    assert pympp_server.books.of(payer(gw)) == []
    assert ledger_total(gw) == 0


@pytest.mark.parametrize("mount", ["mpp", "dual"])
def test_a_replayed_credential_is_refused(pympp_server: PymppServer, mount: str) -> None:
    gw = gateway(pympp_server, mount)
    start = len(pympp_server.books.credentials)
    client(gw).chat.completions.create(model="pympp/small", messages=MESSAGES)  # type: ignore[arg-type]
    [(_, field, value)] = credentials_since(pympp_server, start)
    again = httpx.post(f"{gw.base_url}/chat/completions", json=BODY, headers={field: value})
    assert again.status_code == 403
    assert again.json()["type"] == "https://paymentauth.org/problems/verification-failed"
    assert len(pympp_server.books.of(payer(gw))) == 1


@pytest.mark.parametrize("mount", ["mpp", "dual"])
def test_a_paid_call_whose_answer_is_lost_is_never_paid_again(pympp_server: PymppServer, mount: str) -> None:
    """The server settles, then fails; the caller retries the same request: llm402 re-sends the one credential,
    which the server refuses as replayed. One signature, one settlement."""
    gw = gateway(pympp_server, mount)
    start = len(pympp_server.books.credentials)
    sdk = client(gw, max_retries=3)
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(
            model="pympp/small",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"x-test-fail-after-settle": "1"},
        )
    with pytest.raises(openai.APIStatusError) as second:
        sdk.chat.completions.create(
            model="pympp/small",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"x-test-fail-after-settle": "1"},
        )
    assert second.value.status_code in (402, 403)
    presented = credentials_since(pympp_server, start)
    assert len(presented) == 2, "the SDK did not retry either answer (x-should-retry: false)"
    assert len({value for _, _, value in presented}) == 1, "the retry re-sent the same credential"
    assert len(pympp_server.books.of(payer(gw))) == 1
    assert sum(r.cost for r in gw.receipts()) == PRICE_ATOMIC, "counted once"


def test_a_replay_refusal_after_a_lost_answer_is_typed(pympp_server: PymppServer) -> None:
    gw = gateway(pympp_server, "mpp")
    sdk = client(gw, max_retries=0)
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as failed:
            sdk.chat.completions.create(
                model="pympp/small",
                messages=MESSAGES,  # type: ignore[arg-type]
                extra_headers={"x-test-fail-after-settle": "1"},
            )
    error = typed_error(failed.value)
    assert error is not None and error.code == "paid_answer_lost"


def test_an_x402_payment_without_the_route_binding_is_refused(pympp_server: PymppServer) -> None:
    """Why the binding matters: the payload a plain x402 client sends (no extensions.mppx, a random nonce) is
    refused by pympp's dual-rail route."""
    url = f"{pympp_server.url}/dual/v1/chat/completions"
    unpaid = httpx.post(url, json=BODY)
    challenge = parse_challenge(unpaid.headers, unpaid.content)
    assert challenge is not None and challenge.extensions is not None
    from dataclasses import replace

    plain = replace(challenge, extensions=None)
    requirement = select_requirement(plain, Policy())
    payment = sign_payment(plain, requirement, Wallet.create(), url)
    refused = httpx.post(url, json=BODY, headers={payment.header_name: payment.header_value})
    assert refused.status_code == 402
    required = json.loads(base64.b64decode(refused.headers["payment-required"]))
    assert "does not bind required route metadata" in required["error"]


@pytest.mark.parametrize("mount", ["mpp", "dual"])
def test_the_callers_own_authorization_is_kept_when_the_challenge_selects_payment_authorization(
    pympp_auth_server: PymppServer, mount: str
) -> None:
    gw = gateway(pympp_auth_server, mount)
    start = len(pympp_auth_server.books.credentials)
    client(gw, api_key="sk-callers-own-key").chat.completions.create(model="pympp/small", messages=MESSAGES)  # type: ignore[arg-type]
    [(_, field, _)] = credentials_since(pympp_auth_server, start)
    assert field == ("payment-authorization" if mount == "mpp" else "payment-signature")
    assert pympp_auth_server.books.authorizations[-1] == "Bearer sk-callers-own-key"
    assert len(pympp_auth_server.books.of(payer(gw))) == 1


def test_a_quote_shows_an_mpp_price(pympp_server: PymppServer) -> None:
    gw = gateway(pympp_server, "mpp")
    quote = gw.quote(BODY)
    summary = quote.to_dict()
    assert (summary["dialect"], summary["protocol"], summary["method"]) == ("mpp", "mpp", "evm/charge")
    assert summary["amount"] == PRICE_ATOMIC and summary["amount_usd"] == "$0.002000"
    assert pympp_server.books.of(payer(gw)) == []


def test_requests_declare_what_llm402_can_pay(pympp_server: PymppServer) -> None:
    gw = gateway(pympp_server, "mpp")
    start = len(pympp_server.books.accept_payment)
    client(gw).chat.completions.create(model="pympp/small", messages=MESSAGES)  # type: ignore[arg-type]
    assert pympp_server.books.accept_payment[start:] == ["evm/charge"]
