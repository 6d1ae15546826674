"""External settlement: an approver consulted before anything is signed.

It may approve (llm402 signs), deny (the caller gets the local 402 envelope, ``approval_denied``) or hand back a
payment header produced elsewhere (a treasury service, a human with a hardware wallet), which llm402 replays as is.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .x402 import Dialect, Requirement, SignedPayment


@dataclass(frozen=True, slots=True)
class PaymentProposal:
    """What the approver is asked to decide on."""

    kind: Literal["call", "topup"]
    agent: str
    intent: str | None
    url: str
    model: str | None
    dialect: Dialect
    requirement: Requirement

    @property
    def amount(self) -> int:
        """The amount asked, in atomic units."""
        return self.requirement.amount


@dataclass(frozen=True, slots=True)
class Approval:
    """An approver's answer. Build it with `approve`, `deny` or `external`."""

    decision: Literal["approve", "deny", "external"]
    reason: str | None = None
    header_value: str | None = None

    @classmethod
    def approve(cls) -> Approval:
        """Let llm402 sign."""
        return cls("approve")

    @classmethod
    def deny(cls, reason: str = "denied by the approver") -> Approval:
        """Refuse: nothing is signed and the caller gets a typed refusal."""
        return cls("deny", reason=reason)

    @classmethod
    def external(cls, header_value: str) -> Approval:
        """Replay with this payment header (base64 x402 payload) obtained elsewhere."""
        return cls("external", header_value=header_value)


Approver = Callable[[PaymentProposal], "Approval | bool"]


def external_payment(proposal: PaymentProposal, header_value: str) -> SignedPayment:
    """A `SignedPayment` around a header produced elsewhere (its nonce and validity read when they can be)."""
    authorization: Mapping[str, Any] = {}
    try:
        data = json.loads(base64.b64decode(header_value, validate=True))
        inner = data.get("payload", {}) if isinstance(data, Mapping) else {}
        found = inner.get("authorization", {}) if isinstance(inner, Mapping) else {}
        authorization = found if isinstance(found, Mapping) else {}
    except ValueError:
        authorization = {}
    valid_before = authorization.get("validBefore")
    return SignedPayment(
        header_name=proposal.dialect.replay_header,
        header_value=header_value,
        requirement=proposal.requirement,
        payer=str(authorization.get("from", "external")),
        nonce=str(authorization.get("nonce", "")),
        valid_before=int(str(valid_before)) if str(valid_before or "").isdigit() else 0,
    )
