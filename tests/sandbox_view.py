"""What the sandbox itself says about a wallet: the independent side of every money check in the tests."""

from __future__ import annotations

from typing import Any

import httpx

from llm402 import Wallet
from llm402.sandbox import SandboxServer

FUNDS = 5_000_000  # $5 of sandbox test USDC


class SandboxView:
    """The sandbox's own books for a wallet (balance, signatures seen, settlements)."""

    def __init__(self, server: SandboxServer) -> None:
        self.url = server.url

    def fund(self, address: str, amount: int = FUNDS) -> None:
        httpx.post(f"{self.url}/sandbox/faucet", json={"address": address, "amount": amount}).raise_for_status()

    def balance(self, address: str) -> int:
        return int(httpx.get(f"{self.url}/sandbox/balance/{address}").json()["balance"])

    def spent(self, address: str) -> int:
        return FUNDS - self.balance(address)

    def stats(self, payer: str) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/sandbox/stats", params={"payer": payer}).json()
        return data

    def settlements(self, payer: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = httpx.get(f"{self.url}/sandbox/settlements", params={"payer": payer}).json()
        return data

    def funded_wallet(self) -> Wallet:
        wallet = Wallet.create()
        self.fund(wallet.address)
        return wallet
