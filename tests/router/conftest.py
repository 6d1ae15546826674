"""Router fixtures: a fresh wallet funded on every sandbox a test starts, and a factory of gateways on them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from router_support import Sandbox, sandboxes

from llm402 import Gateway, Policy, Wallet
from llm402.budget import Ledger, open_ledger


@pytest.fixture
def wallet() -> Wallet:
    return Wallet.create()


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    shared = open_ledger("memory://")
    yield shared
    shared.close()


@pytest.fixture
def start(wallet: Wallet) -> Iterator[Callable[..., list[Sandbox]]]:
    """``start("", "fail_after_settle")``: fresh sandboxes (with those default faults), the wallet funded on each."""
    with contextlib.ExitStack() as stack:

        def run(*faults: str) -> list[Sandbox]:
            started = stack.enter_context(sandboxes(*faults))
            for sandbox in started:
                sandbox.fund(wallet.address)
            return started

        yield run


@pytest.fixture
def gateway(wallet: Wallet, ledger: Ledger) -> Callable[..., Gateway]:
    """A gateway on a sandbox, paying with the test wallet into the shared ledger."""

    def make(sandbox: Sandbox, **kw: object) -> Gateway:
        kw.setdefault("policy", Policy(max_payment_usd="0.05"))
        kw.setdefault("ledger", ledger)
        return Gateway(sandbox.base_url, wallet=wallet, **kw)  # type: ignore[arg-type]

    return make
