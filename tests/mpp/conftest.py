"""MPP tests: pympp's own server (from PyPI) on 127.0.0.1, next to the session sandbox of tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pympp_server import PymppServer


@pytest.fixture(scope="module")
def pympp_server() -> Iterator[PymppServer]:
    """pympp's evm/charge routes: ``/mpp/v1`` (MPP alone) and ``/dual/v1`` (MPP and x402, route-bound)."""
    with PymppServer() as server:
        yield server


@pytest.fixture(scope="module")
def pympp_auth_server() -> Iterator[PymppServer]:
    """The same with ``requires_auth``: credentials in ``Payment-Authorization``, ``Authorization`` left to the app."""
    with PymppServer(requires_auth=True) as server:
        yield server
