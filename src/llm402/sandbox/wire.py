"""What the sandbox facilitator's EIP-3009 and Permit2 checks share: strict field parsing and the refusal they raise."""

from __future__ import annotations

import re
from typing import Any

UINT256_MAX = 2**256 - 1
VALIDITY_SLACK_SECONDS = 30
"""How far beyond ``maxTimeoutSeconds`` a payment's end of validity may reach before it is ``validity_too_long``."""
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_UINT = re.compile(r"^[0-9]{1,78}$")


class Refusal(Exception):
    """A payment the facilitator will not settle: a machine-readable ``reason`` and a human message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def uint256(value: Any, name: str) -> int:
    """A uint256 given as a JSON integer or a decimal string; raises ``ValueError`` naming the field."""
    if isinstance(value, bool):
        raise ValueError(f"{name} is not an unsigned integer")
    if isinstance(value, int) and 0 <= value <= UINT256_MAX:
        return value
    if isinstance(value, str) and _UINT.match(value) and int(value) <= UINT256_MAX:
        return int(value)
    raise ValueError(f"{name} is not an unsigned integer string")


def address(value: Any, name: str) -> str:
    """A 0x-prefixed 20-byte hex address; raises ``ValueError`` naming the field."""
    if not isinstance(value, str) or not _ADDRESS.match(value):
        raise ValueError(f"{name} is not an address")
    return value
