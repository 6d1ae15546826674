"""x402 ``upto``: when llm402 chooses it, and what a signed ceiling counts as in the ledger."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from llm402 import Policy, Wallet
from llm402.core import charged
from llm402.errors import PolicyRefusal
from llm402.x402 import Challenge, Dialect, Settlement, parse_challenge, select_requirement, sign_payment

ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAYEE = "0x" + "ab" * 20
FACILITATOR = "0x" + "fa" * 20


def offer(scheme: str, amount: int, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "scheme": scheme,
        "network": "eip155:84532",
        "asset": ASSET,
        "amount": str(amount),
        "payTo": PAYEE,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }
    if scheme == "upto":
        entry["extra"] = {**entry["extra"], "assetTransferMethod": "permit2", "facilitatorAddress": FACILITATOR}
    entry["extra"].update(extra)
    return entry


def challenge(*accepts: dict[str, Any], version: int | None = 2) -> Challenge:
    data: dict[str, Any] = {"accepts": list(accepts), "resource": {"url": "http://127.0.0.1/v1/chat/completions"}}
    if version is not None:
        data["x402Version"] = version
    if version == 2:
        encoded = base64.b64encode(json.dumps(data).encode()).decode()
        parsed = parse_challenge({"payment-required": encoded}, b"")
    else:
        parsed = parse_challenge({}, json.dumps(data).encode())
    assert parsed is not None
    return parsed


def test_upto_is_preferred_when_the_policy_allows_it() -> None:
    both = challenge(offer("exact", 100), offer("upto", 150))
    assert select_requirement(both, Policy()).scheme == "upto"
    assert select_requirement(both, Policy(prefer_upto=False)).scheme == "exact"
    assert select_requirement(both, Policy(allowed_schemes=frozenset({"exact"}))).scheme == "exact"


def test_a_ceiling_above_the_max_ticket_falls_back_to_exact() -> None:
    both = challenge(offer("exact", 100), offer("upto", 500))
    assert select_requirement(both, Policy(max_payment_usd="0.0002")).scheme == "exact"
    with pytest.raises(PolicyRefusal) as refused:
        select_requirement(challenge(offer("upto", 500)), Policy(max_payment_usd="0.0002"))
    assert refused.value.code == "payment_over_ticket"


@pytest.mark.parametrize(
    "bad",
    [
        {"facilitatorAddress": None},
        {"facilitatorAddress": "not-an-address"},
        {"assetTransferMethod": "eip3009"},
    ],
)
def test_an_unusable_upto_offer_is_never_chosen(bad: dict[str, Any]) -> None:
    broken = offer("upto", 50, **bad)
    assert select_requirement(challenge(offer("exact", 100), broken), Policy()).scheme == "exact"
    with pytest.raises(PolicyRefusal) as refused:
        select_requirement(challenge(broken), Policy())
    assert refused.value.code == "scheme_not_supported"


def test_upto_is_x402_v2_only() -> None:
    legacy = challenge(offer("upto", 50) | {"network": "base-sepolia"}, version=1)
    assert legacy.dialect is Dialect.V1
    with pytest.raises(PolicyRefusal) as refused:
        select_requirement(legacy, Policy())
    assert refused.value.code == "scheme_not_supported"


def test_an_upto_signature_authorizes_the_ceiling_through_permit2() -> None:
    wallet = Wallet.create()
    upto = challenge(offer("upto", 321))
    payment = sign_payment(upto, upto.requirements[0], wallet, "http://127.0.0.1/v1/chat/completions")
    envelope = json.loads(base64.b64decode(payment.header_value))
    auth = envelope["payload"]["permit2Authorization"]
    assert payment.header_name == "PAYMENT-SIGNATURE" and payment.amount == 321
    assert auth["permitted"] == {"token": ASSET, "amount": "321"}
    assert auth["witness"]["facilitator"].lower() == FACILITATOR and auth["witness"]["to"].lower() == PAYEE
    assert payment.valid_before == int(auth["deadline"]) and payment.nonce == auth["nonce"]


def _signed(scheme: str, amount: int = 1000) -> Any:
    entry = challenge(offer(scheme, amount))
    return sign_payment(entry, entry.requirements[0], Wallet.create(), "http://127.0.0.1/v1/chat/completions")


def report(amount: int | None, success: bool = True) -> Settlement:
    return Settlement(success, "0x" + "12" * 32, "eip155:84532", None, amount)


def test_an_exact_payment_counts_its_whole_value_whatever_the_report_says() -> None:
    payment = _signed("exact")
    assert charged(payment, report(1)) == 1000
    assert charged(payment, None) == 1000


def test_an_upto_payment_counts_the_reported_settlement_never_above_the_ceiling() -> None:
    payment = _signed("upto")
    assert charged(payment, report(250)) == 250
    assert charged(payment, report(0)) == 0
    assert charged(payment, report(10**9)) == 1000, "a gateway cannot have moved more than the signed ceiling"


@pytest.mark.parametrize("settlement", [None, report(None), report(250, success=False)])
def test_an_upto_payment_without_a_successful_report_counts_the_ceiling(settlement: Settlement | None) -> None:
    assert charged(_signed("upto"), settlement) == 1000
