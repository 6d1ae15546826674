"""Agent identity against real ENS records on the test chain, the identity headers, and sign-in-with-x."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from datetime import UTC, datetime

import pytest
from onchain_support import Chain
from siwe import SiweMessage
from x402.extensions.sign_in_with_x import format_siwe_message, parse_siwx_header, validate_siwx_message

from llm402 import Gateway, Wallet
from llm402.errors import ConfigurationError
from llm402.identity import (
    AGENT_HEADER,
    INTENT_HEADER,
    SIWX_HEADER,
    Identity,
    IdentityError,
    gateway_identity,
    identity_headers,
    siwx_headers,
    verify_ens_name,
)

_names = iter(range(10_000))


def fresh_name() -> str:
    return f"agent{next(_names)}.krump.eth"


def test_a_name_that_resolves_to_the_wallet_is_verified(chain: Chain, wallet: Wallet) -> None:
    name = fresh_name()
    chain.register(name, wallet.address)
    identity = Identity.resolve(wallet, name, web3=chain.w3)
    assert identity == Identity(wallet.address, name, verified=True)
    assert identity.budget_key == name
    assert Identity.resolve(wallet.address.lower(), name.upper(), web3=chain.w3.ens).ens_name == name, (
        "addresses are checksummed and names normalized"
    )


def test_a_name_that_resolves_elsewhere_is_refused(chain: Chain, wallet: Wallet) -> None:
    name = fresh_name()
    other = Wallet.create().address
    chain.register(name, other)
    with pytest.raises(IdentityError, match=f"resolves to {other}, not to the signing wallet {wallet.address}"):
        Identity.resolve(wallet, name, web3=chain.w3)
    with pytest.raises(IdentityError):
        gateway_identity(name, wallet, web3=chain.w3)
    assert issubclass(IdentityError, ConfigurationError)


def test_a_name_without_an_address_record_is_refused(chain: Chain, wallet: Wallet) -> None:
    with pytest.raises(IdentityError, match="has no address record"):
        Identity.resolve(wallet, fresh_name(), web3=chain.w3)


def test_the_reverse_record_must_name_it_too(chain: Chain, wallet: Wallet) -> None:
    name = fresh_name()
    chain.register(name, wallet.address, reverse=False)
    with pytest.raises(IdentityError, match=r"reverse record .* is not set"):
        Identity.resolve(wallet, name, web3=chain.w3)
    assert Identity.resolve(wallet, name, web3=chain.w3, require_reverse=False).verified
    primary = fresh_name()
    chain.register(primary, wallet.address)
    with pytest.raises(IdentityError, match=f"names {primary}, not {name}"):
        verify_ens_name(chain.w3.ens, name, wallet.address)
    assert verify_ens_name(chain.w3.ens, primary, wallet.address) == primary


def test_without_a_chain_a_name_is_kept_but_not_trusted(wallet: Wallet) -> None:
    identity = Identity.resolve(wallet, "Judge.Krump.eth", environ={})
    assert identity == Identity(wallet.address, "judge.krump.eth", verified=False)
    assert identity.budget_key == wallet.address
    assert Identity.resolve(wallet, environ={}).budget_key == wallet.address
    with pytest.raises(IdentityError, match="only be verified with an ENS name"):
        Identity(wallet.address, verified=True)
    with pytest.raises(IdentityError, match="not an Ethereum address"):
        Identity("0x1234")


def test_an_unreachable_rpc_fails_closed_without_leaking_its_url(wallet: Wallet) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ = {"LLM402_ETH_RPC": f"http://127.0.0.1:{port}/v3/secret-api-key"}
    with pytest.raises(IdentityError) as refused:
        Identity.resolve(wallet, "judge.krump.eth", environ=environ)
    assert "secret-api-key" not in str(refused.value) and "RPC failed" in str(refused.value)
    with pytest.raises(IdentityError):
        gateway_identity("judge.krump.eth", wallet, environ=environ)
    assert gateway_identity("judge", wallet, environ=environ) == ("judge", None), "an agent id is not a name"
    with pytest.raises(IdentityError, match="http"):
        Identity.resolve(wallet, "judge.krump.eth", environ={"LLM402_ETH_RPC": "ws://127.0.0.1:1"})


def test_gateway_identity_keys_budgets(chain: Chain, wallet: Wallet) -> None:
    assert gateway_identity(None, wallet, environ={}) == (wallet.address, Identity(wallet.address))
    assert gateway_identity(None, None, environ={}) == ("default", None)
    assert gateway_identity("judge", wallet, environ={}) == ("judge", None)
    assert gateway_identity("judge.krump.eth", wallet, environ={}) == ("judge.krump.eth", None), "no chain: a label"
    stranger = Identity(Wallet.create().address)
    with pytest.raises(IdentityError, match="wallet signs as"):
        gateway_identity(stranger, wallet)
    with pytest.raises(IdentityError, match="wallet signs as"):
        Gateway("http://127.0.0.1:9/v1", wallet=wallet, agent=stranger, ledger="memory://")
    name = fresh_name()
    chain.register(name, wallet.address)
    key, identity = gateway_identity(name, wallet, web3=chain.w3)
    assert key == name and identity is not None and identity.verified


def test_identity_headers(wallet: Wallet) -> None:
    verified = Identity(wallet.address, "judge.krump.eth", verified=True)
    assert identity_headers(verified, "judging") == {AGENT_HEADER: "judge.krump.eth", INTENT_HEADER: "judging"}
    assert identity_headers(Identity(wallet.address, "judge.krump.eth"), None) == {AGENT_HEADER: wallet.address}
    assert identity_headers("judge", "") == {AGENT_HEADER: "judge"}
    assert identity_headers(None, None) == {}
    encoded = identity_headers("jüdge.eth", "judge\r\nx-evil: 1")
    assert encoded == {AGENT_HEADER: "j%C3%BCdge.eth", INTENT_HEADER: "judge%0D%0Ax-evil: 1"}
    assert all(v.isascii() and "\n" not in v for v in encoded.values())


# --- sign-in-with-x -----------------------------------------------------------------------------------------------


def challenge(origin: str = "http://127.0.0.1:8402", **info: object) -> dict[str, object]:
    """The sign-in-with-x extension as an x402 resource server puts it in its 402 (after enrichment)."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {
        SIWX_HEADER: {
            "info": {
                "domain": origin.split("://", 1)[1],
                "uri": f"{origin}/v1/chat/completions",
                "version": "1",
                "nonce": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
                "issuedAt": now,
                "statement": "Sign in to the gateway",
                "resources": [f"{origin}/v1/chat/completions"],
                **info,
            },
            "supportedChains": [
                {"chainId": "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", "type": "ed25519"},
                {"chainId": "eip155:8453", "type": "eip191"},
                {"chainId": "eip155:84532", "type": "eip191"},
            ],
            "schema": {},
        }
    }


def test_siwx_header_is_what_an_x402_server_verifies(wallet: Wallet) -> None:
    origin = "http://127.0.0.1:8402"
    headers = siwx_headers(challenge(origin), wallet, f"{origin}/v1/chat/completions", network="eip155:84532")
    payload = parse_siwx_header(headers[SIWX_HEADER])  # the SDK's server-side parser
    assert payload.address == wallet.address and payload.chain_id == "eip155:84532"
    assert asyncio.run(validate_siwx_message(payload, origin)).is_valid
    # The server rebuilds the message from the payload (the SDK's formatter) and checks the signature. (The SDK's
    # own verify_siwx_signature calls the newer `signinwithethereum` API; llm402 pins `siwe` 4, so verify with it.)
    rebuilt = SiweMessage.from_message(format_siwe_message(payload, payload.address))
    rebuilt.verify(payload.signature)
    assert rebuilt.address == wallet.address and rebuilt.chain_id == 84532
    first_chain = parse_siwx_header(siwx_headers(challenge(origin), wallet, f"{origin}/v1/x")[SIWX_HEADER])
    assert first_chain.chain_id == "eip155:8453", "without a preference, the first EVM chain offered"
    assert json.loads(base64.b64decode(headers[SIWX_HEADER]))["signature"].startswith("0x")


def test_siwx_refuses_another_origin_and_ignores_what_it_cannot_answer(wallet: Wallet) -> None:
    with pytest.raises(IdentityError, match=r"challenge is for evil\.example"):
        siwx_headers(challenge("https://evil.example"), wallet, "http://127.0.0.1:8402/v1/chat/completions")
    assert siwx_headers(None, wallet, "http://127.0.0.1:8402/") == {}
    assert siwx_headers({"bazaar": {}}, wallet, "http://127.0.0.1:8402/") == {}
    solana_only = challenge()
    solana_only[SIWX_HEADER]["supportedChains"] = [{"chainId": "solana:x", "type": "ed25519"}]  # type: ignore[index]
    assert siwx_headers(solana_only, wallet, "http://127.0.0.1:8402/v1/chat/completions") == {}
    with pytest.raises(IdentityError, match="no nonce"):
        siwx_headers(challenge(nonce=""), wallet, "http://127.0.0.1:8402/v1/chat/completions")
    with pytest.raises(IdentityError, match="malformed"):
        siwx_headers({SIWX_HEADER: {"info": "x"}}, wallet, "http://127.0.0.1:8402/")
