"""An in-memory chain for the official x402 SDK's facilitator: the SDK's ``FacilitatorEvmSigner`` protocol over a
dict of balances, used EIP-3009 and Permit2 nonces, and fake transaction hashes.

It is the chain, not a verifier: it never checks a signature. Every signature check is the SDK's own code (its EOA
path recovers the signer from the EIP-712 digest, after `get_code` says the payer has no code); `verify_typed_data`
raises, so an SDK path that leaned on the chain to verify would fail loudly. What a token contract enforces on its
own (a used nonce, the validity window, the balance, the Permit2 allowance) is enforced here, with revert messages
worded like the real contracts' so the SDK maps them to its reasons.

Transfers to a payee in ``unconfirmed_payees`` move the money but their receipts never come: the SDK's receipt wait
times out, which is how the reference answers ``settlement_pending``.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from eth_utils import keccak, to_checksum_address
from x402.mechanisms.evm.constants import (
    MULTICALL3_ADDRESS,
    PERMIT2_ADDRESS,
    TX_STATUS_SUCCESS,
    X402_UPTO_PERMIT2_PROXY_ADDRESS,
)
from x402.mechanisms.evm.default_assets import get_default_asset
from x402.mechanisms.evm.types import TransactionReceipt

NETWORK = "eip155:84532"  # Base Sepolia: a chain llm402's default policy and the SDK's asset table both know
CHAIN_ID = 84532
USDC = get_default_asset(NETWORK)["asset"]
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
MAX_UINT256 = 2**256 - 1
CONTRACT_CODE = bytes.fromhex("6080604052")


class Revert(Exception):
    """A contract revert (the SDK recognises reverts by the word "revert" in the message)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"execution reverted: {reason}")


def _low(address: str) -> str:
    return address.lower()


def _word(value: int) -> str:
    return "0x" + value.to_bytes(32, "big").hex()


def _topic(address: str) -> str:
    return "0x" + bytes.fromhex(address[2:].rjust(64, "0")).hex()


@dataclass
class Settlement:
    """One transfer the chain executed (confirmed or not)."""

    scheme: str
    payer: str
    payee: str
    amount: int
    transaction: str
    confirmed: bool


@dataclass
class FakeChain:
    """The SDK facilitator's view of one chain: one token (the SDK's Base Sepolia USDC), Permit2 and the upto proxy."""

    facilitator: str = field(default_factory=lambda: to_checksum_address("0x" + "fa" * 20))
    balances: dict[str, int] = field(default_factory=dict)
    permit2_approved: set[str] = field(default_factory=set)
    unconfirmed_payees: set[str] = field(default_factory=set)
    settlements: list[Settlement] = field(default_factory=list)
    _eip3009_used: set[tuple[str, str]] = field(default_factory=set)
    _permit2_used: set[tuple[str, int]] = field(default_factory=set)
    _receipts: dict[str, TransactionReceipt | None] = field(default_factory=dict)
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- test helpers -----------------------------------------------------------------------------------------
    def fund(self, address: str, amount: int, *, approve_permit2: bool = True) -> None:
        """Mint test USDC to ``address`` (and give Permit2 the one-time approval upto needs)."""
        with self._lock:
            self.balances[_low(address)] = self.balances.get(_low(address), 0) + amount
            if approve_permit2:
                self.permit2_approved.add(_low(address))

    def balance(self, address: str) -> int:
        with self._lock:
            return self.balances.get(_low(address), 0)

    def settled_by(self, payer: str) -> list[Settlement]:
        with self._lock:
            return [s for s in self.settlements if _low(s.payer) == _low(payer)]

    # --- FacilitatorEvmSigner ---------------------------------------------------------------------------------
    def get_addresses(self) -> list[str]:
        return [self.facilitator]

    def get_chain_id(self) -> int:
        return CHAIN_ID

    def get_code(self, address: str) -> bytes:
        contracts = {_low(USDC), _low(PERMIT2_ADDRESS), _low(X402_UPTO_PERMIT2_PROXY_ADDRESS), _low(MULTICALL3_ADDRESS)}
        return CONTRACT_CODE if _low(address) in contracts else b""

    def get_balance(self, address: str, token_address: str) -> int:
        return self.balance(address) if _low(token_address) == _low(USDC) else 0

    def verify_typed_data(self, *args: Any, **kwargs: Any) -> bool:
        raise AssertionError("the fake chain verifies no signature: that is the SDK's job")

    def send_transaction(self, to: str, data: bytes) -> str:
        raise Revert("the fake chain deploys no smart wallet")

    def read_contract(self, address: str, abi: list[dict[str, Any]], function_name: str, *args: Any) -> Any:
        """An ``eth_call``: a view, or a simulation that raises what the transaction would revert with."""
        with self._lock:
            if _low(address) == _low(USDC):
                if function_name == "balanceOf":
                    return self.balances.get(_low(args[0]), 0)
                if function_name == "allowance":
                    owner, spender = args
                    approved = _low(owner) in self.permit2_approved and _low(spender) == _low(PERMIT2_ADDRESS)
                    return MAX_UINT256 if approved else 0
                if function_name == "name":
                    return "USDC"
                if function_name == "version":
                    return "2"
                if function_name == "authorizationState":
                    return (_low(args[0]), _nonce_hex(args[1])) in self._eip3009_used
                if function_name == "transferWithAuthorization":
                    self._check_eip3009(*args[:6])
                    return None
            if _low(address) == _low(X402_UPTO_PERMIT2_PROXY_ADDRESS) and function_name == "settle":
                self._check_permit2(*args[:4])
                return None
        raise Revert(f"the fake chain has no {function_name} at {address}")

    def write_contract(
        self, address: str, abi: list[dict[str, Any]], function_name: str, *args: Any, data_suffix: str | None = None
    ) -> str:
        """A transaction: applied at once; its receipt is kept (or withheld, for an unconfirmed payee)."""
        with self._lock:
            if _low(address) == _low(USDC) and function_name == "transferWithAuthorization":
                payer, payee, value, _after, _before, nonce = args[:6]
                self._check_eip3009(payer, payee, value, _after, _before, nonce)
                self._eip3009_used.add((_low(payer), _nonce_hex(nonce)))
                return self._transfer("exact", payer, payee, int(value))
            if _low(address) == _low(X402_UPTO_PERMIT2_PROXY_ADDRESS) and function_name == "settle":
                permit, amount, owner, witness = args[:4]
                self._check_permit2(permit, amount, owner, witness)
                self._permit2_used.add((_low(owner), int(permit[1])))
                return self._transfer("upto", owner, witness[0], int(amount))
        raise Revert(f"the fake chain has no {function_name} at {address}")

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        with self._lock:
            if tx_hash not in self._receipts:
                raise TimeoutError(f"transaction {tx_hash} not found")
            receipt = self._receipts[tx_hash]
        if receipt is None:
            raise TimeoutError(f"timed out while waiting for transaction {tx_hash} to be confirmed")
        return receipt

    # --- the token's and Permit2's own rules ------------------------------------------------------------------
    def _check_eip3009(
        self, payer: str, payee: str, value: int, valid_after: int, valid_before: int, nonce: Any
    ) -> None:
        now = int(time.time())
        if now <= int(valid_after):
            raise Revert("FiatTokenV2: authorization is not yet valid")
        if now >= int(valid_before):
            raise Revert("FiatTokenV2: authorization is expired")
        if (_low(payer), _nonce_hex(nonce)) in self._eip3009_used:
            raise Revert("FiatTokenV2: authorization is used or canceled")
        if self.balances.get(_low(payer), 0) < int(value):
            raise Revert("ERC20: transfer amount exceeds balance")

    def _check_permit2(self, permit: Any, amount: Any, owner: str, witness: Any) -> None:
        (_token, permitted), nonce, deadline = permit
        _to, facilitator, valid_after = witness
        now = int(time.time())
        if now > int(deadline):
            raise Revert("SignatureExpired")
        if now < int(valid_after):
            raise Revert("PaymentTooEarly")
        if _low(facilitator) not in {_low(a) for a in self.get_addresses()}:
            raise Revert("UnauthorizedFacilitator")
        if int(amount) > int(permitted):
            raise Revert("AmountExceedsPermitted")
        if (_low(owner), int(nonce)) in self._permit2_used:
            raise Revert("InvalidNonce")
        if _low(owner) not in self.permit2_approved:
            raise Revert("TRANSFER_FROM_FAILED (no Permit2 allowance)")
        if self.balances.get(_low(owner), 0) < int(amount):
            raise Revert("ERC20: transfer amount exceeds balance")

    def _transfer(self, scheme: str, payer: str, payee: str, amount: int) -> str:
        self.balances[_low(payer)] = self.balances.get(_low(payer), 0) - amount
        self.balances[_low(payee)] = self.balances.get(_low(payee), 0) + amount
        tx_hash = "0x" + keccak(text=f"fake-tx-{next(self._counter)}").hex()
        confirmed = _low(payee) not in self.unconfirmed_payees
        log = {
            "address": USDC,
            "topics": [TRANSFER_TOPIC, _topic(payer), _topic(payee)],
            "data": _word(amount),
        }
        self._receipts[tx_hash] = (
            TransactionReceipt(status=TX_STATUS_SUCCESS, block_number=next(self._counter), tx_hash=tx_hash, logs=[log])
            if confirmed
            else None
        )
        self.settlements.append(Settlement(scheme, payer, payee, amount, tx_hash, confirmed))
        return tx_hash


def _nonce_hex(nonce: Any) -> str:
    if isinstance(nonce, bytes | bytearray):
        return "0x" + bytes(nonce).hex()
    return str(nonce).lower()
