"""Fixtures for the LlamaIndex adapter's end-to-end tests: funded throwaway wallets on the session sandbox, and what
the sandbox itself says about them (the independent side of every money check)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest

from llm402 import Wallet

if TYPE_CHECKING:
    from llm402.sandbox import SandboxServer

FUNDS = 5_000_000  # $5 of sandbox test USDC


class SandboxView:
    """The sandbox's own books for a wallet."""

    def __init__(self, server: SandboxServer) -> None:
        self.url = server.url

    def fund(self, address: str, amount: int = FUNDS) -> None:
        httpx.post(f"{self.url}/sandbox/faucet", json={"address": address, "amount": amount}).raise_for_status()

    def balance(self, address: str) -> int:
        return int(httpx.get(f"{self.url}/sandbox/balance/{address}").json()["balance"])

    def stats(self, payer: str) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/sandbox/stats", params={"payer": payer}).json()
        return data

    def spent(self, address: str) -> int:
        return FUNDS - self.balance(address)


@pytest.fixture
def view(sandbox: SandboxServer) -> SandboxView:
    return SandboxView(sandbox)


@pytest.fixture
def wallet(view: SandboxView) -> Wallet:
    fresh = Wallet.create()
    view.fund(fresh.address)
    return fresh
