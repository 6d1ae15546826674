"""The Token Kiosk API over real HTTP: x402 top-up, SIWE-minted keys, credit chat, usage, and every 4xx."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import pytest
from eth_account import Account

from .conftest import CHAT, Kit, unb64


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def small_cost(prompt: int, completion: int) -> int:
    return -(-(prompt * 150_000 + completion * 600_000) // 1_000_000)


def test_faucet_topup_key_chat_usage(kit: Kit) -> None:
    account = kit.wallet(3_000_000)
    wallet = account.address.lower()
    assert kit.http.get(f"/v1/balance/{account.address}").json() == {"wallet": wallet, "available_usdc": 0}

    challenge = kit.http.post("/v1/topup", json={"amount": 2})
    assert challenge.status_code == 402
    assert challenge.json() == {
        "accepts": [
            {
                "scheme": "exact",
                "network": "eip155:84532",
                "amount": "2000000",
                "maxAmountRequired": "2000000",
                "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                "payTo": kit.config.payee,
                "maxTimeoutSeconds": 60,
                "extra": {"assetTransferMethod": "eip3009", "name": "USDC", "version": "2"},
            }
        ]
    }
    paid = kit.http.post("/v1/topup", json={"amount": 2}, headers=kit.kiosk_headers(account, challenge, max_usd="$10"))
    assert paid.status_code == 200, paid.text
    assert paid.json() == {"balance_usdc": 2_000_000, "credited_usdc": 2_000_000}
    settlement = unb64(paid.headers["x-payment-response"])
    assert settlement["success"] and settlement["payer"] == account.address and settlement["amount"] == "2000000"
    assert kit.usdc(account.address) == 1_000_000
    assert kit.http.get(f"/v1/balance/{wallet}").json()["available_usdc"] == 2_000_000

    key_id, key = kit.mint_key(account, label="my-app")
    assert key.startswith("sk-") and len(key) == 67 and int(key[3:], 16) >= 0

    chat = kit.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert chat.status_code == 200, chat.text
    usage = chat.json()["usage"]
    assert usage == {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}
    charge = small_cost(9, 7)
    assert "payment-response" not in chat.headers

    report = kit.http.get(f"/v1/usage/{account.address}", headers=bearer(key))
    assert report.status_code == 200, report.text
    assert report.json() == {
        "wallet": wallet,
        "balance_usdc": 2_000_000 - charge,
        "locked_usdc": 0,
        "available_usdc": 2_000_000 - charge,
        "keys": [
            {
                "api_key_id": key_id,
                "label": "my-app",
                "request_count": 1,
                "total_prompt_tokens": 9,
                "total_completion_tokens": 7,
                "total_charged_usdc": charge,
                "total_platform_revenue_usd": 0.0,
            }
        ],
    }
    assert kit.http.get(f"/v1/usage/{wallet}", params={"api_key": key}).json() == report.json()
    by_siwe = kit.http.get(f"/v1/usage/{wallet}", params=kit.siwe(account))
    assert by_siwe.status_code == 200 and by_siwe.json() == report.json()

    topups = kit.http.get(f"/v1/topups/{wallet}", headers=bearer(key)).json()
    assert topups["wallet"] == wallet and topups["network"] == "Base Sepolia (Testnet)"
    (row,) = topups["topups"]
    assert row["amount_usdc"] == 2_000_000 and row["tx_hash"] == settlement["transaction"]
    assert row["created_at"].endswith("Z")
    assert kit.http.get(f"/v1/topups/{wallet}", params=kit.siwe(account)).json() == topups
    (settled,) = kit.settlements(account.address)
    assert settled["path"] == "/v1/topup" and settled["amount"] == 2_000_000


def test_second_topup_lists_newest_first_and_takes_payment_signature(kit: Kit) -> None:
    account = kit.wallet(3_000_000)
    assert kit.topup(account, 1).status_code == 200
    challenge = kit.http.post("/kiosk/v1/topup", json={"amount": 1.5})
    paid = kit.http.post(
        "/kiosk/v1/topup",
        json={"amount": 1.5},
        headers=kit.kiosk_headers(account, challenge, header="Payment-Signature", max_usd="$10"),
    )
    assert paid.json() == {"balance_usdc": 2_500_000, "credited_usdc": 1_500_000}
    key = kit.mint_key(account)[1]
    amounts = [
        t["amount_usdc"] for t in kit.http.get(f"/v1/topups/{account.address}", headers=bearer(key)).json()["topups"]
    ]
    assert amounts == [1_500_000, 1_000_000]


@pytest.mark.parametrize("amount", [0.5, 0, -1, 10_001, "abc", None, True, 1.0000001])
def test_topup_amount_validated_before_any_402(kit: Kit, amount: Any) -> None:
    response = kit.http.post("/v1/topup", json={"amount": amount})
    assert response.status_code == 400 and response.json()["error"] == "VALIDATION_ERROR"


def test_topup_refusals_credit_nothing(kit: Kit) -> None:
    account = kit.wallet(3_000_000)
    underpaid = kit.v2_payment(kit.authorization(account, 999_999), 999_999)
    refused = kit.http.post("/v1/topup", json={"amount": 1}, headers={"X-Payment": underpaid})
    assert refused.status_code == 402 and refused.json()["error"] == "underpaid"
    assert kit.http.get(f"/v1/balance/{account.address}").json()["available_usdc"] == 0
    assert kit.usdc(account.address) == 3_000_000


def test_insufficient_credit_is_402_and_charges_nothing(kit: Kit) -> None:
    account, key = kit.credit_wallet(1)
    expensive = {**CHAT, "model": "sandbox/large", "max_tokens": 100_000}  # reserves 1.5 USD
    response = kit.http.post("/v1/chat/completions", json=expensive, headers=bearer(key))
    assert response.status_code == 402
    body = response.json()
    assert body["error"] == "INSUFFICIENT_BALANCE" and "accepts" not in body
    assert body["message"] == "Insufficient balance. Top up at POST /v1/topup"
    assert body["available_usdc"] == 1_000_000 and body["required_usdc"] == 1_500_027
    assert "payment-required" not in response.headers
    usage = kit.http.get(f"/v1/usage/{account.address}", headers=bearer(key)).json()
    assert usage["balance_usdc"] == 1_000_000 and usage["locked_usdc"] == 0 and usage["keys"][0]["request_count"] == 0
    fits = kit.http.post("/v1/chat/completions", json={**expensive, "max_tokens": 60_000}, headers=bearer(key))
    assert fits.status_code == 200, "the reservation is released: the balance is whole again"


def test_reservation_reconciles_to_the_actual_cost(kit: Kit) -> None:
    account, key = kit.credit_wallet(1)
    body = {"model": "sandbox/medium", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5000}
    response = kit.http.post("/v1/chat/completions", json=body, headers=bearer(key))
    assert response.status_code == 200
    assert int(response.headers["x-sandbox-charge-reserved"]) == math.ceil((7 * 1_250_000 + 5000 * 10_000_000) / 1e6)
    usage = response.json()["usage"]
    actual = -(-(usage["prompt_tokens"] * 1_250_000 + usage["completion_tokens"] * 10_000_000) // 1_000_000)
    report = kit.http.get(f"/v1/usage/{account.address}", headers=bearer(key)).json()
    assert report["balance_usdc"] == 1_000_000 - actual and report["locked_usdc"] == 0
    assert report["keys"][0]["total_charged_usdc"] == actual


def test_streamed_credit_call_is_metered(kit: Kit) -> None:
    account, key = kit.credit_wallet(1)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with kit.http.stream("POST", "/v1/chat/completions", json=body, headers=bearer(key)) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    report = kit.http.get(f"/v1/usage/{account.address}", headers=bearer(key)).json()
    assert report["keys"][0]["total_completion_tokens"] == 7 and report["keys"][0]["request_count"] == 1
    assert report["balance_usdc"] == 1_000_000 - small_cost(9, 7) and report["locked_usdc"] == 0


def test_markup_is_platform_revenue(make_sandbox: Any) -> None:
    private = make_sandbox(markup_bps=2_500)
    account, key = private.credit_wallet(1)
    response = private.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert response.status_code == 200
    base = Fraction(9 * 150_000 + 7 * 600_000, 1_000_000)  # 5.55 micro, exact
    report = private.http.get(f"/v1/usage/{account.address}", headers=bearer(key)).json()
    charged = report["keys"][0]["total_charged_usdc"]
    assert charged == math.ceil(base * Fraction(5, 4)) == 7
    assert report["keys"][0]["total_platform_revenue_usd"] == pytest.approx((charged - math.ceil(base)) / 1e6)
    first = private.http.post("/v1/chat/completions", json=CHAT)
    assert private.price(first) == math.ceil(Fraction(9 * 150_000 + 32 * 600_000, 1_000_000) * Fraction(5, 4))


def test_keys_are_listed_and_revoked(kit: Kit) -> None:
    account, key = kit.credit_wallet(1)
    other_id, _ = kit.mint_key(account, label="second")
    listed = kit.http.get("/v1/auth/keys", params=kit.siwe(account)).json()["data"]
    assert [k["label"] for k in listed] == ["test", "second"] and all(k["revoked_at"] is None for k in listed)
    assert all("key" not in k for k in listed), "keys are shown once, at creation"
    first_id = listed[0]["id"]
    revoked = kit.http.request("DELETE", f"/v1/auth/keys/{first_id}", json=kit.siwe(account))
    assert revoked.status_code == 200 and revoked.json() == {"revoked": True}
    denied = kit.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert denied.status_code == 401 and denied.json()["error"] == "UNAUTHORIZED"
    listed = kit.http.get("/v1/auth/keys", params=kit.siwe(account)).json()["data"]
    assert listed[0]["revoked_at"] is not None and listed[1]["revoked_at"] is None
    stranger = Account.create()
    assert kit.http.request("DELETE", f"/v1/auth/keys/{other_id}", json=kit.siwe(stranger)).status_code == 404
    assert kit.http.request("DELETE", "/v1/auth/keys/999999", json=kit.siwe(account)).status_code == 404
    assert kit.http.request("DELETE", f"/v1/auth/keys/{other_id}", json={}).status_code == 401


def test_bad_keys_are_401(kit: Kit) -> None:
    account, key = kit.credit_wallet(1)
    for headers in (bearer("sk-" + "0" * 64), {"Authorization": "Bearer"}, {"Authorization": "Basic abc"}):
        response = kit.http.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 401 and response.json()["error"] == "UNAUTHORIZED"
    foreign = Account.create().address
    assert kit.http.get(f"/v1/usage/{foreign}", headers=bearer(key)).status_code == 401
    assert kit.http.get(f"/v1/usage/{account.address}").status_code == 401
    assert kit.http.get(f"/v1/topups/{account.address}", params={"api_key": "sk-nope"}).status_code == 401
    assert kit.http.get("/v1/usage/0xnot-an-address", headers=bearer(key)).status_code == 400


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"issued_at": datetime.now(UTC) - timedelta(minutes=6)}, "older than 5 minutes"),
        ({"issued_at": datetime.now(UTC) + timedelta(minutes=10)}, "in the future"),
        ({"domain": "evil.example"}, "domain mismatch"),
        ({"uri": "http://evil.example/v1/auth/keys"}, "uri mismatch"),
        ({"chain_id": 8453}, "chainId mismatch"),
        ({"statement": "Something else"}, "statement mismatch"),
        ({"signer": Account.create()}, "Invalid SIWE signature"),
    ],
)
def test_siwe_refusals_are_401_with_the_reason(kit: Kit, change: dict[str, Any], reason: str) -> None:
    account = kit.wallet(0)
    response = kit.http.post("/v1/auth/keys", json=kit.siwe(account, **change))
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "UNAUTHORIZED" and reason in response.json()["message"]


def test_siwe_nonce_is_used_once(kit: Kit) -> None:
    account = kit.wallet(0)
    signed = kit.siwe(account)
    assert kit.http.post("/v1/auth/keys", json=signed).status_code == 200
    again = kit.http.post("/v1/auth/keys", json=signed)
    assert again.status_code == 401 and "nonce already used" in again.json()["message"]
    garbage = kit.http.post("/v1/auth/keys", json={"message": "hello", "signature": "0x00"})
    assert garbage.status_code == 401 and "Malformed SIWE message" in garbage.json()["message"]
    assert kit.http.post("/v1/auth/keys", json={"label": "x"}).status_code == 401
    assert kit.http.post("/v1/auth/keys", json={**kit.siwe(account), "label": 5}).status_code == 400


def test_siwe_under_a_dialect_mount(kit: Kit) -> None:
    account = kit.wallet(0)
    signed = kit.siwe(account, uri=f"{kit.url}/kiosk/v1/auth/keys")
    assert kit.http.post("/kiosk/v1/auth/keys", json=signed).status_code == 200


@pytest.mark.parametrize("field", ["thinking", "reasoning_effort"])
def test_thinking_is_rejected_and_charges_nothing(kit: Kit, field: str) -> None:
    account, key = kit.credit_wallet(1)
    body = {**CHAT, field: {"type": "enabled"} if field == "thinking" else "high"}
    response = kit.http.post("/v1/chat/completions", json=body, headers=bearer(key))
    assert response.status_code == 400
    assert response.json() == {"error": "VALIDATION_ERROR", "message": "Thinking/reasoning models are not supported"}
    assert kit.http.post("/x402v2/v1/chat/completions", json=body).status_code == 400
    assert kit.http.get(f"/v1/balance/{account.address}").json()["available_usdc"] == 1_000_000


def test_rate_limit_is_429_without_charge(make_sandbox: Any) -> None:
    private = make_sandbox(rate_limit_per_minute=2)
    account, key = private.credit_wallet(1)
    for _ in range(2):
        assert private.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key)).status_code == 200
    before = private.http.get(f"/v1/balance/{account.address}").json()["available_usdc"]
    limited = private.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert limited.status_code == 429
    assert limited.json() == {"error": "RATE_LIMITED", "message": "Rate limit exceeded"}
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert private.http.get(f"/v1/balance/{account.address}").json()["available_usdc"] == before
    report = private.http.get(f"/v1/usage/{account.address}", headers=bearer(key)).json()
    assert report["keys"][0]["request_count"] == 2
    second_key = private.mint_key(account, "other")[1]
    assert private.http.post("/v1/chat/completions", json=CHAT, headers=bearer(second_key)).status_code == 429, (
        "the window is per wallet, not per key"
    )


def test_upstream_failure_is_502_and_releases_the_lock(kit: Kit) -> None:
    account, key = kit.credit_wallet(1)
    response = kit.http.post(
        "/v1/chat/completions", json=CHAT, headers={**bearer(key), "X-Sandbox-Fault": "upstream_error"}
    )
    assert response.status_code == 502 and response.json()["error"] == "UPSTREAM_ERROR"
    report = kit.http.get(f"/v1/usage/{account.address}", headers=bearer(key)).json()
    assert report["balance_usdc"] == 1_000_000 and report["locked_usdc"] == 0
    assert report["keys"][0]["total_charged_usdc"] == 0


def test_credit_mode_serves_every_paid_endpoint(kit: Kit) -> None:
    account, key = kit.credit_wallet(1)
    embeddings = kit.http.post("/v1/embeddings", json={"model": "sandbox/small", "input": "a b"}, headers=bearer(key))
    images = kit.http.post("/v1/images/generations", json={"prompt": "p"}, headers=bearer(key))
    gemini = kit.http.post(
        "/v1/models/sandbox/small:generateContent",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers=bearer(key),
    )
    assert [r.status_code for r in (embeddings, images, gemini)] == [200, 200, 200]
    report = kit.http.get(f"/v1/usage/{account.address}", headers=bearer(key)).json()
    assert report["keys"][0]["request_count"] == 3
    assert report["balance_usdc"] == 1_000_000 - 1 - 40_000 - 3


def test_public_endpoints(kit: Kit) -> None:
    assert kit.http.get("/health").json() == {"status": "ok"}
    models = kit.http.get("/v1/models").json()
    assert models["object"] == "list"
    small = next(m for m in models["data"] if m["id"] == "sandbox/small")
    assert {
        k: small[k] for k in ("name", "provider", "contextLength", "promptPricePer1MTokens", "completionPricePer1M")
    } == {
        "name": "small",
        "provider": "sandbox",
        "contextLength": 128_000,
        "promptPricePer1MTokens": 0.15,
        "completionPricePer1M": 0.6,
    }
    assert [m["id"] for m in models["data"]] == ["sandbox/small", "sandbox/medium", "sandbox/large", "sandbox/vision"]
    assert kit.http.get("/x402v1/v1/models/sandbox/large").json()["contextLength"] == 1_000_000
    assert kit.http.get("/v1/models/nope").status_code == 404
    missing = kit.http.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"] == "NOT_FOUND"
    assert kit.http.get("/v1/chat/completions").status_code == 405
    assert kit.http.get("/v1/balance/0x123").status_code == 400
    assert isinstance(httpx.get(f"{kit.url}/v1/balance/{Account.create().address}").json()["available_usdc"], int)
