"""llm402 against the official Python x402 SDK: its Starlette payment middleware and its own facilitator (exact and
upto over EIP-3009 and Permit2), in-process over a fake chain. Every signature is verified by the SDK's code.

Each test drives an unchanged ``openai.OpenAI`` on ``Gateway(...).http_client()``; the peer's chain is the
independent side of every money check (what settled, what the payer still holds, what signatures arrived).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import reference_support as scenarios
from python_peer import PythonPeer


@pytest.fixture(scope="module")
def peer() -> Iterator[PythonPeer]:
    server = PythonPeer().start()
    try:
        yield server
    finally:
        server.stop()


def test_exact_pays_once_and_the_receipt_counts_what_the_peer_settled(peer: PythonPeer) -> None:
    scenarios.exact_pays_once_and_counts_what_settled(peer)


def test_a_replayed_authorization_is_refused_by_the_peer(peer: PythonPeer) -> None:
    scenarios.replayed_authorization_is_refused(peer)


def test_a_forged_signature_is_refused_by_the_sdk_verifier(peer: PythonPeer) -> None:
    scenarios.forged_signature_is_refused(peer)


def test_upto_settles_the_override_and_the_receipt_counts_it(peer: PythonPeer) -> None:
    scenarios.upto_settles_the_override(peer)


def test_an_upto_settlement_of_zero_is_a_success_that_counts_nothing(peer: PythonPeer) -> None:
    scenarios.upto_zero_settlement_counts_nothing(peer)


def test_settlement_pending_is_counted_as_spent_and_named_in_the_error(peer: PythonPeer) -> None:
    scenarios.settlement_pending_counts_the_payment(peer)


def test_sign_in_with_x_signs_at_most_one_authorization_over_three_calls(peer: PythonPeer) -> None:
    scenarios.sign_in_with_x_pays_at_most_once(peer)
