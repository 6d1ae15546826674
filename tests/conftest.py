"""Shared fixtures: a real sandbox gateway on a free 127.0.0.1 port, and throwaway funded wallets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm402.sandbox import SandboxConfig, SandboxServer


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxServer]:
    """One sandbox for the session; tests isolate themselves by using fresh wallets."""
    with SandboxServer(SandboxConfig(db_path=":memory:")) as server:
        yield server
