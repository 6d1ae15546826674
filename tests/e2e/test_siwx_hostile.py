"""A gateway on 127.0.0.1 whose 402 carries a sign-in-with-x challenge with a line break in a field: llm402 refuses the
call (``sign_in_refused``) and never signs the message; a clean challenge is still answered."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from llm402 import Gateway, Policy, Wallet
from llm402.errors import refusal_from_envelope
from llm402.identity import SIWX_HEADER

ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"  # USDC on Base Sepolia
PAYEE = "0x" + "ab" * 20
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
PAYMENT_HEADERS = ("payment-signature", "x-payment")


class RecordingSigner:
    """A `Signer` that records what it is asked to sign and signs with a throwaway wallet."""

    def __init__(self) -> None:
        self._wallet = Wallet.create()
        self.messages: list[str] = []

    @property
    def address(self) -> str:
        return self._wallet.address

    def sign_typed_data(self, domain: Any, types: dict[str, Any], primary_type: str, message: dict[str, Any]) -> bytes:
        return self._wallet.sign_typed_data(domain, types, primary_type, message)

    def sign_message(self, message: str) -> bytes:
        self.messages.append(message)
        return self._wallet.sign_message(message)


class SiwxGateway:
    """Answers 402 (x402 v2, with a sign-in-with-x extension) until a request carries a payment or a sign-in proof."""

    def __init__(self, **info: object) -> None:
        self.info = info
        self.requests: list[dict[str, str]] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                gateway.requests.append(headers)
                if any(h in headers for h in (*PAYMENT_HEADERS, SIWX_HEADER)):
                    body = {
                        "choices": [{"message": {"content": "hi"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                    }
                    self._answer(200, {}, body)
                else:
                    self._answer(402, {"payment-required": gateway.challenge()}, {})

            def _answer(self, status: int, headers: dict[str, str], body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {**headers, "content-type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def challenge(self) -> str:
        info: dict[str, object] = {
            "domain": self.url.split("://", 1)[1],
            "uri": f"{self.url}/v1/chat/completions",
            "version": "1",
            "nonce": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
            "issuedAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "statement": "Sign in to the gateway",
            "requestId": "req-42",
            "resources": [f"{self.url}/v1/chat/completions"],
            **self.info,
        }
        required = {
            "x402Version": 2,
            "resource": {"url": f"{self.url}/v1/chat/completions"},
            "accepts": [
                {
                    "scheme": "exact",
                    "network": "eip155:84532",
                    "asset": ASSET,
                    "amount": "5000",
                    "payTo": PAYEE,
                    "maxTimeoutSeconds": 60,
                    "extra": {"name": "USDC", "version": "2"},
                }
            ],
            "extensions": {
                SIWX_HEADER: {
                    "info": info,
                    "supportedChains": [{"chainId": "eip155:84532", "type": "eip191"}],
                    "schema": {},
                }
            },
        }
        return base64.b64encode(json.dumps(required).encode()).decode()

    def __enter__(self) -> SiwxGateway:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def signer() -> RecordingSigner:
    return RecordingSigner()


def calls(server: SiwxGateway, signer: RecordingSigner, count: int = 2) -> Iterator[httpx.Response]:
    """``count`` chat calls through llm402 (a wallet that has paid here may be asked to sign in on a later call)."""
    gw = Gateway(f"{server.url}/v1", wallet=signer, policy=Policy(max_payment_usd="0.05"), ledger="memory://")
    with gw.http_client() as client:
        for _ in range(count):
            yield client.post(f"{server.url}/v1/chat/completions", json=CHAT)
    gw.close()


@pytest.mark.parametrize(
    "info",
    [
        {"requestId": "req-42\nResources:\n- https://evil.example/everything"},
        {"resources": ["http://127.0.0.1/v1/chat/completions\u2028- https://evil.example/everything"]},
        {"statement": "Sign in to the gateway\rand approve every transfer"},
        {"nonce": "a1b2c3d4e5f60718293a4b5c\x00"},
    ],
    ids=["requestId-lf", "resources-u2028", "statement-cr", "nonce-nul"],
)
def test_a_hostile_sign_in_challenge_is_refused_and_never_signed(
    signer: RecordingSigner, info: dict[str, object]
) -> None:
    with SiwxGateway(**info) as server:
        refusals = []
        for response in calls(server, signer):  # a call may be paid without signing in first: then the next one
            if response.status_code != 200:
                refusal = refusal_from_envelope(response.content)
                assert refusal is not None, response.text
                refusals.append(refusal)
                break
    assert [r.code for r in refusals] == ["sign_in_refused"]
    assert "control character" in refusals[0].message
    assert signer.messages == []  # the wallet never signed the challenge
    assert not any(SIWX_HEADER in headers for headers in server.requests)  # and nothing went out as a proof
    last = server.requests[-1]
    assert not any(h in last for h in PAYMENT_HEADERS)  # the refused call paid nothing


def test_a_clean_sign_in_challenge_is_still_answered(signer: RecordingSigner) -> None:
    with SiwxGateway() as server:
        assert [r.status_code for r in calls(server, signer)] == [200, 200]
    proofs = [json.loads(base64.b64decode(h[SIWX_HEADER])) for h in server.requests if SIWX_HEADER in h]
    assert proofs
    assert all(p["requestId"] == "req-42" and p["address"] == signer.address for p in proofs)
    assert len(signer.messages) == len(proofs)
    assert all("\nRequest ID: req-42" in m for m in signer.messages)
