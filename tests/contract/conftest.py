"""Contract tests: the documented gateway examples (``cassettes/``) replayed through llm402, with no server and no
network.

- Cassettes are played by pytest-recording (vcrpy) with the matchers and filters of ``contract_support``; replay is
  the default (``--record-mode=none``) and every non-live test here also runs under pytest-recording's socket guard
  (``block_network``), so a request the documents do not answer fails instead of reaching the network.
- Tests marked ``live`` record fresh cassettes against real gateways (``cassettes/live/``); they are skipped unless
  ``LLM402_LIVE=1`` (opt-in, never in CI). See docs/contract-tests.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from contract_support import CASSETTES, MATCHERS, WireLog, vcr_config

from llm402 import Wallet

HERE = Path(__file__).resolve().parent
LIVE_FLAG = "LLM402_LIVE"
_ENV_THAT_CHANGES_BEHAVIOUR = (
    "AISA_API_KEY",
    "LLM402_POLICY",
    "LLM402_PRIVATE_KEY",
    "LLM402_KEYSTORE",
    "LLM402_API_KEY",
    "LLM402_BASE_URL",
    "LLM402_MODEL",
    "LLM402_LEDGER",
)


def pytest_recording_configure(config: pytest.Config, vcr: Any) -> None:
    """Register the contract matchers on every VCR instance pytest-recording makes."""
    for name, matcher in MATCHERS.items():
        vcr.register_matcher(name, matcher)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    live = os.environ.get(LIVE_FLAG) == "1"
    for item in items:
        if HERE not in Path(str(item.path)).parents:
            continue
        if item.get_closest_marker("live") is not None:
            if not live:
                item.add_marker(pytest.mark.skip(reason=f"live recording is opt-in: set {LIVE_FLAG}=1 (never in CI)"))
        else:
            item.add_marker(pytest.mark.block_network)


@pytest.fixture
def record_mode(request: pytest.FixtureRequest) -> str:
    """``--record-mode`` when given; otherwise replay only (``none``), except live tests, which record what their
    cassette lacks (``once``)."""
    chosen: str | None = request.config.getoption("--record-mode")
    if chosen:
        return chosen
    return "once" if request.node.get_closest_marker("live") is not None else "none"


@pytest.fixture(scope="module")
def vcr_cassette_dir() -> str:
    """All contract cassettes live in the repository's top-level ``cassettes/``."""
    return str(CASSETTES)


@pytest.fixture(name="vcr_config")
def _vcr_config() -> dict[str, Any]:
    return vcr_config()


@pytest.fixture(autouse=True)
def _documented_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay tests see only what they set: no key, policy or wallet leaks in from the developer's shell."""
    if request.node.get_closest_marker("live") is None:
        for name in _ENV_THAT_CHANGES_BEHAVIOUR:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def wallet() -> Wallet:
    """A throwaway wallet: every payment and SIWE message of a replay is signed by a fresh key."""
    return Wallet.create()


@pytest.fixture
def wire(vcr: Any) -> Iterator[WireLog]:
    """Every request that reaches an inner ``httpx.HTTPTransport`` / ``AsyncHTTPTransport`` (what a gateway would
    receive), recorded just before vcrpy's stub answers it from the cassette.

    The spies wrap vcrpy's stubs and are removed in this fixture's own teardown, which runs before pytest-recording's
    (this fixture depends on ``vcr``), so the classes get their original methods back in order."""
    assert vcr is not None, "the wire log needs a cassette (mark the test with uses_cassette)"
    log = WireLog()
    sync_stub = httpx.HTTPTransport.handle_request  # vcrpy's stubs while the cassette is in use
    async_stub = httpx.AsyncHTTPTransport.handle_async_request

    def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        log.add(request, request.read())
        return sync_stub(self, request)

    async def handle_async_request(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        log.add(request, await request.aread())
        return await async_stub(self, request)

    httpx.HTTPTransport.handle_request = handle_request  # type: ignore[method-assign]
    httpx.AsyncHTTPTransport.handle_async_request = handle_async_request  # type: ignore[method-assign]
    try:
        yield log
    finally:
        httpx.HTTPTransport.handle_request = sync_stub  # type: ignore[method-assign]
        httpx.AsyncHTTPTransport.handle_async_request = async_stub  # type: ignore[method-assign]
