"""`llm402.errors_any` reads llm402's refusal out of any shape an SDK keeps it in: an httpx ``HTTPStatusError`` of a
real refused call, the OpenAI SDKs' ``.body`` (only the ``error`` object), a body-less error with the refusal header,
a framework's error whose ``__cause__`` is the SDK's; gateway errors by their table; the retry predicate."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from llm402 import BudgetExceeded, Gateway, Policy, PolicyRefusal, Wallet
from llm402.errors import GatewayRateLimited, GatewayValidationError
from llm402.errors_any import refusal_of, retryable, typed_error, typed_errors
from llm402.sandbox import SandboxServer

BODY = {"model": "sandbox/small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


class SdkError(Exception):
    """An SDK's HTTP error as some keep it: a status, a parsed body, headers, no response."""

    def __init__(self, status_code: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"Error code: {status_code}")
        self.status_code, self.body, self.headers = status_code, body, headers


class FrameworkError(Exception):
    """A framework's own error raised from the SDK's."""


def test_httpx_status_error_of_a_real_refusal(sandbox: SandboxServer, wallet: Wallet) -> None:
    gw = Gateway(f"{sandbox.url}/v1", wallet=wallet, ledger="memory://", policy=Policy(daily_cap_usd="0.000001"))
    with gw.http_client() as client:
        response = client.post(f"{gw.base_url}/chat/completions", json=BODY)
    with pytest.raises(httpx.HTTPStatusError) as caught:
        response.raise_for_status()
    refusal = typed_error(caught.value)
    assert isinstance(refusal, BudgetExceeded) and refusal.details["requested"] > 0
    assert retryable(caught.value) is False
    with pytest.raises(BudgetExceeded), typed_errors():
        response.raise_for_status()


def test_the_shapes_sdks_keep_a_refusal_in() -> None:
    envelope = {"code": "model_not_allowed", "type": "llm402_refusal", "message": "no", "model": "m"}
    only_error = SdkError(402, body=envelope)  # the OpenAI SDKs keep the "error" object as .body
    assert isinstance(refusal_of(only_error), PolicyRefusal)
    assert refusal_of(only_error).details == {"model": "m"}  # type: ignore[union-attr]
    headers_only = SdkError(402, headers={"x-llm402-refusal": "budget_exceeded"})
    assert isinstance(typed_error(headers_only), BudgetExceeded)
    try:
        try:
            raise SdkError(402, body={"error": envelope})
        except SdkError as sdk:
            raise FrameworkError("model request failed") from sdk
    except FrameworkError as framework:
        assert isinstance(typed_error(framework), PolicyRefusal)
        assert retryable(framework) is False


def test_gateway_errors_and_the_retry_predicate() -> None:
    limited = SdkError(429, body={"error": {"code": "rate_limited", "message": "slow"}}, headers={"retry-after": "2"})
    typed = typed_error(limited)
    assert isinstance(typed, GatewayRateLimited) and typed.retry_after == 2.0
    assert retryable(limited) is True
    invalid = SdkError(400, body={"code": "bad", "message": "no"})
    assert isinstance(typed_error(invalid), GatewayValidationError)
    assert retryable(invalid) is False
    assert retryable(SdkError(503)) is True
    assert typed_error(ConnectionError("down")) is None and retryable(ConnectionError("down")) is True
    with pytest.raises(ValueError), typed_errors():
        raise ValueError("not a refusal")
