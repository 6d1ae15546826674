"""The sandbox facilitator's direct EIP-3009 digest against eth-account's general EIP-712 encoder.

`recover_signer` computes the ``TransferWithAuthorization`` digest itself (written apart from the client's signer).
Recovering the signer of a *random* 65-byte signature yields an address that depends on every bit of the digest, so
agreeing with eth-account on random signatures means the digests agree; real signatures must recover their signer.
"""

from __future__ import annotations

import dataclasses
import secrets

from eth_account import Account
from eth_account.messages import encode_typed_data
from hypothesis import given, settings
from hypothesis import strategies as st

from llm402.sandbox.config import SandboxConfig
from llm402.sandbox.facilitator import Authorization, recover_signer, typed_data

UINT256_MAX = 2**256 - 1
addresses = st.binary(min_size=20, max_size=20).map(lambda raw: "0x" + raw.hex())
uints = st.one_of(st.integers(0, 2**64), st.integers(0, UINT256_MAX), st.sampled_from([0, 1, UINT256_MAX]))
nonces = st.binary(min_size=32, max_size=32).map(lambda raw: "0x" + raw.hex())
configs = st.builds(
    lambda name, version, chain_id, asset: SandboxConfig(
        db_path=":memory:", asset_name=name, asset_version=version, chain_id=chain_id, asset=asset
    ),
    st.sampled_from(["USDC", "USD Coin", "Tether USD"]) | st.text(max_size=12),
    st.sampled_from(["1", "2"]) | st.text(max_size=4),
    st.sampled_from([1, 8453, 84532]) | st.integers(0, 2**64),
    addresses,
)
authorizations = st.builds(Authorization, addresses, addresses, uints, uints, uints, nonces)


def _reference(config: SandboxConfig, auth: Authorization, signature: str) -> str | None:
    """What the general encoder recovers (the facilitator's previous implementation), lowercase."""
    try:
        signable = encode_typed_data(full_message=typed_data(config, auth))
        return str(Account.recover_message(signable, signature=bytes.fromhex(signature[2:]))).lower()
    except Exception:
        return None


@settings(max_examples=150, deadline=None)
@given(configs, authorizations, st.binary(min_size=64, max_size=64), st.sampled_from([0, 1, 27, 28, 35, 36, 37]))
def test_random_signatures_recover_what_eth_account_recovers(
    config: SandboxConfig, auth: Authorization, rs: bytes, v: int
) -> None:
    signature = "0x" + (rs + bytes((v,))).hex()
    assert recover_signer(config, auth, signature) == _reference(config, auth, signature)


@settings(max_examples=60, deadline=None)
@given(configs, authorizations)
def test_real_signatures_recover_their_signer_and_nothing_else(config: SandboxConfig, auth: Authorization) -> None:
    account = Account.from_key(secrets.token_bytes(32))
    signed = account.sign_message(encode_typed_data(full_message=typed_data(config, auth)))
    signature = "0x" + bytes(signed.signature).hex()
    assert recover_signer(config, auth, signature) == account.address.lower()
    for field, value in (
        ("value", (auth.value + 1) % (UINT256_MAX + 1)),
        ("valid_before", (auth.valid_before + 1) % (UINT256_MAX + 1)),
        ("to", "0x" + bytes(b ^ 1 for b in bytes.fromhex(auth.to[2:])).hex()),
    ):
        assert recover_signer(config, dataclasses.replace(auth, **{field: value}), signature) != account.address.lower()


def test_malformed_signatures_are_none_like_eth_account() -> None:
    config = SandboxConfig(db_path=":memory:")
    auth = Authorization("0x" + "11" * 20, "0x" + "22" * 20, 5, 0, 10**10, "0x" + "33" * 32)
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    good_rs = "11" * 32 + "22" * 32
    cases = [
        "0x",
        "0x" + "11" * 64,  # 64 bytes: no v
        "0x" + good_rs + "1b" + "00",  # 66 bytes
        "0x" + good_rs + "1d",  # v = 29
        "0x" + good_rs + "02",  # v = 2
        "0x" + "00" * 32 + "22" * 32 + "1b",  # r = 0
        "0x" + "11" * 32 + "00" * 32 + "1b",  # s = 0
        "0x" + order.to_bytes(32, "big").hex() + "22" * 32 + "1b",  # r = n
        "0x" + "11" * 32 + order.to_bytes(32, "big").hex() + "1c",  # s = n
        "0x" + "ff" * 64 + "1b",
        "0x" + good_rs + "1",  # odd hex
    ]
    for signature in cases:
        assert recover_signer(config, auth, signature) == _reference(config, auth, signature), signature
    assert recover_signer(config, auth, cases[0]) is None
