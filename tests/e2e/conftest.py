"""End-to-end fixtures: a funded throwaway wallet on the session sandbox."""

from __future__ import annotations

import pytest
from e2e_support import SandboxView

from llm402 import Wallet
from llm402.sandbox import SandboxServer


@pytest.fixture
def view(sandbox: SandboxServer) -> SandboxView:
    return SandboxView(sandbox)


@pytest.fixture
def wallet(view: SandboxView) -> Wallet:
    fresh = Wallet.create()
    view.fund(fresh.address)
    return fresh
