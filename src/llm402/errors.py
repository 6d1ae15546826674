"""Typed errors. Refusals travel as a local 402 envelope and are rebuilt here on the caller's side.

A refusal is never retried: the envelope carries ``x-should-retry: false`` and every error names what was refused
and why, with the amounts involved, and never a secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

REFUSAL_HEADER = "x-llm402-refusal"


class Llm402Error(Exception):
    """Base class of every error llm402 raises."""

    code: ClassVar[str] = "llm402_error"


class ConfigurationError(Llm402Error, ValueError):
    """A policy, URL, key or option is invalid; the message names the field and the problem."""

    code = "configuration_error"


class ReservationHeld(ConfigurationError):
    """A reservation with this id is already open (a call id reused, or a top-up or key mint in flight elsewhere)."""


class LedgerInterrupted(Llm402Error):
    """The thread committing a batch of ledger writes (this one among them) was interrupted (Ctrl-C) before it could
    say how the batch ended: whether this write was committed is unknown. A reservation left behind is released by
    its expiry, like a crashed process's."""

    def __init__(self) -> None:
        super().__init__("interrupted while committing a batch of ledger writes: this write may or may not be stored")


class WalletError(Llm402Error):
    """The wallet could not be loaded or could not sign (messages never contain key material)."""

    code = "wallet_error"


class PaymentRequiredError(Llm402Error):
    """A call that was not paid: refused locally, or the gateway's payment flow failed.

    ``details`` holds machine-readable facts (amounts in micro-USDC, the gateway's reason, ...).
    """

    code = "payment_required"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]
        self.details: dict[str, Any] = details

    def envelope(self) -> dict[str, Any]:
        """The JSON body of the local 402 answer."""
        return {"error": {"code": self.code, "type": "llm402_refusal", "message": self.message, **self.details}}


class PolicyRefusal(PaymentRequiredError):
    """The policy does not allow this call or this payment (intent, model, ticket, network, asset, payee...)."""

    code = "policy_refused"


class BudgetExceeded(PolicyRefusal):
    """Reserving this call would exceed a cap (daily, total or global)."""

    code = "budget_exceeded"


class InsecureGateway(PolicyRefusal):
    """A payment would go over plain HTTP to a non-loopback host on a real network."""

    code = "insecure_gateway"


class MalformedPaymentRequired(PaymentRequiredError):
    """The gateway's 402 could not be parsed (bad base64, bad JSON, missing fields, invalid amounts)."""

    code = "malformed_payment_required"


class PaymentRejected(PaymentRequiredError):
    """The gateway answered the paid replay with another 402; llm402 does not pay again."""

    code = "payment_rejected"


class PaymentOutcomeUnknown(PaymentRequiredError):
    """A payment for this call already went out and its answer was lost; llm402 will not sign a second one."""

    code = "payment_outcome_unknown"


class PaidAnswerLost(PaymentOutcomeUnknown):
    """The gateway shows that this call's payment settled, but its answer never arrived; retrying the same request
    re-sends the same authorization and gets this again (llm402 never signs a second one while it can settle)."""

    code = "paid_answer_lost"


class PriceUnknown(PolicyRefusal):
    """Under a cap, a metered call to a model without a known price is refused before any traffic."""

    code = "price_unknown"


class InsufficientBalance(PaymentRequiredError):
    """A gateway asked for more credit and this gateway is not configured to top up (or one top-up was not enough)."""

    code = "insufficient_balance"


class ApiKeyRejected(PaymentRequiredError):
    """A credit gateway rejected the API key (revoked or invalid); the message names the fix."""

    code = "api_key_rejected"


class SignerError(PaymentRequiredError):
    """The signer failed to produce a payment signature."""

    code = "signer_error"


_REFUSALS: dict[str, type[PaymentRequiredError]] = {
    "budget_exceeded": BudgetExceeded,
    "insecure_gateway": InsecureGateway,
    "malformed_payment_required": MalformedPaymentRequired,
    "payment_rejected": PaymentRejected,
    "payment_outcome_unknown": PaymentOutcomeUnknown,
    "paid_answer_lost": PaidAnswerLost,
    "price_unknown": PriceUnknown,
    "insufficient_balance": InsufficientBalance,
    "signer_error": SignerError,
    "api_key_rejected": ApiKeyRejected,
}
POLICY_CODES = frozenset(
    {
        "intent_not_allowed",
        "model_not_allowed",
        "payment_over_ticket",
        "network_not_allowed",
        "asset_not_allowed",
        "payee_not_allowed",
        "scheme_not_supported",
        "validity_too_long",
        "no_acceptable_requirement",
        "approval_denied",
        "topup_refused",
        "policy_unavailable",
        "price_unknown",
        "ledger_rolled_back",
    }
)


def refusal_class(code: str) -> type[PaymentRequiredError]:
    """The exception class for an envelope code."""
    if code in _REFUSALS:
        return _REFUSALS[code]
    if code in POLICY_CODES:
        return PolicyRefusal
    return PaymentRequiredError


def refusal_from_envelope(body: bytes | str | Mapping[str, Any] | None) -> PaymentRequiredError | None:
    """Rebuild the typed error from a local 402 envelope; ``None`` if the body is not one."""
    data: Any = body
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body)
        except ValueError:
            return None
    if not isinstance(data, Mapping):
        return None
    err = data.get("error")
    if not isinstance(err, Mapping) or err.get("type") != "llm402_refusal":
        return None
    code = str(err.get("code", "payment_required"))
    details = {k: v for k, v in err.items() if k not in {"code", "type", "message"}}
    return refusal_class(code)(str(err.get("message", code)), code=code, **details)


class GatewayError(Llm402Error):
    """An error the gateway itself answered (the AIsa router skill's and Token Kiosk's error tables)."""

    code = "gateway_error"

    def __init__(self, message: str, *, status: int, code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        if code is not None:
            self.code = code  # type: ignore[misc]
        self.retry_after = retry_after


class GatewayValidationError(GatewayError):
    """400: missing or invalid parameters, unknown model, rejected fields."""


class GatewayAuthError(GatewayError):
    """401: missing, invalid or revoked API key (or SIWE signature)."""


class InsufficientCredits(GatewayError):
    """402 without x402 requirements: the prepaid credit is exhausted (top up, or use another key)."""


class ModelNotFound(GatewayError):
    """404: the model (or resource) does not exist on this gateway."""


class GatewayNotFound(GatewayError):
    """404 for something other than a model: usually a wrong base URL or path."""


class GatewayRateLimited(GatewayError):
    """429: slow down; ``retry_after`` seconds when the gateway said."""


class GatewayServerError(GatewayError):
    """5xx: the gateway or its upstream provider failed."""


def gateway_error(status: int, body: bytes | str, retry_after: str | None = None) -> GatewayError | None:
    """The typed error for a gateway's error answer (AIsa ``{"error": {"code", "message"}}`` or Token Kiosk
    ``{"error": "CODE", "message"}``); ``None`` for a success or an llm402 refusal."""
    if status < 400:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    err = data.get("error") if isinstance(data, Mapping) else None
    if isinstance(err, Mapping):
        if err.get("type") == "llm402_refusal":
            return None
        code, message = err.get("code"), err.get("message")
    else:
        code, message = err, data.get("message") if isinstance(data, Mapping) else None
    code_text = str(code) if code else f"http_{status}"
    text = f"HTTP {status} {code_text}: {message or 'no message'}"[:500]
    kind: type[GatewayError]
    if status in {400, 422}:
        kind = GatewayValidationError
    elif status in (401, 403):
        kind = GatewayAuthError
    elif status == 402:
        kind = InsufficientCredits
    elif status == 404:  # only a 404 that names a model is about the model (a wrong base path is not)
        kind = ModelNotFound if "model" in f"{code_text} {message}".lower() else GatewayNotFound
    elif status == 429:
        kind = GatewayRateLimited
    elif status >= 500:
        kind = GatewayServerError
    else:
        kind = GatewayError
    seconds: float | None = None
    if retry_after:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = None
    return kind(text, status=status, code=code_text.lower(), retry_after=seconds)
