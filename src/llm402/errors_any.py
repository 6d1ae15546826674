"""llm402's refusals out of ANY SDK's HTTP error: the OpenAI and Anthropic SDKs, LiteLLM, PydanticAI, httpx.

A call llm402 refuses (a policy, a cap, a payment it will not sign) is answered locally with a 402 envelope
(``{"error": {"type": "llm402_refusal", "code": ...}}``, ``x-llm402-refusal: <code>``, ``x-should-retry: false``).
Every SDK turns that answer into an exception of its own; `typed_error` reads the status, body and headers from
whatever the exception carries (``response``, ``body``, ``status_code``, ``headers``, the SDK's error behind a
framework's in ``__cause__`` / ``__context__``) and returns the typed llm402 error. No SDK is imported here.

Retry layers: `retryable` is ``False`` for a refusal (retrying cannot make a policy allow a call or a cap grow)
and for a gateway's own final errors, so it can be given to a retry layer that takes a predicate
(``langchain.agents.middleware.ModelRetryMiddleware(retry_on=retryable)``, tenacity's ``retry_if_exception``).
`typed_errors` re-raises a refusal as its typed llm402 error (``raise ... from`` the SDK's), so code around a
framework can ``except BudgetExceeded``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .errors import (
    REFUSAL_HEADER,
    GatewayError,
    Llm402Error,
    PaymentRequiredError,
    gateway_error,
    refusal_class,
    refusal_from_envelope,
)

__all__ = ["error_chain", "refusal_of", "retryable", "typed_error", "typed_errors"]

_MAX_CHAIN = 16
_MAX_BODY = 64 * 1024
_RETRYABLE_GATEWAY_STATUS = frozenset({408, 409, 429})


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then the errors behind it (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(current))
        yield current
        current = current.__cause__ if current.__cause__ is not None else current.__context__


def _status(error: BaseException, response: Any) -> int | None:
    for value in (getattr(error, "status_code", None), getattr(error, "status", None)):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    value = getattr(response, "status_code", None) if response is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _response_body(response: Any) -> bytes | None:
    """The body of an httpx / httpx2 response that was read (a streamed one that was not is left alone)."""
    if response is None:
        return None
    try:
        content = response.content
    except Exception:  # an unread stream (httpx.ResponseNotRead), a closed one
        return None
    return content if isinstance(content, bytes) else None


def _headers(error: BaseException, response: Any) -> Mapping[str, Any] | None:
    for source in (getattr(response, "headers", None), getattr(error, "headers", None)):
        if source is not None and hasattr(source, "get"):
            return source  # type: ignore[no-any-return]
    headers = getattr(error, "litellm_response_headers", None)
    return headers if headers is not None and hasattr(headers, "get") else None


def _envelope(body: Any) -> PaymentRequiredError | None:
    """A refusal from a body as an SDK keeps it: bytes, text, the whole JSON, or only its ``error`` object."""
    if isinstance(body, bytes | bytearray):
        body = bytes(body[:_MAX_BODY])
    elif isinstance(body, str):
        body = body[:_MAX_BODY]
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if isinstance(body, Mapping):
        if body.get("type") == "llm402_refusal":  # the OpenAI SDKs keep only the "error" object as .body
            return refusal_from_envelope({"error": body})
        return refusal_from_envelope(body)
    return None


def _refusal_in(error: BaseException) -> PaymentRequiredError | None:
    if isinstance(error, PaymentRequiredError):
        return error
    response = getattr(error, "response", None)
    for body in (_response_body(response), getattr(error, "body", None)):
        if body is not None and (refusal := _envelope(body)) is not None:
            return refusal
    headers = _headers(error, response)
    code = headers.get(REFUSAL_HEADER) if headers is not None else None
    if isinstance(code, str) and code and _status(error, response) in (None, 401, 402):
        message = str(getattr(error, "message", None) or error)[:500]
        return refusal_class(code)(message, code=code)  # the body was not kept: the code from the header
    return None


def refusal_of(error: BaseException) -> PaymentRequiredError | None:
    """The llm402 refusal behind ``error`` or any error it was raised from; ``None`` if there is none."""
    for inner in error_chain(error):
        refusal = _refusal_in(inner)
        if refusal is not None:
            return refusal
    return None


def _gateway_error_in(error: BaseException) -> GatewayError | None:
    if isinstance(error, GatewayError):
        return error
    response = getattr(error, "response", None)
    status = _status(error, response)
    if status is None or status < 400:
        return None
    body = _response_body(response)
    if body is None:
        raw = getattr(error, "body", None)
        if isinstance(raw, Mapping):
            raw = {"error": raw} if "error" not in raw else raw
            body = json.dumps(raw, default=str).encode()
        elif isinstance(raw, str | bytes):
            body = raw.encode() if isinstance(raw, str) else raw
        else:
            body = b""
    headers = _headers(error, response)
    retry_after = headers.get("retry-after") if headers is not None else None
    return gateway_error(status, body[:_MAX_BODY], retry_after if isinstance(retry_after, str) else None)


def typed_error(error: BaseException) -> Llm402Error | None:
    """The llm402 view of any SDK's HTTP error: the refusal it carries (`BudgetExceeded`, `PolicyRefusal`, ...),
    else the gateway's error mapped by its table (401 `GatewayAuthError`, 402 `InsufficientCredits`, 404
    `ModelNotFound`, 429 `GatewayRateLimited`, 5xx `GatewayServerError`); ``None`` when no HTTP answer is behind it.

    Reads the OpenAI and Anthropic SDKs' ``APIStatusError``, LiteLLM's exceptions, PydanticAI's ``ModelHTTPError``
    (and the SDK error in its ``__cause__``), httpx's / httpx2's ``HTTPStatusError``, and any exception with a
    ``response``, or a ``status_code`` and ``body``."""
    refusal = refusal_of(error)
    if refusal is not None:
        return refusal
    for inner in error_chain(error):
        typed = _gateway_error_in(inner)
        if typed is not None:
            return typed
    return None


def retryable(error: BaseException) -> bool:
    """Whether retrying may help: never for an llm402 refusal or a gateway's final answer (400, 401, 402, 403,
    404, 422); otherwise what the error says of itself (``is_retryable``, e.g. LangChain's ``ModelError``), else
    ``True``. A predicate for retry layers: ``ModelRetryMiddleware(retry_on=retryable)``."""
    if refusal_of(error) is not None:
        return False
    for inner in error_chain(error):
        typed = _gateway_error_in(inner)
        if typed is not None:
            return typed.status in _RETRYABLE_GATEWAY_STATUS or typed.status >= 500
    flag = getattr(error, "is_retryable", None)
    return flag if isinstance(flag, bool) else isinstance(error, Exception)


@contextmanager
def typed_errors() -> Iterator[None]:
    """Re-raise an SDK's or a framework's error that carries an llm402 refusal as the typed llm402 error
    (``raise refusal from error``); every other error passes unchanged.

    ``with typed_errors(): agent.run_sync(...)`` lets the caller ``except BudgetExceeded``."""
    try:
        yield
    except Exception as exc:
        refusal = refusal_of(exc)
        if refusal is None or refusal is exc:
            raise
        raise refusal from exc
