"""On-chain fixtures: contracts compiled once per session, one in-process chain per session (tests use fresh
wallets and names, so they do not see each other's records), and a counter of the requests that reach the network."""

from __future__ import annotations

import httpx
import pytest
from onchain_support import Chain, Compiled, Traffic, compile_all

from llm402 import Wallet
from llm402.sandbox import SandboxServer


@pytest.fixture(scope="session")
def compiled() -> dict[str, Compiled]:
    return compile_all()


@pytest.fixture(scope="session")
def chain(compiled: dict[str, Compiled]) -> Chain:
    return Chain(compiled)


@pytest.fixture
def wallet() -> Wallet:
    return Wallet.create()


@pytest.fixture
def funded(sandbox: SandboxServer, wallet: Wallet) -> Wallet:
    httpx.post(
        f"{sandbox.url}/sandbox/faucet", json={"address": wallet.address, "amount": 5_000_000}
    ).raise_for_status()
    return wallet


@pytest.fixture
def traffic(monkeypatch: pytest.MonkeyPatch) -> Traffic:
    seen = Traffic()
    original = httpx.HTTPTransport.handle_request

    def counting(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        seen.requests.append(f"{request.method} {request.url.path}")
        return original(self, request)

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", counting)
    return seen
