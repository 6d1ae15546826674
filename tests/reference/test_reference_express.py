"""llm402 against the TypeScript x402 reference (2.27.0, from the npm registry).

- As a server: ``@x402/express``'s payment middleware with ``@x402/core``'s in-process facilitator and ``@x402/evm``'s
  exact and upto schemes over a fake chain, in a Node child process (tests/reference/node/server.mjs). Every
  signature is verified by the library's code.
- As a client: ``@x402/fetch`` (tests/reference/node/client.mjs) paying llm402's own sandbox, so the sandbox is
  checked against the reference wire format in x402 v2 (exact, upto) and v1.

The session fixture installs the pinned packages (``npm ci`` from the committed lock file) when node_modules is
missing; without Node.js 20+ and npm the tests FAIL, they never skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import reference_support as scenarios
from eth_account import Account
from reference_support import NODE_DIR, NodePeer, install_node_modules, require_tool

from llm402.sandbox import SandboxServer

# The first test that needs Node also waits for `npm ci` (about 10 s here, more on a slow registry mirror or a busy
# machine): more room than the suite's default 120 s per test.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def node_modules() -> None:
    install_node_modules()


@pytest.fixture(scope="session")
def express_peer(node_modules: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodePeer]:
    peer = NodePeer(tmp_path_factory.mktemp("express") / "server.log")
    try:
        yield peer
    finally:
        peer.stop()


def test_exact_pays_once_and_the_receipt_counts_what_the_peer_settled(express_peer: NodePeer) -> None:
    scenarios.exact_pays_once_and_counts_what_settled(express_peer)


def test_a_replayed_authorization_is_refused_by_the_peer(express_peer: NodePeer) -> None:
    scenarios.replayed_authorization_is_refused(express_peer)


def test_a_forged_signature_is_refused_by_the_library_verifier(express_peer: NodePeer) -> None:
    scenarios.forged_signature_is_refused(express_peer)


def test_upto_settles_the_override_and_the_receipt_counts_it(express_peer: NodePeer) -> None:
    scenarios.upto_settles_the_override(express_peer)


def test_an_upto_settlement_of_zero_is_a_success_that_counts_nothing(express_peer: NodePeer) -> None:
    scenarios.upto_zero_settlement_counts_nothing(express_peer)


def test_settlement_pending_is_counted_as_spent_and_named_in_the_error(express_peer: NodePeer) -> None:
    scenarios.settlement_pending_counts_the_payment(express_peer)


def test_sign_in_with_x_signs_at_most_one_authorization_over_three_calls(express_peer: NodePeer) -> None:
    scenarios.sign_in_with_x_pays_at_most_once(express_peer)


# --- @x402/fetch (the reference client) against llm402's sandbox ------------------------------------------------------


def reference_client(url: str, scheme: str, key: str) -> dict[str, Any]:
    """One paid chat completion by ``node client.mjs``; its JSON report."""
    node = require_tool("node")
    result = subprocess.run(
        [node, "client.mjs", url, scheme, "sandbox/small"],
        cwd=NODE_DIR,
        env={**os.environ, "X402_CLIENT_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"@x402/fetch failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.parametrize(("prefix", "scheme"), [("/v1", "exact"), ("/upto/v1", "upto"), ("/x402v1/v1", "exact-v1")])
def test_the_reference_client_pays_the_sandbox(
    node_modules: None, sandbox: SandboxServer, prefix: str, scheme: str
) -> None:
    account = Account.create()
    httpx.post(
        f"{sandbox.url}/sandbox/faucet", json={"address": account.address, "amount": scenarios.FUNDS}
    ).raise_for_status()
    report = reference_client(f"{sandbox.url}{prefix}/chat/completions", scheme, "0x" + account.key.hex())

    assert report["status"] == 200, report
    assert report["body"]["choices"][0]["message"]["content"] and report["body"]["usage"]["completion_tokens"] > 0
    assert report["paymentHeaders"] == 1, "the reference client paid once, on the replay"
    settlement = report["paymentResponse"]
    assert settlement is not None and settlement["success"] is True and settlement["payer"] == account.address
    [settled] = httpx.get(f"{sandbox.url}/sandbox/settlements", params={"payer": account.address}).json()
    assert settlement["transaction"] == settled["transaction"]
    spent = scenarios.FUNDS - int(httpx.get(f"{sandbox.url}/sandbox/balance/{account.address}").json()["balance"])
    assert spent == settled["amount"] > 0
    if scheme != "exact-v1":  # x402 v1 reports no amount
        assert int(settlement["amount"]) == spent
    stats = httpx.get(f"{sandbox.url}/sandbox/stats", params={"payer": account.address}).json()
    assert stats["signatures_seen"] == 1 and stats["refused"] == {}
