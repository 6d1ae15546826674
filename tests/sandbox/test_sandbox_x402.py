"""Per-call x402 over real HTTP: the three dialects, payments signed by the official SDK, and every refusal."""

from __future__ import annotations

import base64
import json
import re
import time

import httpx
import pytest
from eth_account import Account

from .conftest import CHAT, FUNDS, Kit, b64, unb64

PREFIXES = ["/v1", "/x402v2/v1", "/x402v1/v1", "/kiosk/v1"]
CHAT_PRICE = 21  # 9 prompt tokens * $0.15/1M + 32 max tokens * $0.60/1M = 20.55 micro-USDC, rounded up
TX = re.compile(r"^0x[0-9a-f]{64}$")


def test_unpaid_chat_gets_402_with_requirements_in_every_dialect(kit: Kit) -> None:
    from x402.http import decode_payment_required_header
    from x402.schemas.v1 import PaymentRequiredV1

    v2 = kit.http.post("/v1/chat/completions", json=CHAT)
    assert v2.status_code == 402
    decoded = unb64(v2.headers["payment-required"])
    assert decoded == v2.json(), "v2 sends the same JSON in the header and the body"
    assert decoded["x402Version"] == 2 and decoded["error"] == "Payment required"
    assert decoded["resource"]["url"] == f"{kit.url}/v1/chat/completions"
    assert decoded["accepts"] == [
        {
            "scheme": "exact",
            "network": "eip155:84532",
            "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            "amount": str(CHAT_PRICE),
            "payTo": kit.config.payee,
            "maxTimeoutSeconds": 60,
            "extra": {"name": "USDC", "version": "2"},
        }
    ]
    assert decode_payment_required_header(v2.headers["payment-required"]).accepts[0].amount == str(CHAT_PRICE)

    v1 = kit.http.post("/x402v1/v1/chat/completions", json=CHAT)
    assert v1.status_code == 402 and "payment-required" not in v1.headers
    body = v1.json()
    assert body["x402Version"] == 1 and body["error"] == "X-PAYMENT header is required"
    (entry,) = body["accepts"]
    assert entry["network"] == "base-sepolia" and entry["maxAmountRequired"] == str(CHAT_PRICE)
    assert entry["resource"] == f"{kit.url}/x402v1/v1/chat/completions" and entry["mimeType"] == "application/json"
    assert entry["payTo"] == kit.config.payee and entry["extra"] == {"name": "USDC", "version": "2"}
    PaymentRequiredV1.model_validate(body)

    kiosk = kit.http.post("/kiosk/v1/chat/completions", json=CHAT)
    assert kiosk.status_code == 402 and "payment-required" not in kiosk.headers
    assert kiosk.json() == {
        "accepts": [
            {
                "scheme": "exact",
                "network": "eip155:84532",
                "amount": str(CHAT_PRICE),
                "maxAmountRequired": str(CHAT_PRICE),
                "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                "payTo": kit.config.payee,
                "maxTimeoutSeconds": 60,
                "extra": {"assetTransferMethod": "eip3009", "name": "USDC", "version": "2"},
            }
        ]
    }


def test_v2_paid_with_the_official_sdk(kit: Kit) -> None:
    from x402.http import decode_payment_response_header

    account = kit.wallet()
    payee_before = kit.usdc(kit.config.payee)
    first = kit.http.post("/v1/chat/completions", json=CHAT)
    paid_headers = kit.sdk_headers(account, first)
    assert list(paid_headers) == ["PAYMENT-SIGNATURE"]
    paid = kit.http.post("/v1/chat/completions", json=CHAT, headers=paid_headers)
    assert paid.status_code == 200, paid.text
    assert paid.json()["choices"][0]["message"]["content"] == "Echo: Explain x402 in one line"
    assert kit.usdc(account.address) == FUNDS - CHAT_PRICE
    assert kit.usdc(kit.config.payee) == payee_before + CHAT_PRICE
    settle = decode_payment_response_header(paid.headers["payment-response"])
    assert settle.success and settle.payer == account.address and settle.network == "eip155:84532"
    assert TX.match(settle.transaction) and settle.amount == str(CHAT_PRICE)
    (row,) = kit.settlements(account.address)
    assert row["transaction"] == settle.transaction and row["amount"] == CHAT_PRICE
    assert row["payer"] == account.address and row["payee"] == kit.config.payee
    assert row["path"] == "/v1/chat/completions"
    stats = kit.stats(account.address)
    assert stats == {"signatures_seen": 1, "settled": 1, "settled_amount": CHAT_PRICE, "refused": {}}


def test_v1_paid_with_the_official_sdk(kit: Kit) -> None:
    account = kit.wallet()
    first = kit.http.post("/x402v1/v1/chat/completions", json=CHAT)
    paid_headers = kit.sdk_headers(account, first)
    assert list(paid_headers) == ["X-PAYMENT"]
    paid = kit.http.post("/x402v1/v1/chat/completions", json=CHAT, headers=paid_headers)
    assert paid.status_code == 200, paid.text
    assert kit.usdc(account.address) == FUNDS - CHAT_PRICE
    settle = unb64(paid.headers["x-payment-response"])
    assert settle["success"] is True and settle["payer"] == account.address and settle["network"] == "base-sepolia"
    assert TX.match(settle["transaction"])


@pytest.mark.parametrize(
    ("header", "envelope"), [("X-Payment", "v2"), ("Payment-Signature", "v2"), ("X-Payment", "v1")]
)
def test_kiosk_dialect_paid(kit: Kit, header: str, envelope: str) -> None:
    account = kit.wallet()
    first = kit.http.post("/kiosk/v1/chat/completions", json=CHAT)
    paid = kit.http.post(
        "/kiosk/v1/chat/completions", json=CHAT, headers=kit.kiosk_headers(account, first, header, envelope)
    )
    assert paid.status_code == 200, paid.text
    assert kit.usdc(account.address) == FUNDS - CHAT_PRICE
    settle = unb64(paid.headers["x-payment-response"])
    assert settle["network"] == "eip155:84532" and settle["amount"] == str(CHAT_PRICE) and settle["success"]


def test_v1_envelope_with_legacy_network_is_refused_on_the_kiosk_mount(kit: Kit) -> None:
    account = kit.wallet()
    inner = kit.authorization(account, CHAT_PRICE)
    refused = kit.http.post("/kiosk/v1/chat/completions", json=CHAT, headers={"X-Payment": kit.v1_payment(inner)})
    assert refused.status_code == 402 and refused.json()["error"] == "network_mismatch"


def test_the_default_mount_follows_the_configured_dialect(make_sandbox: type) -> None:
    for dialect, check in (
        ("v1", lambda r: r.json()["x402Version"] == 1),
        ("kiosk", lambda r: "x402Version" not in r.json()),
    ):
        private = make_sandbox(default_dialect=dialect)
        response = private.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 402 and "payment-required" not in response.headers and check(response)


def test_paid_stream_settles_before_the_first_byte(kit: Kit) -> None:
    from x402.http import decode_payment_response_header

    account = kit.wallet()
    body = {**CHAT, "stream": True}
    first = kit.http.post("/v1/chat/completions", json=body)
    with kit.http.stream("POST", "/v1/chat/completions", json=body, headers=kit.sdk_headers(account, first)) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert decode_payment_response_header(stream.headers["payment-response"]).success
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines[:-1])
    assert text == "Echo: Explain x402 in one line"
    assert kit.usdc(account.address) == FUNDS - CHAT_PRICE


def _post_v2(kit: Kit, header: str, path: str = "/v1/chat/completions") -> httpx.Response:
    return kit.http.post(path, json=CHAT, headers={"PAYMENT-SIGNATURE": header})


def test_every_refusal_has_its_own_reason_and_moves_nothing(kit: Kit) -> None:
    account = kit.wallet()
    other = Account.create()
    now = int(time.time())
    price = CHAT_PRICE
    cases = {
        "invalid_signature": kit.v2_payment(kit.authorization(account, price, signer=other), price),
        "expired": kit.v2_payment(kit.authorization(account, price, valid_before=now - 1), price),
        "not_yet_valid": kit.v2_payment(
            kit.authorization(account, price, valid_after=now + 120, valid_before=now + 150), price
        ),
        "validity_too_long": kit.v2_payment(kit.authorization(account, price, valid_before=now + 3600), price),
        "underpaid": kit.v2_payment(kit.authorization(account, price - 1), price - 1),
        "amount_mismatch": kit.v2_payment(kit.authorization(account, price + 1), price + 1),
        "recipient_mismatch": kit.v2_payment(kit.authorization(account, price, to=other.address), price),
        "network_mismatch": kit.v2_payment(kit.authorization(account, price), price, network="eip155:8453"),
        "scheme_mismatch": kit.v2_payment(kit.authorization(account, price), price, scheme="upto"),
        "asset_mismatch": kit.v2_payment(kit.authorization(account, price), price, asset=other.address),
        "malformed_payment": "this is not base64 at all!",
    }
    for reason, header in cases.items():
        response = _post_v2(kit, header)
        assert response.status_code == 402, (reason, response.text)
        assert response.headers["x-sandbox-refusal"] == reason
        decoded = unb64(response.headers["payment-required"])
        assert decoded["error"] == reason and response.json()["error"] == reason
        assert decoded["accepts"][0]["amount"] == str(price), "a refusal still says how to pay"
    signed_for_the_wrong_domain = kit.v2_payment(kit.authorization(account, price, domain_name="USD Coin"), price)
    assert _post_v2(kit, signed_for_the_wrong_domain).headers["x-sandbox-refusal"] == "invalid_signature"
    assert kit.usdc(account.address) == FUNDS
    stats = kit.stats(account.address)
    assert stats["settled"] == 0
    expected = {reason: 1 for reason in cases if reason != "malformed_payment"}
    expected["invalid_signature"] = 2
    assert stats["refused"] == expected
    assert stats["signatures_seen"] == len(cases) - 1 + 1


def test_replayed_payment_is_refused_and_pays_once(kit: Kit) -> None:
    account = kit.wallet()
    first = kit.http.post("/v1/chat/completions", json=CHAT)
    headers = kit.sdk_headers(account, first)
    assert kit.http.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    again = kit.http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert again.status_code == 402 and again.headers["x-sandbox-refusal"] == "nonce_already_used"
    assert kit.usdc(account.address) == FUNDS - CHAT_PRICE
    stats = kit.stats(account.address)
    assert stats["signatures_seen"] == 1 and stats["settled"] == 1 and stats["refused"] == {"nonce_already_used": 1}


def test_unfunded_payer_is_refused(kit: Kit) -> None:
    account = kit.wallet(amount=CHAT_PRICE - 1)
    response = _post_v2(kit, kit.v2_payment(kit.authorization(account, CHAT_PRICE), CHAT_PRICE))
    assert response.headers["x-sandbox-refusal"] == "insufficient_balance"
    assert kit.usdc(account.address) == CHAT_PRICE - 1


def test_refusals_in_the_body_dialects(kit: Kit) -> None:
    account = kit.wallet()
    v1 = kit.http.post(
        "/x402v1/v1/chat/completions",
        json=CHAT,
        headers={"X-PAYMENT": kit.v1_payment(kit.authorization(account, CHAT_PRICE - 1))},
    )
    assert v1.status_code == 402 and v1.json()["error"] == "underpaid" and v1.json()["x402Version"] == 1
    assert v1.headers["x-sandbox-refusal"] == "underpaid" and "message" in v1.json()
    v2_on_v1 = kit.http.post(
        "/x402v1/v1/chat/completions",
        json=CHAT,
        headers={"X-PAYMENT": kit.v2_payment(kit.authorization(account, CHAT_PRICE), CHAT_PRICE)},
    )
    assert v2_on_v1.json()["error"] == "malformed_payment"
    kiosk = kit.http.post(
        "/kiosk/v1/chat/completions",
        json=CHAT,
        headers={"X-Payment": kit.v2_payment(kit.authorization(account, CHAT_PRICE, valid_before=1), CHAT_PRICE)},
    )
    assert kiosk.status_code == 402 and kiosk.json()["error"] == "expired" and "x402Version" not in kiosk.json()
    assert kit.usdc(account.address) == FUNDS


def test_a_v2_mount_ignores_x_payment(kit: Kit) -> None:
    account = kit.wallet()
    header = kit.v2_payment(kit.authorization(account, CHAT_PRICE), CHAT_PRICE)
    response = kit.http.post("/v1/chat/completions", json=CHAT, headers={"X-Payment": header})
    assert response.status_code == 402 and "x-sandbox-refusal" not in response.headers
    assert kit.stats(account.address)["signatures_seen"] == 0


@pytest.mark.parametrize("prefix", PREFIXES)
def test_unknown_model_and_bad_bodies_are_400_not_402(kit: Kit, prefix: str) -> None:
    unknown = kit.http.post(f"{prefix}/chat/completions", json={**CHAT, "model": "nope/nope"})
    assert unknown.status_code == 400
    assert unknown.json() == {"error": "VALIDATION_ERROR", "message": "Unknown model: nope/nope"}
    for body in ({"model": "sandbox/small"}, {**CHAT, "max_tokens": 0}, {**CHAT, "reasoning_effort": "low"}):
        assert kit.http.post(f"{prefix}/chat/completions", json=body).status_code == 400
    raw = kit.http.post(f"{prefix}/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"] == "VALIDATION_ERROR"
    assert kit.http.post(f"{prefix}/embeddings", json={"model": "x", "input": "a"}).status_code == 400


def test_embeddings_paid(kit: Kit) -> None:
    account = kit.wallet()
    body = {"model": "sandbox/medium", "input": ["pay per call", "twice over"], "encoding_format": "float"}
    paid = kit.pay("/v1/embeddings", body, account)
    assert paid.status_code == 200, paid.text
    data = paid.json()
    assert [d["index"] for d in data["data"]] == [0, 1] and len(data["data"][0]["embedding"]) == 16
    assert data["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    price = 7  # 5 tokens * $1.25/1M = 6.25 micro, rounded up
    assert kit.usdc(account.address) == FUNDS - price
    as_base64 = kit.pay("/v1/embeddings", {**body, "encoding_format": "base64", "dimensions": 4}, account).json()
    assert len(base64.b64decode(as_base64["data"][0]["embedding"])) == 16
    assert kit.usdc(account.address) == FUNDS - 2 * price


def test_images_paid(kit: Kit) -> None:
    account = kit.wallet()
    paid = kit.pay("/x402v1/v1/images/generations", {"model": "sandbox/vision", "prompt": "a receipt", "n": 2}, account)
    assert paid.status_code == 200, paid.text
    images = paid.json()["data"]
    assert len(images) == 2 and all(base64.b64decode(i["b64_json"]).startswith(b"\x89PNG") for i in images)
    assert kit.usdc(account.address) == FUNDS - 2 * 40_000
    as_url = kit.pay("/kiosk/v1/images/generations", {"prompt": "x", "response_format": "url"}, account)
    assert as_url.json()["data"][0]["url"].startswith("data:image/png;base64,")
    assert kit.usdc(account.address) == FUNDS - 3 * 40_000


@pytest.mark.parametrize(
    "path", ["/v1/models/sandbox%2Fsmall:generateContent", "/v1/models/sandbox/small:generateContent"]
)
def test_gemini_generate_content_paid(kit: Kit, path: str) -> None:
    account = kit.wallet()
    body = {
        "contents": [{"role": "user", "parts": [{"text": "hi there"}]}],
        "generationConfig": {"maxOutputTokens": 3},
    }
    paid = kit.pay(path, body, account)
    assert paid.status_code == 200, paid.text
    data = paid.json()
    assert data["candidates"][0]["content"] == {"role": "model", "parts": [{"text": "Echo: hi"}]}
    assert data["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert data["usageMetadata"] == {"promptTokenCount": 6, "candidatesTokenCount": 3, "totalTokenCount": 9}
    assert kit.usdc(account.address) == FUNDS - 3  # 6 * 0.15 + 3 * 0.60 = 2.7 micro, rounded up
    assert kit.http.post("/v1/models/sandbox/small:countTokens", json=body).status_code == 404
    assert kit.http.post("/v1/models/nope:generateContent", json=body).status_code == 400


def test_settlement_ledger_filters_and_public_stats(kit: Kit) -> None:
    assert kit.http.get("/sandbox/stats").status_code == 200
    assert set(kit.stats()) == {"signatures_seen", "settled", "settled_amount", "refused"}
    assert kit.http.get("/sandbox/stats", params={"payer": "nope"}).status_code == 400
    assert kit.http.get("/sandbox/balance/0x12").status_code == 400
    assert kit.http.post("/sandbox/faucet", json={"address": Account.create().address, "amount": -1}).status_code == 400
    assert isinstance(kit.http.get("/sandbox/settlements").json(), list)
    stranger = Account.create().address
    assert kit.http.get(f"/sandbox/balance/{stranger}").json() == {"address": stranger, "balance": 0}
    assert b64({"a": 1})  # the helper round-trips
