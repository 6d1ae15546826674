"""Sandbox test kit: funded throwaway wallets, x402 payments signed by the official SDK (or by hand for the
refusal cases), SIWE messages built with the `siwe` package, and private sandboxes with their own config."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.signers.local import LocalAccount

from llm402.sandbox import SandboxConfig, SandboxServer

FUNDS = 5_000_000  # $5 of test USDC
CHAT = {
    "model": "sandbox/small",
    "messages": [{"role": "user", "content": "Explain x402 in one line"}],
    "max_tokens": 32,
}


def b64(data: Any) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


def unb64(value: str) -> Any:
    return json.loads(base64.b64decode(value))


class Kit:
    """Talks to one sandbox over real HTTP, and signs what a client would sign."""

    def __init__(self, server: SandboxServer) -> None:
        self.server = server
        self.url = server.url
        self.config = server.config
        self.http = httpx.Client(base_url=server.url, timeout=20)

    # --- the sandbox's own view -----------------------------------------------------------------------------------

    def fund(self, address: str, amount: int = FUNDS) -> None:
        self.http.post("/sandbox/faucet", json={"address": address, "amount": amount}).raise_for_status()

    def usdc(self, address: str) -> int:
        return int(self.http.get(f"/sandbox/balance/{address}").json()["balance"])

    def stats(self, payer: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = self.http.get("/sandbox/stats", params={"payer": payer} if payer else {}).json()
        return data

    def settlements(self, payer: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.http.get("/sandbox/settlements", params={"payer": payer}).json()
        return data

    def wallet(self, amount: int = FUNDS) -> LocalAccount:
        account: LocalAccount = Account.create()
        if amount:
            self.fund(account.address, amount)
        return account

    # --- x402 through the official SDK ------------------------------------------------------------------------------

    @staticmethod
    def sdk(account: LocalAccount, max_usd: str | None = None) -> Any:
        from x402 import x402ClientSync
        from x402.http import x402HTTPClientSync
        from x402.mechanisms.evm.exact import register_exact_evm_client

        client = x402ClientSync()
        register_exact_evm_client(client, account)
        if max_usd:
            client.set_spend_controls({"max_amount_per_payment": max_usd})
        return x402HTTPClientSync(client)

    def sdk_headers(
        self, account: LocalAccount, challenge: httpx.Response, max_usd: str | None = None
    ) -> dict[str, str]:
        """The official SDK's answer to a v2 (header) or v1 (body) challenge: its replay header."""
        headers, _ = self.sdk(account, max_usd).handle_402_response(
            dict(challenge.headers), challenge.content, str(challenge.request.url)
        )
        return dict(headers)

    def kiosk_headers(
        self,
        account: LocalAccount,
        challenge: httpx.Response,
        header: str = "X-Payment",
        envelope: str = "v2",
        max_usd: str | None = None,
    ) -> dict[str, str]:
        """A Token Kiosk body -> the SDK's v2 payment -> ``X-Payment`` (v2 envelope, or v1 with a CAIP-2 network)."""
        from x402 import PaymentRequired
        from x402.http import encode_payment_signature_header

        body = challenge.json()
        assert "x402Version" not in body
        accepts = [{**a, "maxTimeoutSeconds": a.get("maxTimeoutSeconds", 300)} for a in body["accepts"]]
        required = PaymentRequired.model_validate(
            {"x402Version": 2, "resource": {"url": str(challenge.request.url)}, "accepts": accepts}
        )
        payload = self.sdk(account, max_usd)._client.create_payment_payload(required)
        if envelope == "v2":
            return {header: encode_payment_signature_header(payload)}
        v1 = {"x402Version": 1, "scheme": "exact", "network": self.config.network, "payload": payload.payload}
        return {header: b64(v1)}

    # --- hand-signed EIP-3009 (for the refusals the SDK would never produce) ------------------------------------------

    def authorization(
        self,
        account: LocalAccount,
        value: int,
        *,
        to: str | None = None,
        valid_after: int = 0,
        valid_before: int | None = None,
        nonce: str | None = None,
        signer: LocalAccount | None = None,
        domain_name: str | None = None,
    ) -> dict[str, Any]:
        """``{authorization, signature}`` signed independently of the sandbox's code."""
        auth = {
            "from": account.address,
            "to": to or self.config.payee,
            "value": str(value),
            "validAfter": str(valid_after),
            "validBefore": str(valid_before if valid_before is not None else int(time.time()) + 60),
            "nonce": nonce or "0x" + secrets.token_hex(32),
        }
        typed = {
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
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
                ],
            },
            "primaryType": "TransferWithAuthorization",
            "domain": {
                "name": domain_name or "USDC",
                "version": "2",
                "chainId": 84532,
                "verifyingContract": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            },
            "message": {
                **auth,
                "value": int(auth["value"]),
                "validAfter": int(auth["validAfter"]),
                "validBefore": int(auth["validBefore"]),
            },
        }
        signed = (signer or account).sign_message(encode_typed_data(full_message=typed))
        return {"authorization": auth, "signature": "0x" + signed.signature.hex().removeprefix("0x")}

    def v2_payment(self, inner: dict[str, Any], value: int, **accepted: Any) -> str:
        requirement = {
            "scheme": "exact",
            "network": self.config.network,
            "asset": self.config.asset,
            "amount": str(value),
            "payTo": self.config.payee,
            "maxTimeoutSeconds": 60,
            "extra": {"name": "USDC", "version": "2"},
            **accepted,
        }
        return b64({"x402Version": 2, "payload": inner, "accepted": requirement, "resource": {"url": self.url}})

    def v1_payment(self, inner: dict[str, Any], network: str | None = None, scheme: str = "exact") -> str:
        return b64({"x402Version": 1, "scheme": scheme, "network": network or "base-sepolia", "payload": inner})

    @staticmethod
    def price(challenge: httpx.Response) -> int:
        header = challenge.headers.get("payment-required")
        data = unb64(header) if header else challenge.json()
        entry = data["accepts"][0]
        return int(entry.get("amount") or entry["maxAmountRequired"])

    # --- SIWE and the Token Kiosk flow --------------------------------------------------------------------------------

    def siwe(
        self,
        account: LocalAccount,
        *,
        domain: str | None = None,
        uri: str | None = None,
        chain_id: int = 84532,
        issued_at: datetime | None = None,
        nonce: str | None = None,
        statement: str | None = "Sign in to the AI Gateway",
        signer: LocalAccount | None = None,
    ) -> dict[str, str]:
        from siwe import SiweMessage

        host = self.url.removeprefix("http://")
        message = SiweMessage(
            domain=domain or host,
            address=account.address,
            uri=uri or f"{self.url}/v1/auth/keys",
            version="1",
            chain_id=chain_id,
            nonce=nonce or secrets.token_hex(8),
            issued_at=(issued_at or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            statement=statement,
        ).prepare_message()
        signed = (signer or account).sign_message(encode_defunct(text=message))
        return {"message": message, "signature": "0x" + signed.signature.hex().removeprefix("0x")}

    def mint_key(self, account: LocalAccount, label: str = "test") -> tuple[int, str]:
        response = self.http.post("/v1/auth/keys", json={**self.siwe(account), "label": label})
        assert response.status_code == 200, response.text
        data = response.json()
        return int(data["id"]), str(data["key"])

    def topup(self, account: LocalAccount, usd: float, prefix: str = "") -> httpx.Response:
        first = self.http.post(f"{prefix}/v1/topup", json={"amount": usd})
        assert first.status_code == 402, first.text
        headers = self.kiosk_headers(account, first, max_usd="$10000")
        return self.http.post(f"{prefix}/v1/topup", json={"amount": usd}, headers=headers)

    def credit_wallet(self, usd: float = 2) -> tuple[LocalAccount, str]:
        """A wallet with ``usd`` of kiosk credit and an API key."""
        account = self.wallet(int(usd * 1_000_000))
        assert self.topup(account, usd).status_code == 200
        return account, self.mint_key(account)[1]

    def pay(
        self, path: str, body: dict[str, Any], account: LocalAccount, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """Unpaid request -> 402 -> the right replay for the challenge's dialect -> the paid response."""
        first = self.http.post(path, json=body, headers=headers or {})
        assert first.status_code == 402, first.text
        if first.headers.get("payment-required") or first.json().get("x402Version") == 1:
            paid = self.sdk_headers(account, first)
        else:
            paid = self.kiosk_headers(account, first)
        return self.http.post(path, json=body, headers={**(headers or {}), **paid})


@pytest.fixture
def kit(sandbox: SandboxServer) -> Iterator[Kit]:
    helper = Kit(sandbox)
    yield helper
    helper.http.close()


@pytest.fixture
def make_sandbox() -> Iterator[Callable[..., Kit]]:
    """Private sandboxes with their own config (stopped at the end of the test)."""
    started: list[tuple[SandboxServer, Kit]] = []

    def make(**overrides: Any) -> Kit:
        server = SandboxServer(replace(SandboxConfig(db_path=":memory:"), **overrides)).start()
        helper = Kit(server)
        started.append((server, helper))
        return helper

    yield make
    for server, helper in started:
        helper.http.close()
        server.stop()
