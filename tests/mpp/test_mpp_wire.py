"""MPP on the wire, without a server: challenges parsed from every WWW-Authenticate, evm/charge checked under the
policy like any x402 offer, credentials that pympp's own parser reads back, receipts, problems, and x402 on dual-rail
routes (the route-bound nonce compared with pympp's server code)."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from mpp.methods.evm import challenge_hash
from mpp.x402 import route_extensions
from mpp.x402 import route_nonce as pympp_route_nonce

import mpp as pympp
from llm402 import Policy, Wallet
from llm402 import mpp as wire
from llm402.errors import MalformedPaymentRequired, PaidAnswerLost, PaymentRejected, PolicyRefusal
from llm402.x402 import (
    Dialect,
    Settlement,
    bind_settlement,
    decode_settlement,
    parse_challenge,
    select_requirement,
    sign_payment,
)

USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"  # Base Sepolia USDC (the x402 SDK knows its EIP-712 domain)
PAYEE = "0x26048d144cf2D32a966DaC5D7C331588f1062dd3"
OTHER = "0x798F05Edc32C1cb32aF2225F3D051dED281425Ba"
URL = "https://gateway.example/v1/chat/completions"


def charge(
    amount: str = "2000", currency: str = USDC, recipient: str = PAYEE, chain: int = 84532, **details: Any
) -> dict[str, Any]:
    return {
        "amount": amount,
        "currency": currency,
        "recipient": recipient,
        "methodDetails": {"chainId": chain, "credentialTypes": ["authorization"], "decimals": 6, **details},
    }


def expires_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def issued(
    request: dict[str, Any] | None = None, *, method: str = "evm", intent: str = "charge", **options: Any
) -> pympp.Challenge:
    """A challenge as pympp's server builds it (HMAC-bound id)."""
    options.setdefault("expires", expires_in(300))
    return pympp.Challenge.create(
        secret_key="test-secret",
        realm="gateway.example",
        method=method,
        intent=intent,
        request=request or charge(),
        **options,
    )


def headers(*values: str, **extra: str) -> httpx.Headers:
    return httpx.Headers([("www-authenticate", v) for v in values] + list(extra.items()))


def parse(*values: str, **extra: str) -> Any:
    challenge = parse_challenge(headers(*values, **extra), b"")
    assert challenge is not None
    return challenge


def b64url(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


# --- parsing -----------------------------------------------------------------------------------------------------


def test_a_pympp_challenge_becomes_an_exact_requirement() -> None:
    ch = issued(description="2000 base units, please")
    parsed = parse(ch.to_www_authenticate("gateway.example"))
    assert parsed.dialect is Dialect.MPP
    [req] = parsed.requirements
    assert req.mpp and req.scheme == "exact"
    assert (req.network, req.asset, req.amount, req.pay_to) == ("eip155:84532", USDC, 2000, PAYEE)
    assert 290 <= req.max_timeout_seconds <= 300
    assert req.raw == charge()
    assert req.extra["id"] == ch.id and req.extra["realm"] == "gateway.example"
    assert (req.extra["name"], req.extra["version"]) == ("USDC", "2")
    assert req.describe()["protocol"] == "mpp" and req.describe()["method"] == "evm/charge"
    assert req.single_use


def test_every_payment_challenge_of_every_header_field() -> None:
    one, two, three = issued(), issued(charge("3000")), issued(method="tempo")
    parsed = parse(
        f'Bearer realm="api", error="invalid_token", {one.to_www_authenticate("gateway.example")}, '
        f"{three.to_www_authenticate('gateway.example')}",
        f"Basic YWxhZGRpbjpvcGVuc2VzYW1l, {two.to_www_authenticate('gateway.example')}",
    )
    assert [r.scheme for r in parsed.requirements] == ["exact", "mpp:tempo/charge", "exact"]
    assert [r.amount for r in parsed.requirements if r.scheme == "exact"] == [2000, 3000]
    assert select_requirement(parsed, Policy()).amount == 2000, "the cheapest payable offer"


def test_quoted_strings_case_and_unknown_parameters() -> None:
    request = b64url(charge())
    value = (
        f'payment ID="abc\\"def", REALM=gateway.example, Method="evm", intent=charge, request="{request}", '
        f'description="a, \\"quoted\\" text, and id=\\"fake\\"", future-param="x, y", expires="{expires_in(60)}"'
    )
    [req] = parse(value).requirements
    assert req.extra["id"] == 'abc"def'
    assert req.extra["realm"] == "gateway.example"
    assert req.extra["description"] == 'a, "quoted" text, and id="fake"'
    assert "future-param" not in req.extra


def test_a_challenge_without_id_is_malformed() -> None:
    good = issued().to_www_authenticate("gateway.example")
    without_id = good.replace(f'id="{issued().id}", ', "")
    nameless = 'Payment realm="r", method="evm", intent="charge", request="' + b64url(charge()) + '"'
    with pytest.raises(MalformedPaymentRequired, match="without 'id'"):
        parse_challenge(headers(nameless), b"")
    assert len(parse(nameless, good).requirements) == 1, "a malformed challenge beside a good one is skipped"
    assert without_id  # the good one is unchanged


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (charge("0"), "zero"),
        (charge("1.5"), "integer"),
        (charge(currency="USDC"), "currency"),
        (charge(recipient="acct_123"), "recipient"),
        ({**charge(), "methodDetails": {"chainId": 84532, "credentialTypes": ["transaction"]}}, "EIP-3009"),
        (charge(splits=[{"recipient": OTHER, "amount": "1"}]), "splits"),
        (charge(decimals=18), "6-decimal"),
    ],
)
def test_unreadable_charges_are_malformed(request_: dict[str, Any], problem: str) -> None:
    with pytest.raises(MalformedPaymentRequired, match=problem):
        parse_challenge(headers(issued(request_).to_www_authenticate("gateway.example")), b"")


def test_an_expired_challenge_is_not_payable() -> None:
    with pytest.raises(MalformedPaymentRequired, match="expired"):
        parse_challenge(headers(issued(expires=expires_in(-5)).to_www_authenticate("r")), b"")


def test_only_evm_charge_is_payable() -> None:
    for method, intent in (("tempo", "charge"), ("evm", "session"), ("stripe", "charge")):
        parsed = parse(issued(method=method, intent=intent).to_www_authenticate("r"))
        with pytest.raises(PolicyRefusal) as refused:
            select_requirement(parsed, Policy())
        assert refused.value.code == "scheme_not_supported"
        assert f"{method}/{intent}" in refused.value.message


def test_a_credential_field_other_than_the_spec_allows_is_refused() -> None:
    value = issued().to_www_authenticate("r") + ', header="X-Custom"'
    with pytest.raises(PolicyRefusal, match="credential field") as refused:
        select_requirement(parse(value), Policy())
    assert refused.value.code == "scheme_not_supported"


# --- the policy sees an MPP charge like any payment ------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "code"),
    [
        (Policy(max_payment_usd="0.001"), "payment_over_ticket"),
        (Policy(allowed_assets=frozenset({OTHER})), "asset_not_allowed"),
        (Policy(allowed_payees=frozenset({OTHER})), "payee_not_allowed"),
        (Policy(allowed_networks=frozenset({"eip155:8453"})), "network_not_allowed"),
        (Policy(max_validity_seconds=60), "validity_too_long"),
        (Policy(allowed_schemes=frozenset({"upto"})), "scheme_not_supported"),
    ],
)
def test_the_policy_refuses_an_mpp_charge_before_signing(policy: Policy, code: str) -> None:
    parsed = parse(issued().to_www_authenticate("r"))
    with pytest.raises(PolicyRefusal) as refused:
        select_requirement(parsed, policy)
    assert refused.value.code == code


def test_a_token_without_a_known_eip712_domain_is_refused() -> None:
    token = "0x1111111111111111111111111111111111111111"
    parsed = parse(issued(charge(currency=token)).to_www_authenticate("r"))
    with pytest.raises(PolicyRefusal, match="EIP-712 domain") as refused:
        select_requirement(parsed, Policy(allowed_assets=frozenset({token})))
    assert refused.value.code == "asset_not_allowed"


def test_the_description_is_never_trusted() -> None:
    parsed = parse(issued(charge("900000"), description="only $0.0001").to_www_authenticate("r"))
    with pytest.raises(PolicyRefusal) as refused:
        select_requirement(parsed, Policy(max_payment_usd="0.5"))
    assert refused.value.code == "payment_over_ticket"


# --- the credential ----------------------------------------------------------------------------------------------


def _recover(payload: dict[str, Any]) -> str:
    domain = {"name": "USDC", "version": "2", "chainId": 84532, "verifyingContract": USDC}
    types = {
        "TransferWithAuthorization": [
            {"name": n, "type": t}
            for n, t in (
                ("from", "address"),
                ("to", "address"),
                ("value", "uint256"),
                ("validAfter", "uint256"),
                ("validBefore", "uint256"),
                ("nonce", "bytes32"),
            )
        ]
    }
    message = {
        **{k: payload[k] for k in ("from", "to")},
        **{k: int(payload[k]) for k in ("value", "validAfter", "validBefore")},
        "nonce": bytes.fromhex(payload["nonce"][2:]),
    }
    signable = encode_typed_data(domain_data=domain, message_types=types, message_data=message)
    return str(Account.recover_message(signable, signature=payload["signature"]))


def test_the_credential_echoes_the_challenge_as_received_and_pympp_reads_it() -> None:
    wallet = Wallet.create()
    opaque = "eyAiY29ycmVsYXRpb24iIDogIjEyMyIgfQ"  # base64url of a JSON with spaces: not what JCS would re-encode
    expires = expires_in(120)
    digest = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
    request = b64url(charge())  # json.dumps spacing: not JCS either
    value = (
        f'Payment id="abc", realm="gateway.example", method="evm", intent="charge", request="{request}", '
        f'expires="{expires}", digest="{digest}", opaque="{opaque}", description="Chat"'
    )
    challenge = parse(value)
    payment = sign_payment(challenge, select_requirement(challenge, Policy()), wallet, URL)
    assert payment.header_name == "authorization"
    assert payment.header_value.startswith("Payment ")
    credential = pympp.Credential.from_authorization(payment.header_value)
    echo = credential.challenge
    assert (echo.id, echo.realm, echo.method, echo.intent) == ("abc", "gateway.example", "evm", "charge")
    assert (echo.request, echo.opaque, echo.expires, echo.digest, echo.description) == (
        request,
        opaque,
        expires,
        digest,
        "Chat",
    )
    assert echo.header is None
    assert credential.source == f"did:pkh:eip155:84532:{wallet.address}"
    body = credential.payload
    assert body["type"] == "authorization"
    assert body["nonce"] == challenge_hash("abc", "gateway.example") == payment.nonce
    assert int(body["validBefore"]) == int(datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp())
    assert payment.valid_before == int(body["validBefore"])
    assert (body["value"], body["to"], body["validAfter"]) == ("2000", PAYEE, "0")
    assert _recover(body) == wallet.address


def test_without_expires_a_credential_is_valid_five_minutes() -> None:
    value = f'Payment id="x", realm="r", method="evm", intent="charge", request="{b64url(charge())}"'
    challenge = parse(value)
    payment = sign_payment(challenge, challenge.requirements[0], Wallet.create(), URL)
    assert 295 <= payment.valid_before - time.time() <= 300


def test_payment_authorization_when_the_challenge_selects_it() -> None:
    challenge = parse(issued(header="Payment-Authorization").to_www_authenticate("r"))
    payment = sign_payment(challenge, challenge.requirements[0], Wallet.create(), URL)
    assert payment.header_name == "payment-authorization"
    assert pympp.Credential.from_authorization(payment.header_value).challenge.header == "Payment-Authorization"


def test_the_nonce_rule_is_the_sdks() -> None:
    for challenge_id, realm in (("abc", "api.example.com"), ("Zx_9-", "ü.example"), ('q"uote', "r")):
        assert wire.challenge_nonce(challenge_id, realm) == challenge_hash(challenge_id, realm)


# --- receipts and problems -------------------------------------------------------------------------------------


def test_a_payment_receipt_is_a_settlement_of_this_payment() -> None:
    receipt = pympp.Receipt.success("0x" + "ab" * 32, method="evm").to_payment_receipt()
    settlement = decode_settlement(httpx.Headers({"payment-receipt": receipt}))
    assert settlement == Settlement(True, "0x" + "ab" * 32, None, None, None)
    challenge = parse(issued().to_www_authenticate("r"))
    wallet = Wallet.create()
    payment = sign_payment(challenge, challenge.requirements[0], wallet, URL)
    bound = bind_settlement(payment, settlement)
    assert bound is not None
    assert (bound.payer, bound.network, bound.asset) == (wallet.address, "eip155:84532", USDC)
    garbled = decode_settlement(httpx.Headers({"payment-receipt": "%%"}))
    assert garbled is not None and not garbled.success


def test_x402_settlement_headers_come_first() -> None:
    x402 = base64.b64encode(
        json.dumps({"success": True, "transaction": "0x1", "payer": PAYEE, "network": "eip155:84532"}).encode()
    ).decode()
    receipt = pympp.Receipt.success("0x2", method="evm").to_payment_receipt()
    settlement = decode_settlement(httpx.Headers({"payment-response": x402, "payment-receipt": receipt}))
    assert settlement is not None and settlement.transaction == "0x1"


def _problem(kind: str, status: int, detail: str) -> tuple[httpx.Headers, bytes]:
    body = {"type": wire.PROBLEM_BASE + kind, "title": kind, "status": status, "detail": detail}
    return httpx.Headers({"content-type": "application/problem+json"}), json.dumps(body).encode()


def test_problem_details_map_to_typed_errors() -> None:
    replayed = wire.read_problem(*_problem("verification-failed", 403, "Credential has already been used"))
    assert replayed is not None and replayed.replayed
    assert "already_used" in replayed.reason()
    assert isinstance(wire.problem_error(replayed, reused=True), PaidAnswerLost)
    assert isinstance(wire.problem_error(replayed), PaymentRejected)
    expired = wire.read_problem(*_problem("payment-expired", 402, "expired"))
    assert expired is not None and isinstance(wire.problem_error(expired), PaymentRejected)
    internal = wire.read_problem(*_problem("internal-payment-error", 500, "x"))
    assert internal is not None and wire.problem_error(internal).code == "payment_outcome_unknown"
    unsupported = wire.read_problem(*_problem("method-unsupported", 400, "x"))
    assert unsupported is not None and wire.problem_error(unsupported, paid=False).code == "scheme_not_supported"
    assert wire.is_payment_refusal(403, *_problem("verification-failed", 403, "Credential has already been used"))
    assert not wire.is_payment_refusal(403, httpx.Headers({"content-type": "application/json"}), b'{"error": "no"}')
    assert wire.read_problem(httpx.Headers({"content-type": "application/json"}), b'{"type": "about:blank"}') is None


def test_the_402_problem_is_the_challenges_error() -> None:
    head, body = _problem("verification-failed", 402, "EVM authorization amount mismatch")
    head["www-authenticate"] = issued().to_www_authenticate("r")
    challenge = parse_challenge(head, body)
    assert challenge is not None and challenge.error == "verification-failed: EVM authorization amount mismatch"


# --- dual rail ---------------------------------------------------------------------------------------------------


def dual_rail() -> tuple[httpx.Headers, dict[str, Any]]:
    """A 402 as pympp's dual-rail evm/charge route answers it: WWW-Authenticate and PAYMENT-REQUIRED."""
    accepted = {
        "scheme": "exact",
        "network": "eip155:84532",
        "amount": "2000",
        "asset": USDC,
        "payTo": PAYEE,
        "maxTimeoutSeconds": 300,
        "extra": {"assetTransferMethod": "eip3009", "name": "USDC", "version": "2"},
    }
    required = {
        "x402Version": 2,
        "accepts": [accepted],
        "resource": {"url": URL},
        "error": "PAYMENT-SIGNATURE header is required",
        "extensions": route_extensions(
            http_method="POST", scope={"http_method": "POST", "resource": "/v1/chat/completions"}
        ),
    }
    encoded = base64.b64encode(json.dumps(required).encode()).decode()
    return headers(issued().to_www_authenticate("gateway.example"), **{"payment-required": encoded}), required


def test_a_dual_rail_route_is_one_challenge_paid_by_x402_first() -> None:
    head, _ = dual_rail()
    challenge = parse_challenge(head, b"")
    assert challenge is not None and challenge.dialect is Dialect.V2
    assert [r.dialect for r in challenge.requirements] == [None, Dialect.MPP]
    assert select_requirement(challenge, Policy()).dialect is None, "x402 unless the policy prefers MPP"
    prefers_mpp = Policy(payment_protocols=("mpp", "x402"))
    assert select_requirement(challenge, prefers_mpp).mpp
    only_x402 = Policy(payment_protocols=("x402",))
    assert select_requirement(challenge, only_x402).dialect is None


def test_an_x402_payment_to_a_dual_rail_route_carries_the_route_binding() -> None:
    head, required = dual_rail()
    challenge = parse_challenge(head, b"")
    assert challenge is not None
    wallet = Wallet.create()
    payment = sign_payment(challenge, select_requirement(challenge, Policy()), wallet, URL)
    assert payment.header_name == "PAYMENT-SIGNATURE"
    envelope = json.loads(base64.b64decode(payment.header_value))
    assert envelope["accepted"] == required["accepts"][0], "accepted echoed unchanged"
    assert envelope["resource"] == required["resource"], "resource echoed unchanged"
    echoed = envelope["extensions"]
    salt = echoed["mppx"]["info"].pop("nonce")
    assert isinstance(salt, str) and len(salt) >= 32
    assert echoed == required["extensions"], "extensions echoed unchanged but for the client salt"
    echoed["mppx"]["info"]["nonce"] = salt
    expected = pympp_route_nonce(accepted=required["accepts"][0], resource=required["resource"], extensions=echoed)
    assert envelope["payload"]["authorization"]["nonce"] == expected == payment.nonce
    assert (
        _recover({**envelope["payload"]["authorization"], "signature": envelope["payload"]["signature"]})
        == wallet.address
    )
    again = sign_payment(challenge, select_requirement(challenge, Policy()), wallet, URL)
    assert again.nonce != payment.nonce, "a fresh salt, so a fresh nonce, every payment"


@pytest.mark.parametrize("text", ["plain", "ünïcödé ✓ 😀", 'quo"te\\ and \n newline'])
def test_the_route_nonce_is_pympps(text: str) -> None:
    accepted = {"scheme": "exact", "amount": "1", "extra": {"name": text, "version": "2"}, "maxTimeoutSeconds": 60}
    resource = {"url": URL, "description": text}
    extensions = {"mppx": {"info": {"method": "POST", "nonce": "0x01", "opaque": text}, "schema": {"type": "object"}}}
    assert wire.route_nonce(accepted, resource, extensions) == pympp_route_nonce(
        accepted=accepted, resource=resource, extensions=extensions
    )


def test_bound_extensions_leave_the_challenge_alone() -> None:
    extensions = {"mppx": {"info": {"method": "POST"}, "schema": {}}, "other": {"x": 1}}
    bound = wire.bound_extensions(extensions, salt="0xsalt")
    assert bound == {"mppx": {"info": {"method": "POST", "nonce": "0xsalt"}, "schema": {}}, "other": {"x": 1}}
    assert extensions == {"mppx": {"info": {"method": "POST"}, "schema": {}}, "other": {"x": 1}}


def test_accept_payment_names_what_llm402_pays() -> None:
    assert wire.ACCEPT_PAYMENT == "evm/charge"


def test_payment_authorization_is_a_payment_header() -> None:
    from llm402.x402 import PAYMENT_HEADERS

    assert "payment-authorization" in PAYMENT_HEADERS


def test_an_mpp_challenge_is_signed_once() -> None:
    """Its id is the credential's nonce: a second signature could only be a second authorization with that nonce
    (a one-round-trip quote, say). A retry re-sends the credential it has."""
    from llm402.errors import PaymentRequiredError

    challenge = parse(issued(charge("4321")).to_www_authenticate("signed-once.example"))
    wallet = Wallet.create()
    sign_payment(challenge, challenge.requirements[0], wallet, URL)
    with pytest.raises(PaymentRequiredError) as again:
        sign_payment(challenge, challenge.requirements[0], wallet, URL)
    assert again.value.code == "mpp_challenge_reused"


def test_a_malformed_x402_header_beside_no_payment_challenge_is_still_malformed() -> None:
    head = httpx.Headers({"payment-required": "%%not-base64%%", "www-authenticate": 'Bearer realm="payments"'})
    with pytest.raises(MalformedPaymentRequired, match="PAYMENT-REQUIRED"):
        parse_challenge(head, b"")


def test_a_malformed_x402_half_of_a_dual_rail_402_leaves_the_mpp_half() -> None:
    head = headers(issued().to_www_authenticate("r"), **{"payment-required": "%%not-base64%%"})
    challenge = parse_challenge(head, b"")
    assert challenge is not None and challenge.dialect is Dialect.MPP


def test_a_final_payment_receipt_event_reads_as_a_settlement() -> None:
    from llm402.x402 import receipt_event_settlement

    event = {"method": "evm", "intent": "session", "status": "success", "reference": "0xabc", "spent": "2000"}
    assert receipt_event_settlement(event) == Settlement(True, "0xabc", None, None, 2000)
    assert receipt_event_settlement({"status": "success", "reference": "0x1"}).amount is None
    assert not receipt_event_settlement({"status": "success", "spent": "-1"}).success
