"""LangChain fixtures: a funded throwaway wallet on the session sandbox, and what the sandbox says about it."""

from __future__ import annotations

import pytest
from langchain_support import SandboxView

from llm402 import Wallet
from llm402.sandbox import SandboxServer


@pytest.fixture
def view(sandbox: SandboxServer) -> SandboxView:
    return SandboxView(sandbox)


@pytest.fixture
def wallet(view: SandboxView) -> Wallet:
    return view.funded_wallet()
