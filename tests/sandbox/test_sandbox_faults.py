"""Every fault mode of ``X-Sandbox-Fault`` (and ``SandboxConfig.faults``), over real HTTP."""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

import httpx
import pytest

from llm402.sandbox.config import OTHER_PAYEE_ADDRESS

from .conftest import CHAT, FUNDS, Kit, unb64

PRICE = 21
PATH = "/v1/chat/completions"


def fault(spec: str) -> dict[str, str]:
    return {"X-Sandbox-Fault": spec}


def paid_headers(kit: Kit, account: Any, spec: str, path: str = PATH, body: dict[str, Any] = CHAT) -> dict[str, str]:
    """The fault header plus a valid payment for ``body``, signed against a clean 402."""
    first = kit.http.post(path, json=body)
    pay = (
        kit.sdk_headers(account, first) if first.headers.get("payment-required") else kit.kiosk_headers(account, first)
    )
    return {**fault(spec), **pay}


def collect_data_lines(response: httpx.Response, into: list[str]) -> None:
    into.extend(line for line in response.iter_lines() if line.startswith("data: "))


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_status_before_any_payment(kit: Kit, status: int) -> None:
    response = kit.http.post(PATH, json=CHAT, headers=fault(f"status={status}"))
    assert response.status_code == status and "payment-required" not in response.headers
    assert response.json()["error"] == {429: "RATE_LIMITED", 500: "INTERNAL_ERROR", 502: "UPSTREAM_ERROR"}.get(
        status, "SERVICE_UNAVAILABLE"
    )


def test_status_429_with_retry_after_and_times(kit: Kit) -> None:
    spec = "status=429;retry_after=7;times=2"
    first, second, third = (kit.http.post(PATH, json=CHAT, headers=fault(spec)) for _ in range(3))
    assert first.status_code == second.status_code == 429 and first.headers["retry-after"] == "7"
    assert third.status_code == 402, "times=2: only the first two requests with this exact spec"
    other = kit.http.post(PATH, json=CHAT, headers=fault("retry_after=7;status=429;times=2"))
    assert other.status_code == 429, "counted per exact header value"


def test_delay(kit: Kit) -> None:
    started = time.monotonic()
    assert kit.http.post(PATH, json=CHAT, headers=fault("delay_ms=250")).status_code == 402
    assert time.monotonic() - started >= 0.25


def test_fail_after_settle_takes_the_money(kit: Kit) -> None:
    account = kit.wallet()
    response = kit.http.post(PATH, json=CHAT, headers=paid_headers(kit, account, "fail_after_settle"))
    assert response.status_code == 500 and response.json()["error"] == "INTERNAL_ERROR"
    assert "payment-response" not in response.headers
    assert kit.usdc(account.address) == FUNDS - PRICE
    assert kit.stats(account.address)["settled"] == 1


def test_stall_after_settle(kit: Kit) -> None:
    account = kit.wallet()
    started = time.monotonic()
    response = kit.http.post(PATH, json=CHAT, headers=paid_headers(kit, account, "stall_after_settle=0.3"))
    assert response.status_code == 200 and "payment-response" in response.headers
    assert time.monotonic() - started >= 0.3
    assert kit.usdc(account.address) == FUNDS - PRICE


def test_stall_past_the_client_timeout_still_settles(kit: Kit) -> None:
    account = kit.wallet()
    headers = paid_headers(kit, account, "stall_after_settle=1")
    with pytest.raises(httpx.ReadTimeout):
        kit.http.post(PATH, json=CHAT, headers=headers, timeout=0.3)
    assert kit.usdc(account.address) == FUNDS - PRICE


def test_stream_cut_drops_the_connection(kit: Kit) -> None:
    account = kit.wallet()
    body = {**CHAT, "stream": True}
    seen: list[str] = []
    headers = paid_headers(kit, account, "stream_cut=3", body=body)
    with kit.http.stream("POST", PATH, json=body, headers=headers) as r:
        assert r.status_code == 200 and "payment-response" in r.headers
        with pytest.raises(httpx.RemoteProtocolError):
            collect_data_lines(r, seen)
    assert len(seen) == 3 and "data: [DONE]" not in seen
    assert kit.usdc(account.address) == FUNDS - PRICE, "a stream is settled before its first byte"


def test_stream_cut_in_credit_mode_charges_what_was_sent(kit: Kit) -> None:
    account, key = kit.credit_wallet(1)
    body = {**CHAT, "stream": True}
    headers = {"Authorization": f"Bearer {key}", **fault("stream_cut=2")}
    with pytest.raises(httpx.RemoteProtocolError), kit.http.stream("POST", PATH, json=body, headers=headers) as r:
        list(r.iter_lines())
    report = kit.http.get(f"/v1/usage/{account.address}", headers={"Authorization": f"Bearer {key}"}).json()
    assert report["keys"][0]["total_completion_tokens"] == 2 and report["locked_usdc"] == 0
    assert report["balance_usdc"] == 1_000_000 - 3  # 9 * 0.15 + 2 * 0.60 = 2.55 micro, rounded up


def test_stream_forever_keeps_the_connection_busy(kit: Kit) -> None:
    account = kit.wallet()
    body = {**CHAT, "stream": True}
    keepalives = 0
    started = time.monotonic()
    with kit.http.stream("POST", PATH, json=body, headers=paid_headers(kit, account, "stream_forever", body=body)) as r:
        for line in r.iter_lines():
            assert line != "data: [DONE]"
            keepalives += line.startswith(":")
            if keepalives >= 5:
                break
    assert keepalives == 5 and time.monotonic() - started < 5


def _decode_header(response: httpx.Response) -> Any:
    return json.loads(base64.b64decode(response.headers["payment-required"], validate=True))


def test_malformed_402_v2(kit: Kit) -> None:
    def get(kind: str) -> httpx.Response:
        response = kit.http.post(PATH, json=CHAT, headers=fault(f"malformed_402={kind}"))
        assert response.status_code == 402
        return response

    with pytest.raises(binascii.Error):
        base64.b64decode(get("bad_base64").headers["payment-required"], validate=True)
    with pytest.raises(ValueError, match=r"Expecting|Unterminated|char"):
        _decode_header(get("bad_json"))
    assert "payTo" not in _decode_header(get("missing_payee"))["accepts"][0]
    assert _decode_header(get("negative_amount"))["accepts"][0]["amount"].startswith("-")
    assert "." in _decode_header(get("fractional_amount"))["accepts"][0]["amount"]
    assert int(_decode_header(get("huge_amount"))["accepts"][0]["amount"]) > 2**255
    assert _decode_header(get("unknown_asset"))["accepts"][0]["asset"] != kit.config.asset
    assert _decode_header(get("unknown_network"))["accepts"][0]["network"] == "unknown-network"
    assert _decode_header(get("empty_accepts"))["accepts"] == []


def test_malformed_402_body_dialects(kit: Kit) -> None:
    v1 = kit.http.post("/x402v1/v1/chat/completions", json=CHAT, headers=fault("malformed_402=missing_payee"))
    assert v1.json()["x402Version"] == 1 and "payTo" not in v1.json()["accepts"][0]
    kiosk = kit.http.post("/kiosk/v1/chat/completions", json=CHAT, headers=fault("malformed_402=negative_amount"))
    entry = kiosk.json()["accepts"][0]
    assert entry["amount"] == entry["maxAmountRequired"] == f"-{PRICE}"
    broken = kit.http.post("/kiosk/v1/chat/completions", json=CHAT, headers=fault("malformed_402=bad_json"))
    with pytest.raises(ValueError, match=r"Expecting|Unterminated|char"):
        broken.json()


def test_redirect_after_402(kit: Kit) -> None:
    account = kit.wallet()
    headers = paid_headers(kit, account, "redirect_after_402=http://elsewhere.invalid/v1/chat/completions")
    response = kit.http.post(PATH, json=CHAT, headers=headers)
    assert response.status_code == 307
    assert response.headers["location"] == "http://elsewhere.invalid/v1/chat/completions"
    assert kit.usdc(account.address) == FUNDS
    stats = kit.stats(account.address)
    assert stats["signatures_seen"] == 1 and stats["settled"] == 0


def test_change_payee_on_replay(kit: Kit) -> None:
    account = kit.wallet()
    response = kit.http.post(PATH, json=CHAT, headers=paid_headers(kit, account, "change_payee_on_replay"))
    assert response.status_code == 402
    assert unb64(response.headers["payment-required"])["accepts"][0]["payTo"] == OTHER_PAYEE_ADDRESS
    assert kit.usdc(account.address) == FUNDS


def test_change_amount_on_replay(kit: Kit) -> None:
    account = kit.wallet()
    response = kit.http.post(PATH, json=CHAT, headers=paid_headers(kit, account, "change_amount_on_replay"))
    assert response.status_code == 402
    assert int(unb64(response.headers["payment-required"])["accepts"][0]["amount"]) != PRICE
    assert kit.usdc(account.address) == FUNDS


def test_replay_402(kit: Kit) -> None:
    account = kit.wallet()
    response = kit.http.post(PATH, json=CHAT, headers=paid_headers(kit, account, "replay_402"))
    assert response.status_code == 402 and unb64(response.headers["payment-required"])["accepts"]
    assert kit.usdc(account.address) == FUNDS and kit.stats(account.address)["settled"] == 0


def test_upstream_error_settles_nothing(kit: Kit) -> None:
    account = kit.wallet()
    response = kit.http.post(PATH, json=CHAT, headers=paid_headers(kit, account, "upstream_error"))
    assert response.status_code == 502 and response.json()["error"] == "UPSTREAM_ERROR"
    assert kit.usdc(account.address) == FUNDS


def test_oversized(kit: Kit) -> None:
    account = kit.wallet()
    response = kit.http.post(PATH, json=CHAT, headers=paid_headers(kit, account, "oversized=100000"))
    assert response.status_code == 200 and len(response.content) == 100_000
    assert response.json()["choices"][0]["message"]["content"].startswith("Echo:")


def test_settlement_payer_lie(kit: Kit) -> None:
    account, liar = kit.wallet(), kit.wallet(0)
    response = kit.http.post(PATH, json=CHAT, headers=paid_headers(kit, account, f"settlement_payer={liar.address}"))
    assert unb64(response.headers["payment-response"])["payer"] == liar.address
    assert kit.settlements(account.address)[0]["payer"] == account.address
    assert kit.usdc(account.address) == FUNDS - PRICE


def test_faults_on_other_endpoints_and_in_credit_mode(kit: Kit) -> None:
    account, key = kit.credit_wallet(1)
    response = kit.http.post(PATH, json=CHAT, headers={"Authorization": f"Bearer {key}", **fault("fail_after_settle")})
    assert response.status_code == 500
    charged = kit.http.get(f"/v1/balance/{account.address}").json()["available_usdc"]
    assert charged == 1_000_000 - 6, "credit mode: charged, then the failure"
    topup = kit.http.post("/v1/topup", json={"amount": 1}, headers=fault("status=503"))
    assert topup.status_code == 503
    images = kit.http.post("/v1/images/generations", json={"prompt": "x"}, headers=fault("malformed_402=empty_accepts"))
    assert unb64(images.headers["payment-required"])["accepts"] == []


def test_config_default_faults_and_bad_specs(make_sandbox: Any, kit: Kit) -> None:
    private = make_sandbox(faults="status=503")
    assert private.http.post(PATH, json=CHAT).status_code == 503
    assert private.http.post(PATH, json=CHAT, headers=fault("delay_ms=1")).status_code == 402, "the header wins"
    assert private.http.get("/v1/models").status_code == 200, "faults touch only the paid endpoints"
    for spec in ("status=418", "nope", "delay_ms=x", "malformed_402=weird", "settlement_payer=bob", "times=0"):
        response = kit.http.post(PATH, json=CHAT, headers=fault(spec))
        assert response.status_code == 400 and "X-Sandbox-Fault" in response.json()["message"], spec
    with pytest.raises(ValueError, match="unknown fault"):
        make_sandbox(faults="explode")
