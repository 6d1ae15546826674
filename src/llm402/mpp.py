"""MPP, the Machine Payments Protocol (the HTTP ``Payment`` authentication scheme): the wire, without I/O.

What is here (used by `llm402.x402`, which turns an MPP ``evm/charge`` challenge into an ordinary `Requirement` so
that one core, policy, ledger and receipt serve every dialect):

- `payment_challenges`: every ``Payment`` challenge of every ``WWW-Authenticate`` field (RFC 9110 auth-params:
  several challenges in one field or over several fields, quoted strings with escapes, names case-insensitive,
  unknown parameters ignored). The raw strings to echo (``request``, ``opaque``, ``expires``, ``digest``) are kept
  exactly as received; a challenge without ``id`` (or ``realm``, ``method``, ``intent``, ``request``) is malformed.
- `charge_terms`: the decoded ``request`` of an ``evm/charge`` challenge, checked (amount, currency, recipient, chain,
  ``credentialTypes``, decimals, no splits).
- `challenge_nonce`: the EIP-3009 nonce of a native credential, as pympp and mppx compute it (keccak256 of the compact
  JSON ``["<id>","<realm>"]``; the draft's text says otherwise, the SDKs win).
- `encode_credential`: ``Payment <base64url JSON {challenge, payload, source}>`` through pympp's `Credential` and
  `ChallengeEcho` (its encoder, not its HTTP client).
- `read_receipt`: a ``Payment-Receipt`` through pympp's `Receipt` parser.
- `read_problem` / `problem_error`: RFC 9457 Problem Details with a ``type`` under ``https://paymentauth.org/problems/``
  and the typed llm402 error each maps to.
- `route_nonce` / `bound_extensions`: x402 on MPP's dual-rail routes (pympp and mppx EVM servers): the echoed
  ``extensions.mppx`` with a client salt, and the route-bound EIP-3009 nonce ``0x`` + SHA-256 hex of the ``|``-joined
  base64url JCS (RFC 8785, the ``rfc8785`` package pympp depends on) of ``accepted``, ``resource`` and ``extensions``.

pympp is an optional dependency (``pip install 'llm402[mpp]'``), imported only when a credential is encoded, a
receipt read or a route nonce computed: ``import llm402`` never loads it.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import (
    MalformedPaymentRequired,
    PaidAnswerLost,
    PaymentOutcomeUnknown,
    PaymentRejected,
    PaymentRequiredError,
    PolicyRefusal,
)

ACCEPT_PAYMENT = "evm/charge"
"""The ``Accept-Payment`` request header: the method/intent pairs llm402 can pay (RFC 9110 weighted list)."""
AUTHORIZATION = "authorization"
PAYMENT_AUTHORIZATION = "payment-authorization"
"""The credential field a challenge may select with ``header="Payment-Authorization"`` (so the caller keeps its own
``Authorization``, e.g. an API key)."""
RECEIPT_HEADER = "payment-receipt"
PROBLEM_BASE = "https://paymentauth.org/problems/"
RECEIPT_EVENT = b"payment-receipt"
"""The SSE event name of a final receipt on an MPP session stream (``event: payment-receipt``)."""
DEFAULT_VALIDITY_SECONDS = 300
"""How long a credential for a challenge without ``expires`` stays valid (pympp's and mppx's client default)."""
MAX_FIELD_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 16 * 1024

_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf"^({_TCHARS})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|({_TCHARS}))$", re.DOTALL)
_SCHEME = re.compile(rf"^({_TCHARS})(?:\s+(.*))?$", re.DOTALL)
_METHOD = re.compile(r"^[a-z][a-z0-9:_-]*$")
_INTENT = re.compile(r"^[A-Za-z0-9-]+$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_ATOMIC = re.compile(r"^[0-9]{1,78}$")
CREDENTIAL_TYPE = "authorization"


# --- challenges -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentChallenge:
    """One ``Payment`` challenge. Every string is as received (what the credential echoes); ``request`` is decoded."""

    id: str
    realm: str
    method: str
    intent: str
    request_b64: str
    request: Mapping[str, Any] = field(repr=False)
    expires: str | None = None
    digest: str | None = None
    opaque: str | None = None
    description: str | None = None
    header: str | None = None
    """``Payment-Authorization`` when the challenge selects it (as received); ``None``: ``Authorization``."""

    @property
    def key(self) -> str:
        """``method/intent`` (``evm/charge``)."""
        return f"{self.method}/{self.intent}"

    @property
    def credential_field(self) -> str | None:
        """The (lowercase) header the credential goes in; ``None`` when the challenge names a field that the spec
        does not allow (such a challenge must not be answered)."""
        if self.header is None or self.header.lower() == AUTHORIZATION:
            return AUTHORIZATION
        return PAYMENT_AUTHORIZATION if self.header.lower() == PAYMENT_AUTHORIZATION else None

    def expires_at(self) -> float | None:
        """``expires`` as a unix time (``None`` when absent). Raises ``ValueError`` when it is not RFC 3339."""
        if self.expires is None:
            return None
        return parse_time(self.expires)


def parse_time(value: str) -> float:
    """An RFC 3339 date-time (with its offset) as a unix time; ``ValueError`` otherwise."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"expires {value[:40]!r} is not an RFC 3339 date-time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"expires {value[:40]!r} has no UTC offset")
    return parsed.timestamp()


def _elements(value: str) -> list[str]:
    """A field value split at the commas outside quoted strings (RFC 9110 list syntax)."""
    parts: list[str] = []
    start, quoted, escaped = 0, False, False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append(value[start:index])
            start = index + 1
    parts.append(value[start:])
    return [part.strip() for part in parts if part.strip()]


def _unquote(text: str) -> str:
    """A quoted-string's content: ``\\x`` is ``x``; ``\\uXXXX`` (as mppx writes non-Latin-1 text) is that character."""
    out: list[str] = []
    units: list[int] = []

    def flush() -> None:
        if units:
            out.append(b"".join(u.to_bytes(2, "big") for u in units).decode("utf-16-be", "replace"))
            units.clear()

    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\" or index + 1 >= len(text):
            flush()
            out.append(char)
            index += 1
            continue
        nxt = text[index + 1]
        digits = text[index + 2 : index + 6]
        if nxt == "u" and len(digits) == 4 and all(c in "0123456789abcdefABCDEF" for c in digits):
            units.append(int(digits, 16))
            index += 6
            continue
        flush()
        out.append(nxt)
        index += 2
    flush()
    return "".join(out)


def auth_challenges(value: str) -> list[tuple[str, dict[str, str] | None]]:
    """The challenges of one ``WWW-Authenticate`` value: ``(scheme, params)``, params ``None`` when a challenge's
    parameters are malformed (a duplicate name) or a token68. Names are lowercased."""
    found: list[tuple[str, dict[str, str] | None]] = []
    for element in _elements(value):
        param = _PARAM.match(element)
        if param is not None:
            if found and found[-1][1] is not None:
                params = found[-1][1]
                name = param.group(1).lower()
                if name in params:
                    found[-1] = (found[-1][0], None)  # a parameter given twice: the challenge is malformed
                    continue
                params[name] = _unquote(param.group(2)) if param.group(2) is not None else param.group(3)
            continue
        scheme = _SCHEME.match(element)
        if scheme is None:
            continue
        rest = (scheme.group(2) or "").strip()
        if not rest:
            found.append((scheme.group(1), {}))
            continue
        first = _PARAM.match(rest)
        if first is None:
            found.append((scheme.group(1), None))  # token68 (another scheme's credentials form)
            continue
        found.append(
            (
                scheme.group(1),
                {first.group(1).lower(): _unquote(first.group(2)) if first.group(2) is not None else first.group(3)},
            )
        )
    return found


def b64url_json(value: str, what: str, limit: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Decode base64url (padding tolerated) JSON holding an object; ``ValueError`` naming ``what`` otherwise."""
    text = value.strip()
    if len(text) > limit * 2 or not _B64URL.fullmatch(text.rstrip("=")):
        raise ValueError(f"{what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64url JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} is not a JSON object")
    return data


def _challenge(params: Mapping[str, str]) -> PaymentChallenge:
    for name in ("id", "realm", "method", "intent", "request"):
        if not params.get(name):
            raise ValueError(f"Payment challenge without {name!r}")
    method, intent = params["method"], params["intent"]
    if not _METHOD.fullmatch(method):
        raise ValueError(f"Payment challenge with an invalid method {method[:40]!r}")
    if not _INTENT.fullmatch(intent):
        raise ValueError(f"Payment challenge with an invalid intent {intent[:40]!r}")
    request = b64url_json(params["request"], "the challenge's request")
    challenge = PaymentChallenge(
        id=params["id"],
        realm=params["realm"],
        method=method,
        intent=intent,
        request_b64=params["request"],
        request=request,
        expires=params.get("expires"),
        digest=params.get("digest"),
        opaque=params.get("opaque"),
        description=params.get("description"),
        header=params.get("header"),
    )
    challenge.expires_at()  # raises on an unreadable expires
    return challenge


def header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of a header (httpx's ``get_list`` when there, else the joined value)."""
    get_list = getattr(headers, "get_list", None)
    if callable(get_list):
        values = get_list(name)
        return [str(v) for v in values]
    value = headers.get(name)
    return [] if value is None else [value]


def payment_challenges(values: Iterable[str]) -> tuple[list[PaymentChallenge], list[str]]:
    """Every well-formed ``Payment`` challenge in these ``WWW-Authenticate`` values, and what was wrong with the
    malformed ones (other schemes are ignored)."""
    challenges: list[PaymentChallenge] = []
    problems: list[str] = []
    for value in values:
        if len(value) > MAX_FIELD_BYTES:
            problems.append("a WWW-Authenticate field is too large")
            continue
        for scheme, params in auth_challenges(value):
            if scheme.lower() != "payment":
                continue
            if params is None:
                problems.append("a Payment challenge with malformed parameters")
                continue
            try:
                challenges.append(_challenge(params))
            except ValueError as exc:
                problems.append(str(exc))
    return challenges, problems


# --- evm/charge ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChargeTerms:
    """What an ``evm/charge`` request asks: ``amount`` (atomic units, the string as received in ``amount_text``)
    of ``currency`` on ``chain_id`` to ``recipient``."""

    amount: int
    amount_text: str
    currency: str
    recipient: str
    chain_id: int
    decimals: int | None


def charge_terms(request: Mapping[str, Any]) -> ChargeTerms:
    """Check an ``evm/charge`` request (amount, currency, recipient, ``methodDetails``); ``ValueError`` otherwise."""
    amount = request.get("amount")
    if not isinstance(amount, str) or not _ATOMIC.fullmatch(amount):
        raise ValueError("evm/charge amount is not a base-unit integer string")
    if int(amount) == 0:
        raise ValueError("evm/charge of zero: llm402 does not sign zero-amount charges (their nonce binds the realm)")
    if int(amount) > 2**256 - 1:
        raise ValueError("evm/charge amount does not fit in a uint256")
    currency, recipient = request.get("currency"), request.get("recipient")
    if not isinstance(currency, str) or not _ADDRESS.fullmatch(currency):
        raise ValueError("evm/charge currency is not a token address")
    if not isinstance(recipient, str) or not _ADDRESS.fullmatch(recipient):
        raise ValueError("evm/charge recipient is not an address")
    details = request.get("methodDetails")
    if not isinstance(details, Mapping):
        raise ValueError("evm/charge request without methodDetails")
    chain_id = details.get("chainId")
    if isinstance(chain_id, bool) or not isinstance(chain_id, int) or not 0 < chain_id < 2**53:
        raise ValueError("evm/charge methodDetails.chainId is not a chain id")
    types = details.get("credentialTypes")
    if not isinstance(types, list) or CREDENTIAL_TYPE not in types:
        raise ValueError("evm/charge does not accept an EIP-3009 authorization credential")
    if details.get("splits"):
        raise ValueError("evm/charge with payment splits is not supported")
    decimals = details.get("decimals")
    if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int)):
        raise ValueError("evm/charge methodDetails.decimals is not an integer")
    return ChargeTerms(int(amount), amount, currency, recipient, chain_id, decimals)


def validity_seconds(challenge: PaymentChallenge, now: float) -> tuple[int, int]:
    """``(seconds, valid_before)``: how long a credential signed now stays valid and its ``validBefore`` (the
    challenge's ``expires``, else `DEFAULT_VALIDITY_SECONDS` from now). ``ValueError`` for an expired challenge."""
    expires = challenge.expires_at()
    valid_before = int(expires) if expires is not None else int(now) + DEFAULT_VALIDITY_SECONDS
    if valid_before <= now:
        raise ValueError(f"the challenge expired at {challenge.expires}")
    return max(1, math.ceil(valid_before - now)), valid_before


def challenge_nonce(challenge_id: str, realm: str) -> str:
    """The EIP-3009 nonce of a native ``evm/charge`` credential: keccak256 of the compact JSON ``[id, realm]``."""
    from eth_utils.crypto import keccak

    text = json.dumps([challenge_id, realm], separators=(",", ":"), ensure_ascii=False)
    return "0x" + keccak(text.encode("utf-8")).hex()


def did_pkh(chain_id: int, address: str) -> str:
    """The credential ``source``: ``did:pkh:eip155:<chain>:<checksummed address>``."""
    from eth_utils.address import to_checksum_address

    return f"did:pkh:eip155:{chain_id}:{to_checksum_address(address)}"


def _mpp() -> Any:
    try:
        import mpp
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise PaymentRequiredError(
            "paying an MPP challenge needs pympp: pip install 'llm402[mpp]'", code="mpp_unavailable"
        ) from None
    return mpp


def encode_credential(challenge: PaymentChallenge, payload: Mapping[str, Any], source: str | None) -> str:
    """``Payment <base64url JSON>`` echoing the challenge (``request``, ``opaque``, ``expires``, ``digest``,
    ``header``, ``description`` exactly as received), through pympp's `Credential` encoder."""
    mpp = _mpp()
    echo = mpp.ChallengeEcho(
        id=challenge.id,
        realm=challenge.realm,
        method=challenge.method,
        intent=challenge.intent,
        request=challenge.request_b64,
        expires=challenge.expires,
        digest=challenge.digest,
        opaque=challenge.opaque,
        header=challenge.header,
        description=challenge.description,
    )
    value: str = mpp.Credential(challenge=echo, payload=dict(payload), source=source).to_authorization()
    return value


@dataclass(frozen=True, slots=True)
class PaymentReceipt:
    """A ``Payment-Receipt``: ``reference`` is the transaction (for ``evm``)."""

    status: str
    method: str
    reference: str
    timestamp: str


def read_receipt(value: str) -> PaymentReceipt:
    """Decode a ``Payment-Receipt`` through pympp's parser; ``ValueError`` when it is not one."""
    mpp = _mpp()
    try:
        receipt = mpp.Receipt.from_payment_receipt(value)
    except Exception as exc:  # pympp's ParseError, or a value its parser chokes on
        raise ValueError(f"unreadable Payment-Receipt: {str(exc)[:120]}") from None
    return PaymentReceipt(
        str(receipt.status), str(receipt.method), str(receipt.reference), receipt.timestamp.isoformat()
    )


# --- problems ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """An RFC 9457 Problem Details answer of the Payment scheme (``type`` under `PROBLEM_BASE`)."""

    kind: str
    """The type's last segment: ``verification-failed``, ``payment-expired``, ``invalid-challenge``, ..."""
    status: int | None
    title: str | None
    detail: str | None

    @property
    def replayed(self) -> bool:
        """The server says this credential (or its challenge) was already used: a sign that it settled."""
        text = (self.detail or self.title or "").lower()
        return "already" in text and "used" in text

    def reason(self) -> str:
        """A short, secret-free reason (``already_used`` marks a replayed credential)."""
        words = f"{self.kind}: {self.detail or self.title or ''}".strip().rstrip(":")
        return (words + (" (already_used)" if self.replayed else ""))[:200]


def read_problem(headers: Mapping[str, str], body: bytes | None) -> Problem | None:
    """The Payment-scheme Problem Details in a response body, if it holds one."""
    if not body or len(body) > MAX_FIELD_BYTES:
        return None
    content_type = (headers.get("content-type") or "").lower()
    if "json" not in content_type:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, Mapping):
        return None
    kind = data.get("type")
    if not isinstance(kind, str) or not kind.startswith(PROBLEM_BASE):
        return None
    status = data.get("status")
    title, detail = data.get("title"), data.get("detail")
    return Problem(
        kind[len(PROBLEM_BASE) :].strip("/")[:60] or "about:blank",
        status if isinstance(status, int) and not isinstance(status, bool) else None,
        title[:200] if isinstance(title, str) else None,
        detail[:200] if isinstance(detail, str) else None,
    )


_REJECTIONS = frozenset(
    {
        "verification-failed",
        "payment-expired",
        "invalid-challenge",
        "malformed-credential",
        "invalid-payload",
        "payment-insufficient",
    }
)


def problem_error(problem: Problem, *, paid: bool = True, reused: bool = False) -> PaymentRequiredError:
    """The typed llm402 error for a Payment-scheme problem. After a paid request (``paid``): a replayed credential
    is `PaidAnswerLost` when this call re-sent it (``reused``), a rejected one `PaymentRejected`, an internal
    payment error `PaymentOutcomeUnknown` (it may have settled); before any payment, what the server refuses."""
    reason = problem.reason()
    if paid and problem.replayed and reused:
        return PaidAnswerLost(
            f"the gateway says this call's credential was already used ({reason}): it settled and its answer was "
            "lost; llm402 will not pay twice",
            gateway_reason=reason,
        )
    if paid and problem.kind == "internal-payment-error":
        return PaymentOutcomeUnknown(
            f"the gateway failed while settling ({reason}); the payment may have moved and is not paid again",
            gateway_reason=reason,
        )
    if problem.kind in _REJECTIONS or (paid and problem.status == 403):
        return PaymentRejected(
            f"the gateway refused the payment credential: {reason}",
            code="payment_rejected",
            gateway_reason=reason,
        )
    if problem.kind == "method-unsupported":
        return PolicyRefusal(f"the gateway does not take this payment method: {reason}", code="scheme_not_supported")
    if problem.kind == "bad-request":
        return MalformedPaymentRequired(f"the gateway calls the payment request malformed: {reason}")
    return PaymentRequiredError(
        f"the gateway asks for payment: {reason}", code="payment_required", gateway_reason=reason
    )


def is_payment_refusal(status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
    """Whether an answer to a paid request refuses its credential: a 402, or a 403 with a Payment-scheme problem
    (a replayed or failed credential; never to be paid again)."""
    if status == 402:
        return True
    return status == 403 and read_problem(headers, body) is not None


# --- x402 on dual-rail routes --------------------------------------------------------------------------------

ROUTE_BINDING = "mppx"
"""The x402 extension by which pympp and mppx bind an x402 payment to its route."""


def _canonical_b64url(value: Any) -> str:
    try:
        import rfc8785
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise PaymentRequiredError(
            "paying x402 on an MPP dual-rail route needs pympp (for RFC 8785): pip install 'llm402[mpp]'",
            code="mpp_unavailable",
        ) from None
    encoded: bytes = rfc8785.dumps(value)
    return base64.urlsafe_b64encode(encoded).decode("ascii").rstrip("=")


def bound_extensions(extensions: Mapping[str, Any], salt: str | None = None) -> dict[str, Any]:
    """The ``extensions`` to echo: as received, with a fresh client salt as ``mppx.info.nonce``."""
    echoed = copy.deepcopy(dict(extensions))
    binding = echoed.get(ROUTE_BINDING)
    if not isinstance(binding, dict) or not isinstance(binding.get("info"), dict):
        raise ValueError("extensions.mppx.info is not an object")
    binding["info"]["nonce"] = salt if salt is not None else "0x" + os.urandom(32).hex()
    return echoed


def route_nonce(accepted: Mapping[str, Any], resource: Mapping[str, Any], extensions: Mapping[str, Any]) -> str:
    """The route-bound EIP-3009 nonce: ``0x`` + SHA-256 hex of ``b64url(JCS(accepted)) | b64url(JCS(resource)) |
    b64url(JCS(extensions))`` (the echoed extensions, salt included), as pympp's and mppx's servers check it."""
    joined = "|".join(_canonical_b64url(value) for value in (accepted, resource, extensions))
    return "0x" + hashlib.sha256(joined.encode("utf-8")).hexdigest()


def has_route_binding(extensions: Mapping[str, Any] | None) -> bool:
    """Whether a ``PAYMENT-REQUIRED`` asks for mppx's route binding."""
    binding = extensions.get(ROUTE_BINDING) if extensions else None
    return isinstance(binding, Mapping) and isinstance(binding.get("info"), Mapping)
