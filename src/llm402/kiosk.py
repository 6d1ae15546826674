"""`CreditAccount`: a credit gateway's account endpoints (Token Kiosk): keys by SIWE, balance, usage, top-ups."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from .core import topup_flow
from .credit import CreditProfile, siwe_message, store_key, topup_body
from .errors import ConfigurationError, PaymentRequiredError
from .money import usd_to_atomic
from .receipts import Receipt

if TYPE_CHECKING:
    from decimal import Decimal

    from .gateway import Gateway


class CreditAccount:
    """Account operations of a credit gateway, signed by the gateway's wallet. Each SIWE message is fresh."""

    def __init__(self, gateway: Gateway, timeout: float = 30.0) -> None:
        self.gateway = gateway
        self.credit: CreditProfile = gateway.engine.config.credit or CreditProfile()
        self._http = httpx.Client(timeout=timeout)
        self._chain_id: int | None = None

    def close(self) -> None:
        """Close the account's http client."""
        self._http.close()

    def __enter__(self) -> CreditAccount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _wallet_address(self) -> str:
        if self.gateway.wallet is None:
            raise ConfigurationError("a credit account needs the gateway's wallet")
        return self.gateway.wallet.address

    def _url(self, template: str) -> str:
        return self.gateway.base_url + template.format(wallet=self._wallet_address)

    def chain_id(self) -> int:
        """The chain the gateway signs in on: configured, or read once from its top-up 402."""
        if self.credit.chain_id is not None:
            return self.credit.chain_id
        if self._chain_id is not None:
            return self._chain_id
        from .x402 import parse_challenge

        probe = self._http.post(
            self._url(self.credit.topup_path),
            content=topup_body(self.credit.min_topup),
            headers={"content-type": "application/json"},
        )
        challenge = parse_challenge(probe.headers, probe.content) if probe.status_code == 402 else None
        if challenge is None:
            raise PaymentRequiredError("cannot learn the gateway's chain from its top-up 402", code="key_mint_failed")
        self._chain_id = int(challenge.requirements[0].network.split(":", 1)[1])
        return self._chain_id

    def _siwe(self) -> dict[str, str]:
        wallet = self.gateway.wallet
        if wallet is None:
            raise ConfigurationError("SIWE needs the gateway's wallet")
        text = siwe_message(wallet.address, self.gateway.base_url + self.credit.keys_path, self.chain_id())
        return {"message": text, "signature": "0x" + wallet.sign_message(text).hex()}

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"message": response.text[:200]}
            code = body.get("error", "error") if isinstance(body, dict) else "error"
            raise PaymentRequiredError(
                f"{response.request.method} {response.request.url.path} failed: HTTP {response.status_code} {body}",
                code=str(code).lower() if isinstance(code, str) else "gateway_error",
                status=response.status_code,
            )
        return response.json()

    def create_key(self, label: str = "llm402", store: str | None = None) -> dict[str, Any]:
        """Mint an API key (shown once). ``store`` keeps it: ``env:NAME`` or a file path (mode 0600)."""
        data: dict[str, Any] = self._json(
            self._http.post(self._url(self.credit.keys_path), json={**self._siwe(), "label": label})
        )
        if store:
            store_key(store, str(data["key"]))
        return data

    def list_keys(self) -> list[dict[str, Any]]:
        """The wallet's keys (never the secrets)."""
        data = self._json(self._http.get(self._url(self.credit.keys_path), params=self._siwe()))
        return list(data.get("data", []))

    def revoke_key(self, key_id: int | str) -> bool:
        """Revoke one key by id."""
        url = f"{self._url(self.credit.keys_path)}/{key_id}"
        data = self._json(self._http.request("DELETE", url, json=self._siwe()))
        return bool(data.get("revoked"))

    def balance(self) -> dict[str, Any]:
        """Available credit (public endpoint)."""
        data: dict[str, Any] = self._json(self._http.get(self._url(self.credit.balance_path)))
        return data

    def _auth(self) -> dict[str, Any]:
        key = self.gateway._api_key or self.gateway.engine.config.api_key
        return {"headers": {"authorization": f"Bearer {key}"}} if key else {"params": self._siwe()}

    def usage(self) -> dict[str, Any]:
        """Balance and per-key usage (API key, or SIWE when no key is known)."""
        data: dict[str, Any] = self._json(self._http.get(self._url(self.credit.usage_path), **self._auth()))
        return data

    def topups(self) -> dict[str, Any]:
        """Top-up history, newest first."""
        data: dict[str, Any] = self._json(self._http.get(self._url(self.credit.topups_path), **self._auth()))
        return data

    def topup(self, amount_usd: Decimal | str | int) -> Receipt:
        """Buy credit with an x402 payment: within the policy's top-up limit and the budget left; recorded apart."""
        amount = usd_to_atomic(amount_usd)
        engine = self.gateway.engine
        flow = topup_flow(engine.config, self.credit, amount)
        receipt: Receipt = engine.run_standalone(flow, self._http)
        return receipt
