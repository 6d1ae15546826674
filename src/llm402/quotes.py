"""Quotes: what a request would cost, read from the gateway's 402 without paying (AIsa's ``x402_probe``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import PaymentRequiredError
from .money import format_usd
from .policy import Policy
from .x402 import Challenge, Requirement, parse_challenge, select_requirement


@dataclass(frozen=True, slots=True)
class Quote:
    """The requirement llm402 would pay for a request, and every option the gateway offered."""

    requirement: Requirement
    challenge: Challenge
    quoted_at: float

    @property
    def amount(self) -> int:
        """Atomic units (micro-USDC for USDC); for the ``upto`` scheme the ceiling, not the final cost."""
        return self.requirement.amount

    @property
    def valid_until(self) -> float:
        """Unix time until which an authorization signed now would stay valid."""
        return self.quoted_at + self.requirement.max_timeout_seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            **self.requirement.describe(),
            "amount_usd": format_usd(self.amount),
            "dialect": self.challenge.dialect.value,
            "valid_until": self.valid_until,
            "options": [r.describe() for r in self.challenge.requirements],
        }

    @classmethod
    def from_response(cls, status: int, headers: Mapping[str, str], body: bytes, policy: Policy) -> Quote:
        """Read a quote from an unpaid answer; typed errors when there is none or the policy would not pay it."""
        if status != 402:
            raise PaymentRequiredError(
                f"the gateway did not ask for payment (HTTP {status}); nothing to quote", code="no_quote", status=status
            )
        challenge = parse_challenge(headers, body)
        if challenge is None:
            raise PaymentRequiredError(
                f"the gateway's 402 holds no x402 requirements: {body[:200].decode(errors='replace')}",
                code="no_quote",
                status=status,
            )
        return cls(select_requirement(challenge, policy), challenge, time.time())
