"""The sandbox's x402 ``upto`` offers (under ``/upto/v1``): a Permit2 ceiling, really verified, settled to the metered
cost. Payments are signed by the official SDK's upto client, not by llm402's code."""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from llm402.sandbox.config import FACILITATOR_ADDRESS, FACILITATOR_KEY, SandboxConfig
from llm402.sandbox.permit2 import UPTO_PROXY

from .conftest import CHAT, FUNDS, Kit, b64, unb64

URL = "/upto/v1/chat/completions"


def offers(challenge: httpx.Response) -> dict[str, dict[str, Any]]:
    return {entry["scheme"]: entry for entry in unb64(challenge.headers["payment-required"])["accepts"]}


def upto_header(account: LocalAccount, offer: dict[str, Any], url: str, tamper: Any = None) -> str:
    """The SDK's upto payload for ``offer``, optionally altered after signing by ``tamper(envelope)``."""
    from x402.mechanisms.evm.upto import UptoEvmScheme
    from x402.schemas import PaymentRequirements

    inner = UptoEvmScheme(account).create_payment_payload(PaymentRequirements.model_validate(offer))
    envelope = {"x402Version": 2, "payload": inner, "accepted": offer, "resource": {"url": url}}
    if tamper is not None:
        envelope = copy.deepcopy(envelope)
        tamper(envelope)
    return b64(envelope)


def pay(kit: Kit, account: LocalAccount, body: dict[str, Any] = CHAT, **kw: Any) -> httpx.Response:
    challenge = kit.http.post(URL, json=body)
    offer = {**offers(challenge)["upto"], **kw.pop("offer", {})}
    header = upto_header(account, offer, str(challenge.request.url), **kw)
    return kit.http.post(URL, json=body, headers={"PAYMENT-SIGNATURE": header})


def test_the_facilitator_address_is_the_published_key() -> None:
    assert Account.from_key(FACILITATOR_KEY).address == FACILITATOR_ADDRESS == SandboxConfig().facilitator_address


def test_upto_is_offered_beside_exact_for_the_same_ceiling(kit: Kit) -> None:
    challenge = kit.http.post(URL, json=CHAT)
    assert challenge.status_code == 402
    found = offers(challenge)
    assert set(found) == {"exact", "upto"}
    assert found["upto"]["amount"] == found["exact"]["amount"]
    assert found["upto"]["extra"]["assetTransferMethod"] == "permit2"
    assert found["upto"]["extra"]["facilitatorAddress"] == FACILITATOR_ADDRESS
    assert [
        e["scheme"]
        for e in unb64(kit.http.post("/v1/chat/completions", json=CHAT).headers["payment-required"])["accepts"]
    ] == ["exact"], "the default mount offers exact only"


def test_an_upto_payment_settles_the_metered_cost_and_reports_it(kit: Kit) -> None:
    account = kit.wallet()
    ceiling = int(offers(kit.http.post(URL, json=CHAT))["upto"]["amount"])
    response = pay(kit, account)
    assert response.status_code == 200, response.text
    report = unb64(response.headers["payment-response"])
    charged = FUNDS - kit.usdc(account.address)
    assert report["success"] is True and report["payer"] == account.address
    assert int(report["amount"]) == charged
    assert 0 < charged < ceiling, "a short answer costs less than the max_tokens ceiling"
    [settlement] = kit.settlements(account.address)
    assert settlement["amount"] == charged and settlement["transaction"] == report["transaction"]


def test_a_streamed_upto_payment_settles_after_the_last_byte(kit: Kit) -> None:
    account = kit.wallet()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = pay(kit, account, body)
    assert response.status_code == 200
    assert "payment-response" not in response.headers, "the cost is not known when the headers leave"
    lines = [line for line in response.text.splitlines() if line]
    assert lines[-2].startswith(": payment-response ") and lines[-1] == "data: [DONE]"
    comment = lines[-2]
    report = unb64(comment.removeprefix(": payment-response "))
    assert int(report["amount"]) == FUNDS - kit.usdc(account.address) > 0


def test_a_stream_the_client_leaves_settles_what_was_delivered(kit: Kit) -> None:
    account = kit.wallet()
    body = {**CHAT, "max_tokens": 400, "stream": True}
    challenge = kit.http.post(URL, json=body)
    header = upto_header(account, offers(challenge)["upto"], str(challenge.request.url))
    with (
        kit.http.stream(
            "POST", URL, json=body, headers={"PAYMENT-SIGNATURE": header, "X-Sandbox-Fault": "stream_cut=2"}
        ) as response,
        pytest.raises(httpx.HTTPError),
    ):
        response.read()
    deadline = time.monotonic() + 5
    while not kit.settlements(account.address) and time.monotonic() < deadline:
        time.sleep(0.02)
    [settlement] = kit.settlements(account.address)
    assert 0 < settlement["amount"] < int(offers(challenge)["upto"]["amount"])


@pytest.mark.parametrize(
    ("reason", "kw"),
    [
        (
            "invalid_signature",
            {"tamper": lambda e: e["payload"]["permit2Authorization"].update(nonce="12345")},
        ),
        (
            "facilitator_mismatch",
            {"offer": {"extra": {"name": "USDC", "version": "2", "facilitatorAddress": "0x" + "11" * 20}}},
        ),
        ("amount_mismatch", {"offer": {"amount": "999999"}}),
        (
            "invalid_spender",
            {"tamper": lambda e: e["payload"]["permit2Authorization"].update(spender="0x" + "22" * 20)},
        ),
        ("recipient_mismatch", {"offer": {"payTo": "0x" + "33" * 20}}),
        ("expired", {"tamper": lambda e: e["payload"]["permit2Authorization"].update(deadline="1")}),
        ("scheme_mismatch", {"tamper": lambda e: e["accepted"].update(scheme="exact")}),
        ("malformed_payment", {"tamper": lambda e: e["payload"]["permit2Authorization"].pop("witness")}),
    ],
)
def test_bad_upto_payments_are_refused_with_a_reason_and_move_nothing(kit: Kit, reason: str, kw: Any) -> None:
    account = kit.wallet()
    response = pay(kit, account, **kw)
    assert response.status_code == 402
    assert response.headers["x-sandbox-refusal"] == reason
    assert kit.usdc(account.address) == FUNDS
    assert kit.settlements(account.address) == []


def test_an_upto_authorization_settles_once(kit: Kit) -> None:
    account = kit.wallet()
    challenge = kit.http.post(URL, json=CHAT)
    header = upto_header(account, offers(challenge)["upto"], str(challenge.request.url))
    first = kit.http.post(URL, json=CHAT, headers={"PAYMENT-SIGNATURE": header})
    again = kit.http.post(URL, json=CHAT, headers={"PAYMENT-SIGNATURE": header})
    assert first.status_code == 200
    assert again.status_code == 402 and again.headers["x-sandbox-refusal"] == "nonce_already_used"
    assert len(kit.settlements(account.address)) == 1


def test_a_wallet_must_hold_the_whole_ceiling(kit: Kit) -> None:
    ceiling = int(offers(kit.http.post(URL, json=CHAT))["upto"]["amount"])
    account = kit.wallet(ceiling - 1)
    response = pay(kit, account)
    assert response.status_code == 402 and response.headers["x-sandbox-refusal"] == "insufficient_balance"
    assert kit.usdc(account.address) == ceiling - 1


def test_the_upto_mount_still_takes_exact_payments(kit: Kit) -> None:
    account = kit.wallet()
    challenge = kit.http.post(URL, json=CHAT)
    exact = offers(challenge)["exact"]
    response = kit.http.post(URL, json=CHAT, headers=kit.sdk_headers(account, challenge))
    assert response.status_code == 200
    assert FUNDS - kit.usdc(account.address) == int(exact["amount"]), "exact moves the whole quoted amount"


def test_the_upto_proxy_is_x402s() -> None:
    from x402.mechanisms.evm.constants import X402_UPTO_PERMIT2_PROXY_ADDRESS

    assert UPTO_PROXY == X402_UPTO_PERMIT2_PROXY_ADDRESS
