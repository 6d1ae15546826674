"""The OpenAI SDK adapter: an unchanged ``openai.OpenAI`` / ``AsyncOpenAI`` on llm402's http clients.

Nothing here is required: ``openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key, http_client=gw.http_client())``
works as is. These helpers add the typed view of refusals (``openai.APIStatusError`` 402 -> llm402 error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai

from .errors import PaymentRequiredError, refusal_from_envelope

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
    if isinstance(error, openai.APIStatusError) and error.status_code == 402:
        return refusal_from_envelope(error.response.content)
    return None
