"""Refusals as LangChain sees them.

Each class is both the llm402 error (so ``except BudgetExceeded`` keeps working) and a
``langchain_core.exceptions.ModelError`` (so ``.with_fallbacks(exceptions_to_handle=(GatewayBudgetExceeded,))`` and
LangChain's own error handling recognise it). A refusal is never retryable: retrying cannot make a policy allow a
call or a budget grow.
"""

from __future__ import annotations

from collections.abc import Sequence

import openai
from langchain_core.exceptions import ModelError

from ..errors import (
    BudgetExceeded,
    InsecureGateway,
    InsufficientCredits,
    MalformedPaymentRequired,
    PaymentOutcomeUnknown,
    PaymentRejected,
    PaymentRequiredError,
    PolicyRefusal,
    SignerError,
    gateway_error,
)
from ..openai import refusal_from_error
from ..receipts import Receipt


class GatewayPaymentError(PaymentRequiredError, ModelError):
    """A call the gateway was not paid for: refused by llm402's policy or budget, or the payment failed.

    ``code`` is the machine-readable reason (``budget_exceeded``, ``intent_not_allowed``, ...), ``details`` the
    amounts involved (micro-USDC), and ``receipts`` the receipts the call left (cost included, if any was paid).
    """

    is_retryable = False
    receipts: tuple[Receipt, ...] = ()


class GatewayPolicyRefusal(GatewayPaymentError, PolicyRefusal):
    """The policy does not allow this call or this payment (before any money moved)."""


class GatewayIntentNotAllowed(GatewayPolicyRefusal):
    """The agent's intent is not in the policy's ``allowed_intents`` (refused before any network traffic)."""

    code = "intent_not_allowed"


class GatewayModelNotAllowed(GatewayPolicyRefusal):
    """The model is not allowed (``allowed_models``, or ``models_by_intent`` for this intent)."""

    code = "model_not_allowed"


class GatewayBudgetExceeded(GatewayPolicyRefusal, BudgetExceeded):
    """Paying for this call would exceed a cap (daily, total or global)."""


class GatewayInsecureGateway(GatewayPolicyRefusal, InsecureGateway):
    """Paying would send a payment over plain HTTP to a non-loopback host on a real network."""


class GatewayMalformedPaymentRequired(GatewayPaymentError, MalformedPaymentRequired):
    """The gateway's 402 could not be understood, so nothing was paid."""


class GatewayPaymentRejected(GatewayPaymentError, PaymentRejected):
    """The gateway refused the signed payment; llm402 does not pay twice."""


class GatewayPaymentOutcomeUnknown(GatewayPaymentError, PaymentOutcomeUnknown):
    """A payment for this call already went out and its answer was lost; llm402 will not sign a second one."""


class GatewaySignerError(GatewayPaymentError, SignerError):
    """No wallet is configured, or it could not sign."""


class GatewayInsufficientCredits(InsufficientCredits, ModelError):
    """The gateway's own 402 without x402 requirements: a credit balance is exhausted (top up, or use another key)."""

    is_retryable = False
    receipts: tuple[Receipt, ...] = ()


PAYMENT_ERRORS: tuple[type[Exception], ...] = (GatewayPaymentError, GatewayInsufficientCredits)
"""Every "this call was not paid for" error, for ``.with_fallbacks(exceptions_to_handle=PAYMENT_ERRORS)``."""


# Most specific first: the first class the refusal is an instance of wins.
_BY_CODE: dict[str, type[GatewayPaymentError]] = {
    "intent_not_allowed": GatewayIntentNotAllowed,
    "model_not_allowed": GatewayModelNotAllowed,
}
_BY_CLASS: tuple[tuple[type[PaymentRequiredError], type[GatewayPaymentError]], ...] = (
    (BudgetExceeded, GatewayBudgetExceeded),
    (InsecureGateway, GatewayInsecureGateway),
    (PolicyRefusal, GatewayPolicyRefusal),
    (MalformedPaymentRequired, GatewayMalformedPaymentRequired),
    (PaymentRejected, GatewayPaymentRejected),
    (PaymentOutcomeUnknown, GatewayPaymentOutcomeUnknown),
    (SignerError, GatewaySignerError),
)


def refusal_error(
    refusal: PaymentRequiredError, *, model: str | None = None, receipts: Sequence[Receipt] = ()
) -> GatewayPaymentError:
    """The LangChain-facing error for an llm402 refusal, naming the model and keeping the code and details."""
    cls = _BY_CODE.get(refusal.code) or next(
        (ours for theirs, ours in _BY_CLASS if isinstance(refusal, theirs)), GatewayPaymentError
    )
    where = f" (model {model!r})" if model else ""
    error = cls(f"llm402 [{refusal.code}]{where}: {refusal.message}", code=refusal.code, **refusal.details)
    error.receipts = tuple(receipts)
    return error


def error_from_openai(
    exc: BaseException, *, model: str | None = None, receipts: Sequence[Receipt] = ()
) -> GatewayPaymentError | GatewayInsufficientCredits | None:
    """The typed error behind an ``openai.APIStatusError`` 402 (``None`` for any other error).

    A local llm402 envelope becomes its exact class; a 402 the gateway itself sent and llm402 could not settle by
    paying (a credit gateway whose balance is gone) becomes `GatewayInsufficientCredits`. Other gateway errors keep
    langchain-openai's mapping (``ModelRateLimitError`` for 429, ``ModelAPIError`` for 5xx, ...).
    """
    if not isinstance(exc, openai.APIStatusError) or exc.status_code != 402:
        return None
    refusal = refusal_from_error(exc)
    if refusal is not None:
        return refusal_error(refusal, model=model, receipts=receipts)
    credits = gateway_error(402, exc.response.content, exc.response.headers.get("retry-after"))
    code = credits.code if credits is not None else "insufficient_credits"
    where = f" (model {model!r})" if model else ""
    text = credits.message if credits is not None else "HTTP 402"
    error = GatewayInsufficientCredits(
        f"llm402 [{code}]{where}: the gateway asks for credit: {text}", status=402, code=code
    )
    error.receipts = tuple(receipts)
    return error
