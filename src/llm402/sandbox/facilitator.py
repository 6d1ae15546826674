"""An in-process x402 facilitator for the ``exact`` EVM scheme with EIP-3009 ``transferWithAuthorization``, and
for ``upto`` with a Permit2 ceiling (the Permit2 checks live in `llm402.sandbox.permit2`).

It really verifies: the EIP-712 ``TransferWithAuthorization`` signature is recovered (eth-account; coincurve makes it
fast) under the asset's domain ``{name, version, chainId, verifyingContract: asset}`` and compared with ``from``; the
scheme, network, asset, payee, amount, validity window, nonce and the payer's test-USDC balance are checked, each
with its own refusal reason. Settlement moves test USDC in the sandbox's own ledger atomically with burning the nonce.

Out of scope: exact payments by Permit2 (``extra.assetTransferMethod: "permit2"``, USDT) and smart-wallet signatures
(EIP-1271/6492): such payments are refused (``malformed_payment`` / ``invalid_signature``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from .config import Dialect, SandboxConfig
from .permit2 import UptoPayment, check_upto, is_upto, parse_upto
from .store import Settled, SettleError, Store
from .wire import VALIDITY_SLACK_SECONDS, Refusal, address, uint256

_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_HEX = re.compile(r"^0x[0-9a-fA-F]+$")


@dataclass(frozen=True, slots=True)
class Authorization:
    """The EIP-3009 ``TransferWithAuthorization`` message."""

    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str


@dataclass(frozen=True, slots=True)
class Payment:
    """A decoded payment header (x402 v2 or v1 envelope)."""

    version: int
    scheme: str | None
    network: str | None
    asset: str | None
    authorization: Authorization
    signature: str

    @property
    def payer(self) -> str:
        """The ``from`` address."""
        return self.authorization.from_


def _decode_b64_json(value: str) -> Any:
    raw = value.strip()
    try:
        data = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        try:
            data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            raise ValueError("the payment header is not base64") from None
    try:
        return json.loads(data)
    except ValueError:
        raise ValueError("the payment header does not hold JSON") from None


def decode_payment(header: str) -> Payment:
    """Decode a ``PAYMENT-SIGNATURE`` / ``X-PAYMENT`` value. Raises `Refusal` (``malformed_payment``)."""
    try:
        data = _decode_b64_json(header)
        if not isinstance(data, dict):
            raise ValueError("the payment payload is not a JSON object")
        version = data.get("x402Version")
        if version not in (1, 2) or isinstance(version, bool):
            raise ValueError(f"unsupported x402Version {str(version)[:20]!r}")
        inner = data.get("payload")
        if not isinstance(inner, dict):
            raise ValueError("missing payload object")
        auth = inner.get("authorization")
        if not isinstance(auth, dict):
            raise ValueError("missing payload.authorization (only EIP-3009 is supported; Permit2 is out of scope)")
        signature = inner.get("signature")
        if not isinstance(signature, str) or not _HEX.match(signature):
            raise ValueError("missing or non-hex payload.signature")
        nonce = auth.get("nonce")
        if not isinstance(nonce, str) or not _BYTES32.match(nonce):
            raise ValueError("authorization.nonce is not a bytes32 hex string")
        authorization = Authorization(
            from_=address(auth.get("from"), "authorization.from"),
            to=address(auth.get("to"), "authorization.to"),
            value=uint256(auth.get("value"), "authorization.value"),
            valid_after=uint256(auth.get("validAfter"), "authorization.validAfter"),
            valid_before=uint256(auth.get("validBefore"), "authorization.validBefore"),
            nonce=nonce,
        )
        if version == 2:
            accepted = data.get("accepted")
            if not isinstance(accepted, dict):
                raise ValueError("an x402 v2 payload needs 'accepted'")
            scheme, network, asset = accepted.get("scheme"), accepted.get("network"), accepted.get("asset")
        else:
            scheme, network, asset = data.get("scheme"), data.get("network"), None
        for name, field in (("scheme", scheme), ("network", network), ("asset", asset)):
            if field is not None and not isinstance(field, str):
                raise ValueError(f"{name} is not a string")
    except ValueError as exc:
        raise Refusal("malformed_payment", str(exc)) from None
    return Payment(int(version), scheme, network, asset, authorization, signature)


def decode_upto(header: str) -> UptoPayment | None:
    """The upto (Permit2) payment in a header, or None when the header holds another kind of payment.

    Raises `Refusal` (``malformed_payment``) for an upto payload that does not parse."""
    try:
        data = _decode_b64_json(header)
    except ValueError:
        return None
    return parse_upto(data) if is_upto(data) else None


def peek_payer_nonce(header: str) -> tuple[str | None, str | None]:
    """Best effort ``(from, nonce)`` of a payment header, for bookkeeping of payments that are not processed."""
    try:
        upto = decode_upto(header)
        if upto is not None:
            return upto.payer, upto.nonce_key
        payment = decode_payment(header)
    except Refusal:
        return None, None
    return payment.payer, payment.authorization.nonce


def typed_data(config: SandboxConfig, auth: Authorization) -> dict[str, Any]:
    """The EIP-712 document a payer signs for ``auth`` under the sandbox asset's domain."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": config.asset_name,
            "version": config.asset_version,
            "chainId": config.chain_id,
            "verifyingContract": config.asset,
        },
        "message": {
            "from": auth.from_,
            "to": auth.to,
            "value": auth.value,
            "validAfter": auth.valid_after,
            "validBefore": auth.valid_before,
            "nonce": bytes.fromhex(auth.nonce[2:]),
        },
    }


def recover_signer(config: SandboxConfig, auth: Authorization, signature: str) -> str | None:
    """The address (lowercase hex) that signed ``auth``; None when the signature does not parse or recover.

    The EIP-712 digest of ``TransferWithAuthorization`` is computed here directly, not through a general typed-data
    encoder (~1 ms a payment), and written apart from the client's signer on purpose: a digest bug on one side cannot
    pass its own check. It is the digest of eth-account's ``encode_typed_data(full_message=typed_data(...))``
    (``tests/unit/test_sandbox_digest.py`` compares them on random inputs). Signatures are read as eth-account reads
    them: 65 bytes ``r || s || v``, ``v`` in {0, 1, 27, 28} or EIP-155 style (>= 35), ``r`` and ``s`` in [1, n).
    Domain separators are kept on the function, by domain (the few a sandbox serves).
    """
    from coincurve import PublicKey
    from eth_hash.auto import keccak

    # keccak("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
    domain_type = bytes.fromhex("8b73c3c69bb8fe3d512ecc4cf759cc79239f7b179b0ffacaa9a75d522b39400f")
    # keccak("TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,
    #         uint256 validBefore,bytes32 nonce)")
    transfer_type = bytes.fromhex("7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267")
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141  # of secp256k1's group
    pad = bytes(12)  # an address is a 32-byte word, left-padded
    separators: dict[tuple[str, str, int, str], bytes] = recover_signer.__dict__.setdefault("separators", {})
    try:
        raw = bytes.fromhex(signature[2:])
        if len(raw) != 65:
            return None
        v = raw[64]
        if v in (27, 28):
            v -= 27
        elif v >= 35:
            v = (v - 35) % 2
        elif v not in (0, 1):
            return None
        if not (0 < int.from_bytes(raw[:32], "big") < order and 0 < int.from_bytes(raw[32:64], "big") < order):
            return None
        domain = (config.asset_name, config.asset_version, config.chain_id, config.asset)
        separator = separators.get(domain)
        if separator is None:
            separator = keccak(
                domain_type
                + keccak(config.asset_name.encode())
                + keccak(config.asset_version.encode())
                + config.chain_id.to_bytes(32, "big")
                + pad
                + bytes.fromhex(config.asset[2:])
            )
            if len(separators) >= 64:
                separators.clear()
            separators[domain] = separator
        struct = keccak(
            transfer_type
            + pad
            + bytes.fromhex(auth.from_[2:])
            + pad
            + bytes.fromhex(auth.to[2:])
            + auth.value.to_bytes(32, "big")
            + auth.valid_after.to_bytes(32, "big")
            + auth.valid_before.to_bytes(32, "big")
            + bytes.fromhex(auth.nonce[2:])
        )
        point = PublicKey.from_signature_and_message(
            raw[:64] + bytes((v,)), keccak(b"\x19\x01" + separator + struct), hasher=None
        )
    except Exception:  # a malformed signature or field (bad hex, off-curve r, wrong length) is simply not valid
        return None
    return "0x" + keccak(point.format(compressed=False)[1:])[-20:].hex()


class Facilitator:
    """Verify and settle EIP-3009 payments against the sandbox's test-USDC ledger."""

    def __init__(self, config: SandboxConfig, store: Store) -> None:
        self.config = config
        self.store = store

    def _expected_network(self, payment: Payment, dialect: Dialect) -> str:
        if dialect == "v1":
            return self.config.network_v1
        return self.config.network

    def verify(self, payment: Payment, price: int, dialect: Dialect, now: int | None = None) -> None:
        """Raise `Refusal` unless ``payment`` pays exactly ``price`` to the payee, validly and fundedly, now."""
        cfg = self.config
        now = int(time.time()) if now is None else now
        auth = payment.authorization

        if dialect == "v2" and payment.version != 2:
            raise Refusal("malformed_payment", "this resource takes an x402 v2 payload in PAYMENT-SIGNATURE")
        if dialect == "v1" and payment.version != 1:
            raise Refusal("malformed_payment", "this resource takes an x402 v1 payload in X-PAYMENT")
        if payment.scheme != "exact":
            raise Refusal("scheme_mismatch", f"scheme {str(payment.scheme)[:40]!r} is not 'exact'")
        expected_network = self._expected_network(payment, dialect)
        if payment.network != expected_network:
            raise Refusal("network_mismatch", f"network {str(payment.network)[:40]!r} is not {expected_network!r}")
        if payment.asset is not None and payment.asset.lower() != cfg.asset.lower():
            raise Refusal("asset_mismatch", f"asset {payment.asset[:42]} is not {cfg.asset}")
        if auth.to.lower() != cfg.payee.lower():
            raise Refusal("recipient_mismatch", f"authorization pays {auth.to}, not the payee {cfg.payee}")
        if auth.value < price:
            raise Refusal("underpaid", f"authorization value {auth.value} is below the price {price}")
        if auth.value != price:
            raise Refusal("amount_mismatch", f"authorization value {auth.value} is not the price {price}")
        if now < auth.valid_after:
            raise Refusal("not_yet_valid", f"validAfter {auth.valid_after} is in the future (now {now})")
        if now >= auth.valid_before:
            raise Refusal("expired", f"validBefore {auth.valid_before} has passed (now {now})")
        if auth.valid_before > now + cfg.max_timeout_seconds + VALIDITY_SLACK_SECONDS:
            raise Refusal(
                "validity_too_long",
                f"validBefore {auth.valid_before} is more than maxTimeoutSeconds={cfg.max_timeout_seconds} away",
            )
        signer = recover_signer(cfg, auth, payment.signature)
        if signer is None or signer.lower() != auth.from_.lower():
            raise Refusal("invalid_signature", "the signature does not recover to authorization.from")
        if self.store.nonce_used(auth.from_, auth.nonce):
            raise Refusal("nonce_already_used", "this authorization nonce has already been used")
        balance = self.store.usdc_balance(auth.from_)
        if balance < auth.value:
            raise Refusal("insufficient_balance", f"payer holds {balance} test USDC, needs {auth.value}")

    def settle(self, payment: Payment, path: str, *, topup_wallet: str | None = None) -> Settled:
        """Execute the transfer (payer -> payee) and burn the nonce, atomically. Raises `Refusal` on a lost race."""
        auth = payment.authorization
        try:
            return self.store.settle(
                auth.from_, self.config.payee, auth.value, auth.nonce, path, topup_wallet=topup_wallet
            )
        except SettleError as exc:
            raise Refusal(exc.reason, str(exc)) from None

    def verify_upto(self, payment: UptoPayment, ceiling: int, now: int | None = None) -> None:
        """Raise `Refusal` unless ``payment`` validly authorizes ``ceiling``, unused and funded (see `check_upto`)."""
        check_upto(self.config, payment, ceiling, now)
        if self.store.nonce_used(payment.payer, payment.nonce_key):
            raise Refusal("nonce_already_used", "this Permit2 nonce has already been used")
        balance = self.store.usdc_balance(payment.payer)
        if balance < payment.ceiling:
            raise Refusal("insufficient_balance", f"payer holds {balance} test USDC, needs {payment.ceiling}")

    def settle_upto(self, payment: UptoPayment, amount: int, path: str) -> Settled:
        """Move the metered ``amount`` (0 <= amount <= ceiling) and burn the nonce, atomically."""
        if not 0 <= amount <= payment.ceiling:
            raise Refusal("settlement_exceeds_amount", f"cannot settle {amount} against a ceiling of {payment.ceiling}")
        try:
            return self.store.settle(payment.payer, self.config.payee, amount, payment.nonce_key, path)
        except SettleError as exc:
            raise Refusal(exc.reason, str(exc)) from None
