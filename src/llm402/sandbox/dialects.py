"""The three 402 dialects the sandbox speaks: what a challenge looks like, where the replay comes, how settlement
is reported.

- ``v2``: requirements in ``PAYMENT-REQUIRED: base64(json)`` (the same JSON as the body), replay in
  ``PAYMENT-SIGNATURE`` (an x402 v2 payload), settlement in ``PAYMENT-RESPONSE``.
- ``v1``: requirements in the body (``x402Version: 1``, legacy network name), replay in ``X-PAYMENT`` (an x402 v1
  payload), settlement in ``X-PAYMENT-RESPONSE``.
- ``kiosk`` (Token Kiosk): body ``{"accepts": [...]}`` without ``x402Version``, CAIP-2 network, ``amount`` and
  ``maxAmountRequired``, ``extra.assetTransferMethod: "eip3009"``; replay in ``X-Payment`` or ``Payment-Signature``
  holding a v2 payload or a v1 payload with the CAIP-2 network; settlement in ``X-PAYMENT-RESPONSE`` (v2's JSON).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import Response

from .config import OTHER_PAYEE_ADDRESS, Dialect, SandboxConfig

UNKNOWN_ASSET = "0x000000000000000000000000000000000000dEaD"
UNKNOWN_NETWORK = "unknown-network"


@dataclass(frozen=True, slots=True)
class Quote:
    """What a request costs and what it is for."""

    amount: int
    resource_url: str
    description: str
    mime_type: str = "application/json"


def b64json(data: Any) -> str:
    """``base64(json(data))`` (compact JSON)."""
    return base64.b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def requirement(config: SandboxConfig, dialect: Dialect, quote: Quote, pay_to: str | None = None) -> dict[str, Any]:
    """One ``accepts`` entry."""
    pay_to = pay_to or config.payee
    extra = {"name": config.asset_name, "version": config.asset_version}
    if dialect == "v1":
        return {
            "scheme": "exact",
            "network": config.network_v1,
            "maxAmountRequired": str(quote.amount),
            "resource": quote.resource_url,
            "description": quote.description,
            "mimeType": quote.mime_type,
            "payTo": pay_to,
            "maxTimeoutSeconds": config.max_timeout_seconds,
            "asset": config.asset,
            "extra": extra,
        }
    if dialect == "kiosk":
        return {
            "scheme": "exact",
            "network": config.network,
            "amount": str(quote.amount),
            "maxAmountRequired": str(quote.amount),
            "asset": config.asset,
            "payTo": pay_to,
            "maxTimeoutSeconds": config.max_timeout_seconds,
            "extra": {"assetTransferMethod": "eip3009", **extra},
        }
    return {
        "scheme": "exact",
        "network": config.network,
        "asset": config.asset,
        "amount": str(quote.amount),
        "payTo": pay_to,
        "maxTimeoutSeconds": config.max_timeout_seconds,
        "extra": extra,
    }


def upto_requirement(config: SandboxConfig, quote: Quote, pay_to: str | None = None) -> dict[str, Any]:
    """The ``upto`` entry (x402 v2): ``amount`` is the ceiling; the facilitator settles the metered cost."""
    return {
        "scheme": "upto",
        "network": config.network,
        "asset": config.asset,
        "amount": str(quote.amount),
        "payTo": pay_to or config.payee,
        "maxTimeoutSeconds": config.max_timeout_seconds,
        "extra": {
            "name": config.asset_name,
            "version": config.asset_version,
            "assetTransferMethod": "permit2",
            "facilitatorAddress": config.facilitator_address,
        },
    }


def _garble(entry: dict[str, Any], kind: str, dialect: Dialect) -> None:
    amount_keys = [k for k in ("amount", "maxAmountRequired") if k in entry]
    if kind == "missing_payee":
        del entry["payTo"]
    elif kind == "negative_amount":
        for key in amount_keys:
            entry[key] = "-" + entry[key]
    elif kind == "fractional_amount":
        for key in amount_keys:
            entry[key] = entry[key] + ".5"
    elif kind == "huge_amount":
        for key in amount_keys:
            entry[key] = str(2**256)
    elif kind == "unknown_asset":
        entry["asset"] = UNKNOWN_ASSET
    elif kind == "unknown_network":
        entry["network"] = UNKNOWN_NETWORK


def challenge(
    config: SandboxConfig,
    dialect: Dialect,
    quote: Quote,
    *,
    error: str | None = None,
    message: str | None = None,
    malformed: str | None = None,
    pay_to: str | None = None,
    upto: bool = False,
) -> Response:
    """The 402 for ``quote`` in ``dialect``; ``error`` is a refusal reason (also sent as ``X-Sandbox-Refusal``).
    With ``upto`` (v2 only) an ``upto`` offer follows the ``exact`` one, both for the same amount."""
    entry = requirement(config, dialect, quote, pay_to)
    if malformed:
        _garble(entry, malformed, dialect)
    accepts = [] if malformed == "empty_accepts" else [entry]
    if upto and dialect == "v2" and accepts:
        accepts.append(upto_requirement(config, quote, pay_to))
    headers: dict[str, str] = {}
    if error:
        headers["X-Sandbox-Refusal"] = error
    body: dict[str, Any]
    if dialect == "v2":
        body = {
            "x402Version": 2,
            "error": error or "Payment required",
            "resource": {"url": quote.resource_url, "description": quote.description, "mimeType": quote.mime_type},
            "accepts": accepts,
        }
        encoded = b64json(body)
        if malformed == "bad_base64":
            encoded = "%%not-base64%%" + encoded[:16]
        elif malformed == "bad_json":
            encoded = base64.b64encode(b'{"x402Version":2,"accepts":[').decode()
        headers["PAYMENT-REQUIRED"] = encoded
        if malformed in ("bad_base64", "bad_json"):
            return Response(b"{}", 402, headers, media_type="application/json")
    elif dialect == "v1":
        body = {"x402Version": 1, "error": error or "X-PAYMENT header is required", "accepts": accepts}
    else:
        body = {"accepts": accepts}
        if error:
            body["error"] = error
    if message and dialect != "v2":
        body["message"] = message
    if malformed in ("bad_base64", "bad_json"):
        return Response(b'{"accepts": [{"scheme": "exact", ', 402, headers, media_type="application/json")
    return Response(json.dumps(body, separators=(",", ":")).encode(), 402, headers, media_type="application/json")


CHANGED_PAYEE = OTHER_PAYEE_ADDRESS


def payment_header(headers: Headers, dialect: Dialect) -> str | None:
    """The replayed payment of ``dialect`` (None: unpaid). Header names are case-insensitive."""
    if dialect == "v2":
        return headers.get("payment-signature")
    if dialect == "v1":
        return headers.get("x-payment")
    return headers.get("x-payment") or headers.get("payment-signature")


def settlement_headers(
    config: SandboxConfig, dialect: Dialect, payer: str, transaction: str, amount: int
) -> dict[str, str]:
    """The success header of ``dialect``."""
    if dialect == "v1":
        data: dict[str, Any] = {
            "success": True,
            "payer": payer,
            "transaction": transaction,
            "network": config.network_v1,
        }
        return {"X-PAYMENT-RESPONSE": b64json(data)}
    data = {
        "success": True,
        "payer": payer,
        "transaction": transaction,
        "network": config.network,
        "amount": str(amount),
    }
    return {("PAYMENT-RESPONSE" if dialect == "v2" else "X-PAYMENT-RESPONSE"): b64json(data)}
