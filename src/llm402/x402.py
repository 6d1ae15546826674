"""The 402 negotiator: parse a challenge in any of the four dialects, choose what to pay, sign, encode, decode.

Dialects (DESIGN.md): x402 v2 (``PAYMENT-REQUIRED`` header -> ``PAYMENT-SIGNATURE``), x402 v1 (body with
``x402Version: 1`` -> ``X-PAYMENT``), the Token Kiosk body (``accepts`` without a version -> ``X-Payment``) and MPP
(``WWW-Authenticate: Payment`` -> ``Authorization: Payment``, or ``Payment-Authorization`` when the challenge says so;
receipt in ``Payment-Receipt``). An MPP ``evm/charge`` challenge becomes an ordinary `Requirement` (``dialect`` MPP,
``raw`` the decoded request, ``extra`` the challenge's fields as received), so the same policy, ledger and receipts
apply; the wire details live in `llm402.mpp`. A route that offers both (pympp's and mppx's EVM servers) gives one
`Challenge` holding both rails' requirements; `select_requirement` pays by one (x402 unless the policy prefers MPP),
and an x402 payment to such a route carries the ``extensions.mppx`` route binding and its route-bound nonce.
Parsing uses the official ``x402`` SDK's models first; signing goes through its EVM schemes (EIP-3009 typed data for
MPP and route-bound payments). The SDK is imported lazily: it costs hundreds of milliseconds and is needed only when
a payment is due.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from . import mpp
from .errors import MalformedPaymentRequired, PaymentRequiredError, PolicyRefusal, SignerError
from .money import USDC_DECIMALS, format_usd, parse_atomic
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
    MPP = "mpp"

    @property
    def replay_header(self) -> str:
        """The request header that carries the signed payment (MPP: the default; a challenge may select
        ``Payment-Authorization``, which `SignedPayment.header_name` then names)."""
        return {"x402-v2": "PAYMENT-SIGNATURE", "x402-v1": "X-PAYMENT", "kiosk": "X-Payment", "mpp": "Authorization"}[
            self.value
        ]

    @property
    def rail(self) -> str:
        """The protocol: ``x402`` (v2, v1 and the Token Kiosk body) or ``mpp``."""
        return "mpp" if self is Dialect.MPP else "x402"


PAYMENT_HEADERS = frozenset({"payment-signature", "x-payment", mpp.PAYMENT_AUTHORIZATION})
"""Headers that only ever carry a payment (a caller's own are dropped; ours never follow a redirect). MPP's default
credential field is ``Authorization``, which the transport already treats as secret."""
PAYMENT_IDENTIFIER = "payment-identifier"
"""x402's idempotency extension (the client sends an id a gateway can deduplicate retries by)."""
SETTLEMENT_HEADERS = ("payment-response", "x-payment-response")
DEFAULT_RAILS = ("x402", "mpp")
"""The protocols a route offering several is paid by, most preferred first (``Policy.payment_protocols`` when the
policy has it)."""


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
    dialect: Dialect | None = None
    """The dialect this requirement is paid in when it differs from its challenge's (MPP offers on a dual-rail
    route); ``None``: the challenge's."""

    @property
    def upto(self) -> bool:
        """x402's ``upto`` scheme: ``amount`` is a ceiling; the gateway settles the actual cost, at most that."""
        return self.scheme == "upto"

    @property
    def mpp(self) -> bool:
        """An MPP offer (``extra`` holds the challenge's fields, ``raw`` its decoded request)."""
        return self.dialect is Dialect.MPP

    @property
    def single_use(self) -> bool:
        """An MPP challenge is single-use (its id is the credential's nonce): never pay it again from a remembered
        quote."""
        return self.mpp

    def describe(self) -> dict[str, Any]:
        """Machine-readable summary (quotes, receipts)."""
        summary = {
            "scheme": self.scheme,
            "network": self.network,
            "asset": self.asset,
            "amount": self.amount,
            "pay_to": self.pay_to,
            "max_timeout_seconds": self.max_timeout_seconds,
        }
        if self.mpp:
            summary["protocol"] = "mpp"
            summary["method"] = f"{self.extra.get('method')}/{self.extra.get('intent')}"
        return summary


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


def _eip712_domain(network: str, asset: str, siblings: tuple[Requirement, ...]) -> tuple[str, str] | None:
    """The EIP-712 ``(name, version)`` an MPP charge's token signs with: the x402 SDK's table of known stablecoins,
    else what the route's own x402 offer for that token says (a dual-rail route). A wrong one only makes the
    signature invalid: the domain also binds the token address and chain, which the policy checks."""
    from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS

    for entry in DEFAULT_ASSETS.get(network, ()):
        if entry["asset"].lower() == asset.lower() and entry.get("asset_transfer_method", "eip3009") == "eip3009":
            return str(entry["name"]), str(entry.get("version", "1"))
    for sibling in siblings:
        name, version = sibling.extra.get("name"), sibling.extra.get("version")
        if sibling.network == network and sibling.asset.lower() == asset.lower() and isinstance(name, str):
            return name, version if isinstance(version, str) else "1"
    return None


def _mpp_requirement(challenge: mpp.PaymentChallenge, now: float, siblings: tuple[Requirement, ...]) -> Requirement:
    """An MPP challenge as a `Requirement`. ``evm/charge`` becomes an exact payment on its chain; any other
    method or intent (or a credential field the spec does not allow) an offer under a scheme llm402 does not pay,
    which `select_requirement` refuses with ``scheme_not_supported``. ``ValueError`` when it cannot be read."""
    seconds, valid_before = mpp.validity_seconds(challenge, now)
    extra: dict[str, Any] = {
        "protocol": "mpp",
        "method": challenge.method,
        "intent": challenge.intent,
        "id": challenge.id,
        "realm": challenge.realm,
        "request": challenge.request_b64,
        "valid_before": valid_before,
        **{
            name: value
            for name, value in (
                ("expires", challenge.expires),
                ("digest", challenge.digest),
                ("opaque", challenge.opaque),
                ("description", challenge.description),
                ("header", challenge.header),
            )
            if value is not None
        },
    }
    if challenge.key != mpp.ACCEPT_PAYMENT or challenge.credential_field is None:
        return Requirement(f"mpp:{challenge.key}", "", "", 0, "", seconds, extra, dict(challenge.request), Dialect.MPP)
    terms = mpp.charge_terms(challenge.request)
    if terms.decimals is not None and terms.decimals != USDC_DECIMALS:
        raise ValueError(f"evm/charge in a {terms.decimals}-decimal token: llm402 counts 6-decimal stablecoins")
    network = f"eip155:{terms.chain_id}"
    domain = _eip712_domain(network, terms.currency, siblings)
    if domain is not None:
        extra["name"], extra["version"] = domain
    extra["amount_text"] = terms.amount_text
    return Requirement(
        "exact",
        network,
        terms.currency,
        terms.amount,
        terms.recipient,
        seconds,
        extra,
        dict(challenge.request),
        Dialect.MPP,
    )


def _mpp_challenge(headers: Mapping[str, str], body: bytes, x402: Challenge | None) -> Challenge | None:
    """The MPP offers of a 402 (``None`` when it has no ``Payment`` challenge), merged into the x402 challenge
    of the same answer when there is one (a dual-rail route)."""
    values = mpp.header_values(headers, "www-authenticate")
    if not any("payment" in value.lower() for value in values):
        return x402
    if sum(len(value) for value in values) > MAX_CHALLENGE_BYTES:
        raise MalformedPaymentRequired("WWW-Authenticate is too large")
    challenges, problems = mpp.payment_challenges(values)
    if not challenges and not problems:
        return x402
    siblings = x402.requirements if x402 is not None else ()
    now = time.time()
    offers: list[Requirement] = []
    for challenge in challenges:
        try:
            offers.append(_mpp_requirement(challenge, now, siblings))
        except ValueError as exc:
            problems.append(f"Payment challenge {challenge.key}: {exc}")
    if x402 is not None:
        return replace(x402, requirements=x402.requirements + tuple(offers))
    if not offers:
        raise MalformedPaymentRequired(
            "the 402 offers no usable Payment challenge (" + "; ".join(problems) + ")", problems=problems
        )
    problem = mpp.read_problem(headers, body)
    return Challenge(Dialect.MPP, tuple(offers), None, problem.reason() if problem is not None else None)


def parse_challenge(headers: Mapping[str, str], body: bytes) -> Challenge | None:
    """Parse a 402. ``None`` when it is not a payment challenge (e.g. a credit gateway's ``INSUFFICIENT_BALANCE``).

    ``headers`` must be case-insensitive (httpx's ``Headers``). Raises `MalformedPaymentRequired`. A 402 with both
    x402 requirements and ``Payment`` challenges gives one challenge holding both rails' offers.
    """
    try:
        x402 = _parse_x402(headers, body)
    except MalformedPaymentRequired:
        if "payment" not in (headers.get("www-authenticate") or "").lower():
            raise
        # an unreadable x402 half of a dual-rail 402: the MPP half may still be payable
        challenge = _mpp_challenge(headers, body, None)
        if challenge is None:
            raise
        return challenge
    return _mpp_challenge(headers, body, x402)


def _parse_x402(headers: Mapping[str, str], body: bytes) -> Challenge | None:
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


def _mpp_refusal(requirement: Requirement) -> PolicyRefusal | None:
    """What llm402 cannot pay in an MPP offer: another method or intent, a credential field the spec does not
    allow, a token whose EIP-712 domain is unknown."""
    extra = requirement.extra
    if requirement.scheme != "exact":
        if extra.get("method") == "evm" and extra.get("intent") == "charge":
            return PolicyRefusal(
                f"the MPP challenge names the credential field {str(extra.get('header'))[:40]!r}; the Payment "
                "scheme allows only Authorization or Payment-Authorization",
                code="scheme_not_supported",
            )
        return PolicyRefusal(
            f"MPP {str(extra.get('method'))[:40]}/{str(extra.get('intent'))[:40]} is not supported "
            f"(llm402 pays {mpp.ACCEPT_PAYMENT})",
            code="scheme_not_supported",
        )
    if "name" not in extra:
        return PolicyRefusal(
            f"the EIP-712 domain of token {requirement.asset} on {requirement.network} is unknown, so an evm/charge "
            "authorization cannot be signed for it",
            code="asset_not_allowed",
            asset=requirement.asset,
            network=requirement.network,
        )
    return None


def _scheme_refusal(requirement: Requirement, policy: Policy, dialect: Dialect) -> PolicyRefusal | None:
    if requirement.mpp:
        refused = _mpp_refusal(requirement)
        if refused is not None:
            return refused
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
    rails = _rails(policy)
    for requirement in challenge.requirements:
        dialect = requirement.dialect or challenge.dialect
        refusal = _refusal(requirement, policy, knows_asset, dialect)
        if refusal is None and dialect.rail not in rails:
            refusal = PolicyRefusal(
                f"the policy does not pay by {dialect.rail} (payment_protocols: {', '.join(rails)})",
                code="scheme_not_supported",
            )
        if refusal is None:
            acceptable.append(requirement)
        else:
            refusals.append(refusal)
    if acceptable:
        # a route offering several protocols is paid by one: the policy's first that has an acceptable offer
        best = min(rails.index((r.dialect or challenge.dialect).rail) for r in acceptable)
        acceptable = [r for r in acceptable if rails.index((r.dialect or challenge.dialect).rail) == best]
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


def _rails(policy: Policy) -> tuple[str, ...]:
    """The protocols the policy pays by, most preferred first (``Policy.payment_protocols``; default x402, then
    MPP)."""
    return tuple(policy.payment_protocols) or DEFAULT_RAILS


# --- signing and encoding -----------------------------------------------------------------------------------


def _encode(envelope: Mapping[str, Any]) -> str:
    return base64.b64encode(json.dumps(envelope, separators=(",", ":")).encode()).decode()


def _sign_eip3009(
    signer: Signer,
    *,
    network: str,
    asset: str,
    name: str,
    version: str,
    pay_to: str,
    value: str,
    valid_before: int,
    nonce: str,
) -> dict[str, Any]:
    """An EIP-3009 ``TransferWithAuthorization`` with a given nonce, signed through the x402 SDK's typed data; the
    SDK's payload shape ``{authorization: {from, to, value, validAfter, validBefore, nonce}, signature}``."""
    from x402.mechanisms.evm.eip712 import build_typed_data_for_signing
    from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload, TypedDataField

    authorization = ExactEIP3009Authorization(
        from_address=signer.address,
        to=pay_to,
        value=value,
        valid_after="0",
        valid_before=str(valid_before),
        nonce=nonce,
    )
    domain, types, primary, message = build_typed_data_for_signing(
        authorization, int(network.split(":", 1)[1]), asset, name, version
    )
    fields = {kind: [TypedDataField(name=f["name"], type=f["type"]) for f in spec] for kind, spec in types.items()}
    signature = "0x" + signer.sign_typed_data(domain, fields, primary, message).hex()
    payload: dict[str, Any] = ExactEIP3009Payload(authorization=authorization, signature=signature).to_dict()
    return payload


def _mpp_challenge_of(requirement: Requirement) -> mpp.PaymentChallenge:
    extra = requirement.extra
    return mpp.PaymentChallenge(
        id=str(extra["id"]),
        realm=str(extra["realm"]),
        method=str(extra["method"]),
        intent=str(extra["intent"]),
        request_b64=str(extra["request"]),
        request=requirement.raw,
        expires=extra.get("expires"),
        digest=extra.get("digest"),
        opaque=extra.get("opaque"),
        description=extra.get("description"),
        header=extra.get("header"),
    )


class _SignedChallenges:
    """MPP challenges this process has signed, until they expire: a challenge answers once (its id is the
    credential's nonce), so signing one again could only produce a second authorization with the same nonce. A retry
    re-sends the credential it has; it never signs again."""

    def __init__(self, size: int = 65_536) -> None:
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._size = size

    def claim(self, realm: str, challenge_id: str, valid_before: int) -> bool:
        """Record a signature for this challenge; ``False`` when one was made already."""
        now = int(time.time())
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            key = (realm, challenge_id)
            if key in self._seen:
                return False
            self._seen[key] = valid_before
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
            return True


_SIGNED = _SignedChallenges()


def _sign_mpp(requirement: Requirement, signer: Signer) -> SignedPayment:
    """A native ``evm/charge`` credential: EIP-3009 with the SDKs' nonce (keccak256 of ``["<id>","<realm>"]``) and
    ``validBefore`` the challenge's ``expires``, in the field the challenge selects. A challenge is signed once."""
    from eth_utils.address import to_checksum_address

    challenge = _mpp_challenge_of(requirement)
    field_name = challenge.credential_field
    if field_name is None or requirement.scheme != "exact":
        raise PolicyRefusal(f"MPP {challenge.key} cannot be paid by llm402", code="scheme_not_supported")
    nonce = mpp.challenge_nonce(challenge.id, challenge.realm)
    valid_before = int(requirement.extra["valid_before"])
    if not _SIGNED.claim(challenge.realm, challenge.id, valid_before):
        raise PaymentRequiredError(
            "this MPP challenge was already answered (its id is the credential's nonce); llm402 does not sign it "
            "again: pay the 402 the gateway gives next",
            code="mpp_challenge_reused",
        )
    signed = _sign_eip3009(
        signer,
        network=requirement.network,
        asset=requirement.asset,
        name=str(requirement.extra["name"]),
        version=str(requirement.extra["version"]),
        pay_to=requirement.pay_to,
        value=str(requirement.extra.get("amount_text", requirement.amount)),
        valid_before=valid_before,
        nonce=nonce,
    )
    authorization = signed["authorization"]
    payload = {
        "type": mpp.CREDENTIAL_TYPE,
        "from": to_checksum_address(authorization["from"]),
        "to": to_checksum_address(authorization["to"]),
        "value": authorization["value"],
        "validAfter": authorization["validAfter"],
        "validBefore": authorization["validBefore"],
        "nonce": nonce,
        "signature": signed["signature"],
    }
    chain_id = int(requirement.network.split(":", 1)[1])
    return SignedPayment(
        header_name=field_name,
        header_value=mpp.encode_credential(challenge, payload, mpp.did_pkh(chain_id, signer.address)),
        requirement=requirement,
        payer=signer.address,
        nonce=nonce,
        valid_before=valid_before,
    )


def _route_bound(challenge: Challenge, requirement: Requirement) -> bool:
    """An exact EIP-3009 offer of a route that asks for mppx's route binding (pympp's and mppx's dual-rail routes
    refuse an x402 payment without it)."""
    return (
        challenge.dialect is Dialect.V2
        and requirement.dialect is None
        and requirement.scheme == "exact"
        and requirement.extra.get("assetTransferMethod", "eip3009") == "eip3009"
        and challenge.resource is not None
        and mpp.has_route_binding(challenge.extensions)
    )


def _sign_route_bound(challenge: Challenge, requirement: Requirement, signer: Signer) -> SignedPayment:
    """x402 v2 exact on a dual-rail route: ``accepted`` and ``resource`` echoed unchanged, ``extensions`` echoed with
    a client salt as ``mppx.info.nonce``, and the EIP-3009 nonce bound to all three."""
    accepted = dict(requirement.raw)
    resource = dict(challenge.resource or {})
    extensions = mpp.bound_extensions(challenge.extensions or {})
    nonce = mpp.route_nonce(accepted, resource, extensions)
    name, version = requirement.extra.get("name"), requirement.extra.get("version")
    if not isinstance(name, str):
        domain = _eip712_domain(requirement.network, requirement.asset, ())
        if domain is None:
            raise SignerError("the offer names no EIP-712 domain (extra.name, extra.version) for its token")
        name, version = domain
    valid_before = int(time.time()) + requirement.max_timeout_seconds
    inner = _sign_eip3009(
        signer,
        network=requirement.network,
        asset=requirement.asset,
        name=name,
        version=version if isinstance(version, str) else "1",
        pay_to=requirement.pay_to,
        value=str(accepted.get("amount", requirement.amount)),
        valid_before=valid_before,
        nonce=nonce,
    )
    envelope = {
        "x402Version": 2,
        "payload": inner,
        "accepted": accepted,
        "resource": resource,
        "extensions": extensions,
    }
    return SignedPayment(
        header_name=Dialect.V2.replay_header,
        header_value=_encode(envelope),
        requirement=requirement,
        payer=signer.address,
        nonce=nonce,
        valid_before=valid_before,
    )


def _payment_identifier(extensions: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """x402's ``payment-identifier`` extension, when the gateway declares it: a fresh id for this authorization, so
    a gateway that already took it can answer its retry (the same header) with the paid answer instead of a 402."""
    if not extensions or PAYMENT_IDENTIFIER not in extensions:
        return None
    from x402.extensions.payment_identifier import append_payment_identifier_to_extensions

    declared: dict[str, Any] = {PAYMENT_IDENTIFIER: extensions[PAYMENT_IDENTIFIER]}
    try:
        filled = append_payment_identifier_to_extensions(declared)
    except (ValueError, TypeError, AttributeError):  # a malformed declaration: pay without it
        return None
    return filled if filled[PAYMENT_IDENTIFIER] is not extensions[PAYMENT_IDENTIFIER] else None


def sign_payment(challenge: Challenge, requirement: Requirement, signer: Signer, resource_url: str) -> SignedPayment:
    """Sign through the SDK's EVM schemes (exact: EIP-3009 or Permit2; upto: a Permit2 ceiling) and encode; an MPP
    ``evm/charge`` offer as a ``Payment`` credential; an x402 offer of a dual-rail route with its route binding."""
    try:
        if requirement.mpp:
            return _sign_mpp(requirement, signer)
        if _route_bound(challenge, requirement):
            return _sign_route_bound(challenge, requirement, signer)
    except PaymentRequiredError:
        raise
    except Exception as exc:
        raise SignerError(f"could not sign the payment: {type(exc).__name__}: {_safe(exc)}") from None
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
            identified = _payment_identifier(challenge.extensions)
            if identified is not None:
                envelope["extensions"] = identified
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
    """Decode ``PAYMENT-RESPONSE`` / ``X-PAYMENT-RESPONSE``, else MPP's ``Payment-Receipt``; a garbled header gives
    ``success=False`` with an error. An MPP receipt names neither payer nor network (`bind_settlement`)."""
    settlement = _decode_x402_settlement(headers)
    if settlement is not None:
        return settlement
    value = headers.get(mpp.RECEIPT_HEADER)
    if value is None:
        return None
    try:
        receipt = mpp.read_receipt(value)
    except (ValueError, PaymentRequiredError) as exc:
        return Settlement(False, None, None, None, None, error=str(exc)[:200])
    return Settlement(receipt.status == "success", receipt.reference or None, None, None, None)


def receipt_event_settlement(data: Mapping[str, Any]) -> Settlement:
    """The settlement an MPP stream reports in its final ``event: payment-receipt`` (its JSON: ``status``,
    ``method``, ``reference``; a session adds ``spent`` and ``acceptedCumulative``). ``amount`` is ``spent`` when
    given (what a session moved); like ``Payment-Receipt`` it names no payer (`bind_settlement`)."""
    spent = data.get("spent")
    try:
        amount = parse_atomic(spent, allow_zero=True) if spent is not None else None
    except ValueError:
        return Settlement(False, None, None, None, None, error="unreadable payment-receipt event: spent")
    return Settlement(data.get("status") == "success", _opt_str(data.get("reference")), None, None, amount)


def bind_settlement(payment: SignedPayment, settlement: Settlement) -> Settlement:
    """An MPP ``Payment-Receipt`` answers the credential sent with this very request and names no payer, network or
    asset: read it as this payment's (it cannot lower what an exact charge counts). Any other report is unchanged."""
    if not payment.requirement.mpp or settlement.payer is not None:
        return settlement
    req = payment.requirement
    return replace(settlement, payer=payment.payer, network=req.network, asset=req.asset)


def _decode_x402_settlement(headers: Mapping[str, str]) -> Settlement | None:
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
