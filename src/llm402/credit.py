"""Credit gateways (Token Kiosk, AIsa ``api_key_proxy``): SIWE messages, top-up sizing, where minted keys live.

Everything here is pure except `store_key`, which the engine calls. Top-ups are transfers into prepaid credit, not
consumption: caps count what calls cost, and a top-up is only allowed when it fits in what the caps have left.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import ConfigurationError, PolicyRefusal
from .money import ATOMIC_PER_USD, atomic_to_usd, format_usd
from .policy import Policy

SIWE_STATEMENT = "Sign in to the AI Gateway"


@dataclass(frozen=True, slots=True)
class CreditProfile:
    """Where a credit gateway keeps its credit endpoints (paths relative to its OpenAI base URL, e.g. ``.../v1``)."""

    topup_path: str = "/topup"
    keys_path: str = "/auth/keys"
    balance_path: str = "/balance/{wallet}"
    usage_path: str = "/usage/{wallet}"
    topups_path: str = "/topups/{wallet}"
    min_topup: int = 1 * ATOMIC_PER_USD
    chain_id: int | None = None
    statement: str = SIWE_STATEMENT
    insufficient_codes: frozenset[str] = frozenset({"INSUFFICIENT_BALANCE"})


def topup_body(amount: int) -> bytes:
    """The top-up request body, ``{"amount": <USD>}``, with the USD number written exactly (no float on the way)."""
    usd = atomic_to_usd(amount).normalize()
    return b'{"amount":' + format(usd, "f").encode() + b"}"


def siwe_message(address: str, uri: str, chain_id: int, statement: str = SIWE_STATEMENT) -> str:
    """A fresh EIP-4361 message (new nonce, ``issuedAt`` now) for the endpoint ``uri``: the domain is its
    host[:port] and the uri the endpoint itself, as the gateway presents them."""
    from urllib.parse import urlsplit

    from siwe import SiweMessage

    message = SiweMessage(
        domain=urlsplit(uri).netloc,
        address=address,
        uri=uri,
        version="1",
        chain_id=chain_id,
        issued_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        nonce=secrets.token_hex(8),
        statement=statement,
    )
    text: str = message.prepare_message()
    return text


def topup_amount(needed: int, gateway_min: int, policy: Policy, remaining: int | None) -> int:
    """How much to top up: at least what the call needs, the gateway's minimum and the policy's preferred size;
    never above the policy's top-up limit or the budget left. Raises `PolicyRefusal` (``topup_refused``)."""
    amount = max(needed, gateway_min, policy.topup_min or 0)
    limit = policy.topup_max
    if limit is not None and amount > limit:
        raise PolicyRefusal(
            f"a top-up of {format_usd(amount)} is above the policy's top-up limit of {format_usd(limit)}",
            code="topup_refused",
            requested=amount,
            cap=limit,
        )
    if remaining is not None and amount > remaining:
        raise PolicyRefusal(
            f"a top-up of {format_usd(amount)} is above the {format_usd(remaining)} the budget has left",
            code="topup_refused",
            requested=amount,
            remaining=remaining,
        )
    return amount


def store_key(target: str, key: str) -> None:
    """Keep a minted API key: ``env:NAME`` sets an environment variable of this process; anything else is a file
    path, written with mode 0600 (created, or replaced atomically)."""
    if target.startswith("env:"):
        name = target[4:]
        if not name:
            raise ConfigurationError("key store 'env:' needs a variable name, e.g. env:LLM402_API_KEY")
        os.environ[name] = key
        return
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.replace(tmp, path)


def load_key(target: str | None) -> str | None:
    """A key kept by `store_key`, if there is one."""
    if not target:
        return None
    if target.startswith("env:"):
        return os.environ.get(target[4:]) or None
    path = Path(target).expanduser()
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
