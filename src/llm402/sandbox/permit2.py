"""The sandbox facilitator's side of x402 ``upto`` on EVM: a Permit2 ``PermitWitnessTransferFrom`` for a ceiling.

The payer signs (EIP-712, domain ``{name: "Permit2", chainId, verifyingContract: Permit2}``) a transfer of at most
``permitted.amount`` of ``permitted.token`` through the upto proxy (the ``spender``), with a witness binding the
recipient (``to``), the facilitator allowed to settle it and ``validAfter``. Verification checks every field against
the offer and recovers the signer; settlement moves the metered amount (at most the ceiling; zero allowed) and burns
the Permit2 nonce in the same transaction, so an authorization settles at most once.

Simplification: the sandbox's test USDC treats every holder as having approved Permit2 (the one-time on-chain
``approve`` a real wallet needs), so no allowance is checked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .config import SandboxConfig
from .wire import VALIDITY_SLACK_SECONDS, Refusal, address, uint256

PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
"""The canonical Permit2 contract (the same address on every EVM chain)."""
UPTO_PROXY = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
"""x402's upto Permit2 proxy, the only ``spender`` an upto authorization may name."""


@dataclass(frozen=True, slots=True)
class UptoPayment:
    """A decoded x402 v2 upto payload."""

    scheme: str | None
    network: str | None
    asset: str | None
    payer: str
    token: str
    ceiling: int
    spender: str
    nonce: int
    deadline: int
    to: str
    facilitator: str
    valid_after: int
    signature: str

    @property
    def nonce_key(self) -> str:
        """The nonce as the sandbox ledger stores it (Permit2 nonces live apart from EIP-3009 ones)."""
        return f"permit2:{self.nonce}"


def is_upto(data: Any) -> bool:
    """Whether a decoded payment envelope carries a Permit2 upto authorization."""
    inner = data.get("payload") if isinstance(data, dict) else None
    return isinstance(inner, dict) and "permit2Authorization" in inner


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"missing {name} object")
    return value


def parse_upto(data: dict[str, Any]) -> UptoPayment:
    """A decoded v2 envelope -> `UptoPayment`. Raises `Refusal` (``malformed_payment``)."""
    try:
        if data.get("x402Version") != 2:
            raise ValueError("upto takes an x402 v2 payload")
        inner = _object(data.get("payload"), "payload")
        accepted = _object(data.get("accepted"), "accepted")
        auth = _object(inner.get("permit2Authorization"), "payload.permit2Authorization")
        permitted = _object(auth.get("permitted"), "permit2Authorization.permitted")
        witness = _object(auth.get("witness"), "permit2Authorization.witness")
        signature = inner.get("signature")
        if not isinstance(signature, str) or not signature.startswith("0x"):
            raise ValueError("missing or non-hex payload.signature")
        bytes.fromhex(signature[2:])
        fields = (accepted.get("scheme"), accepted.get("network"), accepted.get("asset"))
        if not all(f is None or isinstance(f, str) for f in fields):
            raise ValueError("accepted.scheme, network and asset must be strings")
        return UptoPayment(
            scheme=accepted.get("scheme"),
            network=accepted.get("network"),
            asset=accepted.get("asset"),
            payer=address(auth.get("from"), "permit2Authorization.from"),
            token=address(permitted.get("token"), "permitted.token"),
            ceiling=uint256(permitted.get("amount"), "permitted.amount"),
            spender=address(auth.get("spender"), "permit2Authorization.spender"),
            nonce=uint256(auth.get("nonce"), "permit2Authorization.nonce"),
            deadline=uint256(auth.get("deadline"), "permit2Authorization.deadline"),
            to=address(witness.get("to"), "witness.to"),
            facilitator=address(witness.get("facilitator"), "witness.facilitator"),
            valid_after=uint256(witness.get("validAfter"), "witness.validAfter"),
            signature=signature,
        )
    except ValueError as exc:
        raise Refusal("malformed_payment", str(exc)) from None


def typed_data(chain_id: int, payment: UptoPayment) -> dict[str, Any]:
    """The EIP-712 document an upto payer signs."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "PermitWitnessTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
                {"name": "witness", "type": "Witness"},
            ],
            "TokenPermissions": [{"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}],
            "Witness": [
                {"name": "to", "type": "address"},
                {"name": "facilitator", "type": "address"},
                {"name": "validAfter", "type": "uint256"},
            ],
        },
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": chain_id, "verifyingContract": PERMIT2},
        "message": {
            "permitted": {"token": payment.token, "amount": payment.ceiling},
            "spender": payment.spender,
            "nonce": payment.nonce,
            "deadline": payment.deadline,
            "witness": {"to": payment.to, "facilitator": payment.facilitator, "validAfter": payment.valid_after},
        },
    }


def recover_upto_signer(chain_id: int, payment: UptoPayment) -> str | None:
    """The address that signed the authorization (None when the signature does not parse)."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    try:
        signable = encode_typed_data(full_message=typed_data(chain_id, payment))
        recovered: str = Account.recover_message(signable, signature=bytes.fromhex(payment.signature[2:]))
    except Exception:  # a malformed signature (length, v, r/s off the curve) is simply not valid
        return None
    return recovered


def check_upto(config: SandboxConfig, payment: UptoPayment, ceiling: int, now: int | None = None) -> None:
    """Raise `Refusal` unless ``payment`` authorizes exactly ``ceiling`` to the payee through the upto proxy,
    bound to this facilitator, valid now and signed by its payer. Nonce and balance are the caller's to check."""
    now = int(time.time()) if now is None else now

    def same(a: str, b: str) -> bool:
        return a.lower() == b.lower()

    if payment.scheme != "upto":
        raise Refusal("scheme_mismatch", f"scheme {str(payment.scheme)[:40]!r} is not 'upto'")
    if payment.network != config.network:
        raise Refusal("network_mismatch", f"network {str(payment.network)[:40]!r} is not {config.network!r}")
    if not same(payment.token, config.asset) or (payment.asset is not None and not same(payment.asset, config.asset)):
        raise Refusal("asset_mismatch", f"token {payment.token} is not {config.asset}")
    if not same(payment.spender, UPTO_PROXY):
        raise Refusal("invalid_spender", f"spender {payment.spender} is not the upto proxy {UPTO_PROXY}")
    if not same(payment.to, config.payee):
        raise Refusal("recipient_mismatch", f"witness.to {payment.to} is not the payee {config.payee}")
    if not same(payment.facilitator, config.facilitator_address):
        raise Refusal("facilitator_mismatch", f"witness.facilitator {payment.facilitator} is not this facilitator")
    if payment.ceiling < ceiling:
        raise Refusal("underpaid", f"ceiling {payment.ceiling} is below the offer's {ceiling}")
    if payment.ceiling != ceiling:
        raise Refusal("amount_mismatch", f"ceiling {payment.ceiling} is not the offer's {ceiling}")
    if now < payment.valid_after:
        raise Refusal("not_yet_valid", f"validAfter {payment.valid_after} is in the future (now {now})")
    if now >= payment.deadline:
        raise Refusal("expired", f"deadline {payment.deadline} has passed (now {now})")
    if payment.deadline > now + config.max_timeout_seconds + VALIDITY_SLACK_SECONDS:
        raise Refusal(
            "validity_too_long",
            f"deadline {payment.deadline} is more than maxTimeoutSeconds={config.max_timeout_seconds} away",
        )
    signer = recover_upto_signer(config.chain_id, payment)
    if signer is None or not same(signer, payment.payer):
        raise Refusal("invalid_signature", "the signature does not recover to permit2Authorization.from")
