"""Wallet authentication for the Token Kiosk API: SIWE (EIP-4361) messages and ``sk-`` API keys.

A SIWE message is accepted when it parses (the ``siwe`` package), its domain is the request's ``Host``, its URI is
``{scheme}://{host}/v1/auth/keys`` (or that path under the mount prefix), its chain id is the sandbox's, its
statement is the configured one (when configured), ``issuedAt`` is within the last 5 minutes (60 s of clock skew
allowed), ``expirationTime`` / ``notBefore`` hold, the EIP-191 signature recovers to its address, and its nonce
was never used before. Each failure answers 401 with a message naming the reason.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .config import SandboxConfig
from .store import ApiKeyRow, Store

SIWE_MAX_AGE_SECONDS = 300
SIWE_CLOCK_SKEW_SECONDS = 60
API_KEY_PREFIX = "sk-"


class Unauthorized(Exception):
    """401 UNAUTHORIZED with a message that names the reason."""


@dataclass(frozen=True, slots=True)
class SiweContext:
    """What a SIWE message must match: the request's host and scheme, and the mount it came through."""

    host: str
    scheme: str
    prefix: str = ""


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh ``sk-`` + 64 hex key."""
    return API_KEY_PREFIX + secrets.token_hex(32)


def key_owner(store: Store, key: str | None) -> ApiKeyRow:
    """The active key row for ``key``. Raises `Unauthorized`."""
    if not key:
        raise Unauthorized("Missing API key")
    row = store.key_by_hash(hash_key(key))
    if row is None:
        raise Unauthorized("Invalid API key")
    if row.revoked_at is not None:
        raise Unauthorized("API key has been revoked")
    return row


def _when(value: Any) -> datetime:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def verify_siwe(
    config: SandboxConfig, store: Store, ctx: SiweContext, message: Any, signature: Any, *, now: float | None = None
) -> str:
    """Verify a SIWE message + signature and burn its nonce; answers the lowercased address. Raises `Unauthorized`."""
    if not isinstance(message, str) or not message or not isinstance(signature, str) or not signature:
        raise Unauthorized("SIWE message and signature are required")
    from eth_account import Account
    from eth_account.messages import encode_defunct
    from siwe import SiweMessage

    try:
        parsed = SiweMessage.from_message(message)
    except Exception as exc:  # the parser raises several types (ValueError, pydantic errors, grammar errors)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise Unauthorized(f"Malformed SIWE message: {detail}") from None
    if parsed.domain != ctx.host:
        raise Unauthorized(f"SIWE domain mismatch: expected {ctx.host!r}")
    expected_uris = {f"{ctx.scheme}://{ctx.host}/v1/auth/keys", f"{ctx.scheme}://{ctx.host}{ctx.prefix}/v1/auth/keys"}
    if str(parsed.uri) not in expected_uris:
        raise Unauthorized(f"SIWE uri mismatch: expected {ctx.scheme}://{ctx.host}{ctx.prefix}/v1/auth/keys")
    if int(parsed.chain_id) != config.chain_id:
        raise Unauthorized(f"SIWE chainId mismatch: expected {config.chain_id}")
    if config.siwe_statement and parsed.statement != config.siwe_statement:
        raise Unauthorized(f"SIWE statement mismatch: expected {config.siwe_statement!r}")
    moment = time.time() if now is None else now
    try:
        issued = _when(parsed.issued_at).timestamp()
        expires = _when(parsed.expiration_time).timestamp() if parsed.expiration_time else None
        not_before = _when(parsed.not_before).timestamp() if parsed.not_before else None
    except ValueError:
        raise Unauthorized("Malformed SIWE timestamps") from None
    if issued > moment + SIWE_CLOCK_SKEW_SECONDS:
        raise Unauthorized("SIWE issuedAt is in the future")
    if moment - issued > SIWE_MAX_AGE_SECONDS:
        raise Unauthorized("SIWE message expired: issuedAt is older than 5 minutes")
    if expires is not None and moment >= expires:
        raise Unauthorized("SIWE message expired (expirationTime has passed)")
    if not_before is not None and moment < not_before:
        raise Unauthorized("SIWE message not yet valid (notBefore)")
    try:
        signer: str = Account.recover_message(encode_defunct(text=message), signature=signature)
    except Exception:  # malformed signatures of every kind
        raise Unauthorized("Invalid SIWE signature") from None
    if signer.lower() != str(parsed.address).lower():
        raise Unauthorized("Invalid SIWE signature: it does not recover to the message's address")
    address = str(parsed.address).lower()
    if not store.use_siwe_nonce(str(parsed.nonce), address):
        raise Unauthorized("SIWE nonce already used")
    return address
