"""The 402 negotiator: parse a challenge in any of the three dialects, choose what to pay, sign, encode, decode.

Dialects (DESIGN.md): x402 v2 (``PAYMENT-REQUIRED`` header -> ``PAYMENT-SIGNATURE``), x402 v1 (body with
``x402Version: 1`` -> ``X-PAYMENT``) and the Token Kiosk body (``accepts`` without a version -> ``X-Payment``).
Parsing uses the official ``x402`` SDK's models first; signing goes through its EVM exact scheme. The SDK is
imported lazily: it costs hundreds of milliseconds and is needed only when a payment is due.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import MalformedPaymentRequired, PolicyRefusal, SignerError
from .money import format_usd, parse_atomic
from .policy import Policy
from .wallet import Signer

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_CAIP2_EVM = re.compile(r"^eip155:[1-9][0-9]{0,18}$")
MAX_CHALLENGE_BYTES = 64 * 1024
DEFAULT_TIMEOUT_SECONDS = 300


class Dialect(StrEnum):
    """How a gateway speaks x402."""

    V2 = "x402-v2"
    V1 = "x402-v1"
    KIOSK = "kiosk"

    @property
    def replay_header(self) -> str:
        """The request header that carries the signed payment."""
        return {"x402-v2": "PAYMENT-SIGNATURE", "x402-v1": "X-PAYMENT", "kiosk": "X-Payment"}[self.value]


PAYMENT_HEADERS = frozenset({"payment-signature", "x-payment"})
SETTLEMENT_HEADERS = ("payment-response", "x-payment-response")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One normalized ``accepts`` entry. ``network`` is always CAIP-2; ``raw`` is the entry as received."""

    scheme: str
    network: str
    asset: str
    amount: int
    pay_to: str
    max_timeout_seconds: int
    extra: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False)

    @property
    def upto(self) -> bool:
        """x402's ``upto`` scheme: ``amount`` is a ceiling; the gateway settles the actual cost, at most that."""
        return self.scheme == "upto"

    def describe(self) -> dict[str, Any]:
        """Machine-readable summary (quotes, receipts)."""
        return {
            "scheme": self.scheme,
            "network": self.network,
            "asset": self.asset,
            "amount": self.amount,
            "pay_to": self.pay_to,
            "max_timeout_seconds": self.max_timeout_seconds,
        }


@dataclass(frozen=True, slots=True)
class Challenge:
    """A parsed 402: the dialect, the acceptable requirements, and the resource it was issued for."""

    dialect: Dialect
    requirements: tuple[Requirement, ...]
    resource: Mapping[str, Any] | None
    error: str | None
    extensions: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SignedPayment:
    """A signed authorization ready to replay. ``header_value`` is a bearer secret: never log it."""

    header_name: str
    header_value: str = field(repr=False)
    requirement: Requirement
    payer: str
    nonce: str
    valid_before: int

    @property
    def amount(self) -> int:
        """The most this authorization lets the payee take, in atomic units (exact: all of it; upto: a ceiling)."""
        return self.requirement.amount


@dataclass(frozen=True, slots=True)
class Settlement:
    """The gateway's settlement report (``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE``)."""

    success: bool
    transaction: str | None
    network: str | None
    payer: str | None
    amount: int | None
    error: str | None = None
    asset: str | None = None


# --- parsing --------------------------------------------------------------------------------------------------


def _b64json(value: str, what: str) -> Any:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedPaymentRequired(f"{what} is not valid base64") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise MalformedPaymentRequired(f"{what} does not hold valid JSON") from None


def _legacy_chain_ids() -> Mapping[str, int]:
    from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS

    return V1_NETWORK_CHAIN_IDS


def _normalize(entry: Any, dialect: Dialect) -> Requirement:
    if not isinstance(entry, Mapping):
        raise ValueError("entry is not an object")
    scheme = entry.get("scheme")
    if not isinstance(scheme, str) or not scheme:
        raise ValueError("missing scheme")
    network = entry.get("network")
    if not isinstance(network, str) or not network:
        raise ValueError("missing network")
    if not network.startswith("eip155:"):
        chain_id = _legacy_chain_ids().get(network)
        if chain_id is None:
            raise ValueError(f"unknown network {network[:40]!r}")
        network = f"eip155:{chain_id}"
    elif not _CAIP2_EVM.fullmatch(network):
        raise ValueError(f"invalid CAIP-2 network {network[:40]!r}")
    amount_field = entry.get("amount")
    max_field = entry.get("maxAmountRequired")
    if amount_field is None and max_field is None:
        raise ValueError("missing amount")
    amount = parse_atomic(amount_field if amount_field is not None else max_field)
    if amount_field is not None and max_field is not None and parse_atomic(max_field) != amount:
        raise ValueError("amount and maxAmountRequired disagree")
    pay_to = entry.get("payTo")
    if not isinstance(pay_to, str) or not _ADDRESS.fullmatch(pay_to):
        raise ValueError("missing or invalid payTo (payee)")
    asset = entry.get("asset")
    if not isinstance(asset, str) or not _ADDRESS.fullmatch(asset):
        raise ValueError("missing or invalid asset")
    timeout = entry.get("maxTimeoutSeconds", DEFAULT_TIMEOUT_SECONDS if dialect is Dialect.KIOSK else None)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise ValueError("missing or invalid maxTimeoutSeconds")
    extra = entry.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise ValueError("extra is not an object")
    return Requirement(scheme, network, asset, amount, pay_to, timeout, dict(extra), dict(entry))


def _build(data: Any, dialect: Dialect, what: str) -> Challenge:
    if not isinstance(data, Mapping) or not isinstance(data.get("accepts"), list):
        raise MalformedPaymentRequired(f"{what} has no 'accepts' list")
    requirements: list[Requirement] = []
    problems: list[str] = []
    for index, entry in enumerate(data["accepts"]):
        try:
            requirements.append(_normalize(entry, dialect))
        except ValueError as exc:
            problems.append(f"accepts[{index}]: {exc}")
    if not requirements:
        detail = "; ".join(problems) if problems else "'accepts' is empty"
        raise MalformedPaymentRequired(f"{what} offers no usable payment requirement ({detail})", problems=problems)
    resource = data.get("resource")
    extensions = data.get("extensions")
    error = data.get("error")
    return Challenge(
        dialect=dialect,
        requirements=tuple(requirements),
        resource=resource if isinstance(resource, Mapping) else None,
        error=error if isinstance(error, str) else None,
        extensions=extensions if isinstance(extensions, Mapping) else None,
    )


def parse_challenge(headers: Mapping[str, str], body: bytes) -> Challenge | None:
    """Parse a 402. ``None`` when it is not an x402 challenge (e.g. a credit gateway's ``INSUFFICIENT_BALANCE``).

    ``headers`` must be case-insensitive (httpx's ``Headers``). Raises `MalformedPaymentRequired`.
    """
    header = headers.get("payment-required")
    if header is not None:
        if len(header) > MAX_CHALLENGE_BYTES:
            raise MalformedPaymentRequired("PAYMENT-REQUIRED header is too large")
        data = _b64json(header, "PAYMENT-REQUIRED header")
        if isinstance(data, Mapping) and data.get("x402Version", 2) == 1:
            return _build(data, Dialect.V1, "PAYMENT-REQUIRED header")
        return _build(data, Dialect.V2, "PAYMENT-REQUIRED header")
    if not body or len(body) > MAX_CHALLENGE_BYTES:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, Mapping) or "accepts" not in data:
        return None
    version = data.get("x402Version")
    if version == 1:
        return _build(data, Dialect.V1, "402 body")
    if version == 2:
        return _build(data, Dialect.V2, "402 body")
    if version is None:
        return _build(data, Dialect.KIOSK, "402 body")
    raise MalformedPaymentRequired(f"unsupported x402Version {str(version)[:20]!r}")


# --- selection ----------------------------------------------------------------------------------------------


def sdk_knows_asset(network: str, asset: str) -> bool:
    """Whether the official SDK lists this token as a default stablecoin of this network."""
    from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS

    return any(entry["asset"].lower() == asset.lower() for entry in DEFAULT_ASSETS.get(network, ()))


SCHEMES = frozenset({"exact", "upto"})
"""The x402 schemes llm402 can pay with."""


def _scheme_refusal(requirement: Requirement, policy: Policy, dialect: Dialect) -> PolicyRefusal | None:
    if requirement.scheme not in SCHEMES or requirement.scheme not in policy.allowed_schemes:
        return PolicyRefusal(f"payment scheme {requirement.scheme!r} is not supported", code="scheme_not_supported")
    if not requirement.upto:
        return None
    facilitator = requirement.extra.get("facilitatorAddress")
    method = requirement.extra.get("assetTransferMethod", "permit2")
    if dialect is not Dialect.V2 or method != "permit2" or not isinstance(facilitator, str):
        return PolicyRefusal(
            "an upto offer needs x402 v2, Permit2 and extra.facilitatorAddress", code="scheme_not_supported"
        )
    if not _ADDRESS.fullmatch(facilitator):
        return PolicyRefusal("the upto offer's facilitatorAddress is not an address", code="scheme_not_supported")
    return None


def _refusal(
    requirement: Requirement, policy: Policy, knows_asset: Callable[[str, str], bool], dialect: Dialect
) -> PolicyRefusal | None:
    scheme_refusal = _scheme_refusal(requirement, policy, dialect)
    if scheme_refusal is not None:
        return scheme_refusal
    if not policy.network_allowed(requirement.network):
        return PolicyRefusal(
            f"network {requirement.network} is not allowed",
            code="network_not_allowed",
            network=requirement.network,
        )
    allowed = policy.asset_explicitly_allowed(requirement.asset)
    if allowed is False or (allowed is None and not knows_asset(requirement.network, requirement.asset)):
        return PolicyRefusal(
            f"asset {requirement.asset} on {requirement.network} is not allowed"
            + ("" if allowed is False else " (unknown to the x402 SDK; add it to allowed_assets to pay in it)"),
            code="asset_not_allowed",
            asset=requirement.asset,
            network=requirement.network,
        )
    if not policy.payee_allowed(requirement.pay_to):
        return PolicyRefusal(
            f"payee {requirement.pay_to} is not allowed", code="payee_not_allowed", payee=requirement.pay_to
        )
    if requirement.max_timeout_seconds > policy.max_validity_seconds:
        return PolicyRefusal(
            f"validity window of {requirement.max_timeout_seconds}s is longer than the "
            f"{policy.max_validity_seconds}s the policy accepts",
            code="validity_too_long",
        )
    try:
        policy.check_amount(requirement.amount)
    except PolicyRefusal as refusal:
        return refusal
    return None


def select_requirement(
    challenge: Challenge, policy: Policy, knows_asset: Callable[[str, str], bool] = sdk_knows_asset
) -> Requirement:
    """The requirement to pay; raises `PolicyRefusal` when the policy allows none.

    With ``policy.prefer_upto`` an allowed ``upto`` offer wins (its ceiling has passed every check an exact amount
    would); otherwise, and among equals, the cheapest wins and server order breaks ties.
    """
    acceptable: list[Requirement] = []
    refusals: list[PolicyRefusal] = []
    for requirement in challenge.requirements:
        refusal = _refusal(requirement, policy, knows_asset, challenge.dialect)
        if refusal is None:
            acceptable.append(requirement)
        else:
            refusals.append(refusal)
    if acceptable:
        upto = [r for r in acceptable if r.upto]
        if policy.prefer_upto and upto:
            return min(upto, key=lambda r: r.amount)
        exact = [r for r in acceptable if not r.upto]
        return min(exact or acceptable, key=lambda r: r.amount)
    if len(refusals) == 1:
        raise refusals[0]
    over = [r for r in refusals if r.code == "payment_over_ticket"]
    first = over[0] if over else refusals[0]
    raise PolicyRefusal(
        "no payment option is allowed by the policy: " + "; ".join(r.message for r in refusals),
        code=first.code,
        **first.details,
    )


# --- signing and encoding -----------------------------------------------------------------------------------


def _encode(envelope: Mapping[str, Any]) -> str:
    return base64.b64encode(json.dumps(envelope, separators=(",", ":")).encode()).decode()


def sign_payment(challenge: Challenge, requirement: Requirement, signer: Signer, resource_url: str) -> SignedPayment:
    """Sign through the SDK's EVM schemes (exact: EIP-3009 or Permit2; upto: a Permit2 ceiling) and encode."""
    try:
        if challenge.dialect is Dialect.V1:
            from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
            from x402.schemas.v1 import PaymentRequirementsV1

            legacy = PaymentRequirementsV1.model_validate(dict(requirement.raw))
            inner = ExactEvmSchemeV1(signer).create_payment_payload(legacy)
            envelope: dict[str, Any] = {
                "x402Version": 1,
                "scheme": requirement.scheme,
                "network": requirement.raw["network"],
                "payload": inner,
            }
        else:
            from x402.schemas import PaymentRequirements

            accepted = dict(requirement.raw)
            accepted.setdefault("amount", str(requirement.amount))
            accepted.setdefault("maxTimeoutSeconds", requirement.max_timeout_seconds)
            if challenge.dialect is Dialect.KIOSK:
                accepted.pop("maxAmountRequired", None)
            model = PaymentRequirements.model_validate(accepted)
            if requirement.upto:
                from x402.mechanisms.evm.upto.client import UptoEvmScheme

                inner = UptoEvmScheme(signer).create_payment_payload(model)
            else:
                from x402.mechanisms.evm.exact.client import ExactEvmScheme

                inner = ExactEvmScheme(signer).create_payment_payload(model)
            envelope = {
                "x402Version": 2,
                "payload": inner,
                "accepted": accepted,
                "resource": dict(challenge.resource) if challenge.resource else {"url": resource_url},
            }
    except MalformedPaymentRequired:
        raise
    except Exception as exc:
        raise SignerError(f"could not sign the payment: {type(exc).__name__}: {_safe(exc)}") from None
    authorization = inner.get("authorization") or inner.get("permit2Authorization") or {}
    valid_before = int(authorization.get("validBefore") or authorization.get("deadline") or 0)
    return SignedPayment(
        header_name=challenge.dialect.replay_header,
        header_value=_encode(envelope),
        requirement=requirement,
        payer=signer.address,
        nonce=str(authorization.get("nonce", "")),
        valid_before=valid_before,
    )


def _safe(exc: Exception) -> str:
    """An exception text without anything that looks like key material."""
    return re.sub(r"0x[0-9a-fA-F]{64,}", "0x<redacted>", str(exc))[:200]


def decode_settlement(headers: Mapping[str, str]) -> Settlement | None:
    """Decode ``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE``; a garbled header gives ``success=False`` with an error."""
    for name in SETTLEMENT_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        try:
            data = json.loads(base64.b64decode(value.strip(), validate=True))
            if not isinstance(data, Mapping):
                raise ValueError("not an object")
            amount_raw = data.get("amount")
            amount = parse_atomic(amount_raw, allow_zero=True) if amount_raw not in (None, "") else None
            return Settlement(
                success=bool(data.get("success", False)),
                transaction=_opt_str(data.get("transaction")),
                network=_opt_str(data.get("network")),
                payer=_opt_str(data.get("payer")),
                amount=amount,
                error=_opt_str(data.get("errorReason") or data.get("error")),
                asset=_opt_str(data.get("asset")),
            )
        except (ValueError, binascii.Error) as exc:
            return Settlement(False, None, None, None, None, error=f"unreadable {name} header: {exc}"[:200])
    return None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def describe_amount(requirement: Requirement) -> str:
    """Human-readable amount (USDC-like 6-decimal assets)."""
    return format_usd(requirement.amount)
