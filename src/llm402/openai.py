"""The OpenAI SDK adapter: an unchanged ``openai.OpenAI`` / ``AsyncOpenAI`` on llm402's http clients.

Nothing here is required: ``openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client())``
works as is. These helpers add the typed view of refusals (``openai.APIStatusError`` 402 -> llm402 error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai

from .errors import Llm402Error, PaymentRequiredError, gateway_error, refusal_from_envelope

if TYPE_CHECKING:
    from .gateway import Gateway


def openai_client(gateway: Gateway, **kwargs: Any) -> openai.OpenAI:
    """``openai.OpenAI`` paying through ``gateway`` (its own ``max_retries`` stay safe: llm402 never pays twice)."""
    return openai.OpenAI(
        base_url=gateway.base_url, api_key=gateway.api_key, http_client=gateway.http_client(), **kwargs
    )


def async_openai_client(gateway: Gateway, **kwargs: Any) -> openai.AsyncOpenAI:
    """``openai.AsyncOpenAI`` paying through ``gateway``."""
    return openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=gateway.api_key, http_client=gateway.async_http_client(), **kwargs
    )


def refusal_from_error(error: BaseException) -> PaymentRequiredError | None:
    """The llm402 refusal behind an ``openai.APIStatusError`` (``None`` if it is a gateway's own error)."""
    if isinstance(error, openai.APIStatusError):
        return refusal_from_envelope(error.response.content)  # 402 refusals, and a rejected key's 401
    return None


def typed_error(error: BaseException) -> Llm402Error | None:
    """The llm402 view of an ``openai.APIStatusError``: a refusal, or the gateway's error mapped by its table
    (401 `GatewayAuthError`, 402 `InsufficientCredits`, 404 `ModelNotFound`, 429 `GatewayRateLimited`, 5xx ...)."""
    if not isinstance(error, openai.APIStatusError):
        return None
    refusal = refusal_from_error(error)
    if refusal is not None:
        return refusal
    response = error.response
    return gateway_error(response.status_code, response.content, response.headers.get("retry-after"))
