"""What the documentation-derived contract tests share: where the cassettes live, how a live request is matched
against a documented one, how recordings are filtered, and the secret scanner.

Imported by ``conftest.py`` (vcrpy configuration), the tests, and ``build_cassettes.py`` (which writes requests in
the same filtered form a live recording is stored in, so one matcher serves both).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CASSETTES = ROOT / "cassettes"

# --- the documented hosts and values the documents fix ----------------------------------------------------------

KIOSK_URL = "https://agent-router.gaib.ai/v1"
AISA_URL = "https://api.aisa.one/v1"
BASE_MAINNET = "eip155:8453"
BASE_USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
KIOSK_USDT = "0xdAC17F958D2ee523a2206206994597C13D831ec7"
# Payees the documents leave open ("payTo": "0x..."): filled with recognisable, obviously fake addresses.
KIOSK_PAYEE = "0x1000000000000000000000000000000000000402"
AISA_PAYEE = "0x2000000000000000000000000000000000000402"

# --- filtering ------------------------------------------------------------------------------------------------

FILTERED = "<filtered>"
SECRET_REQUEST_HEADERS = ("authorization", "payment-signature", "x-payment")
FILTERED_PREFIX = "filtered-"
"""A secret request header is stored as ``filtered-<name>: <filtered>``: its value is gone, its presence kept (the
matchers need it), and no cassette line starts with ``authorization:`` (tests/reliability rejects any such line)."""
SETTLEMENT_RESPONSE_HEADERS = ("payment-response", "x-payment-response", "set-cookie")
SIWE_FIELDS = {"message": "<SIWE message>", "signature": "<SIWE signature>"}
"""SIWE credentials (request body of POST/DELETE /v1/auth/keys, query of GET /v1/auth/keys, /v1/usage, /v1/topups):
fresh on every call (nonce, issuedAt), so stored as placeholders; ``api_key`` as a query parameter too."""
QUERY_PLACEHOLDERS = {**SIWE_FIELDS, "api_key": "<API key>"}
_SK_KEY = re.compile(r"sk-[0-9a-fA-F]{64}")

VCR_FILTER_HEADERS = [(name, FILTERED) for name in SECRET_REQUEST_HEADERS]


def before_record_request(request: Any) -> Any:
    """Runs after vcrpy's ``filter_headers`` on every request, live or recorded: secret headers become
    ``filtered-<name>``; SIWE message/signature and ``api_key`` in a query or JSON body become placeholders."""
    for name in SECRET_REQUEST_HEADERS:
        if name in request.headers:
            del request.headers[name]
            request.headers[FILTERED_PREFIX + name] = FILTERED
    parts = urlsplit(request.uri)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(k in QUERY_PLACEHOLDERS for k, _ in pairs):
            query = urlencode([(k, QUERY_PLACEHOLDERS.get(k, v)) for k, v in pairs], safe="<>")
            request.uri = urlunsplit(parts._replace(query=query))
    data = _json(request.body)
    if isinstance(data, dict) and "signature" in data:
        request.body = json.dumps({k: SIWE_FIELDS.get(k, v) for k, v in data.items()}, separators=(",", ":"))
    return request


def before_record_response(response: dict[str, Any]) -> dict[str, Any]:
    """Drop settlement headers (they carry payment data) and cookies; redact any ``sk-`` key in the body (the key
    minted by POST /v1/auth/keys is shown once: it must never reach a cassette)."""
    headers = response.get("headers") or {}
    response["headers"] = {k: v for k, v in headers.items() if k.lower() not in SETTLEMENT_RESPONSE_HEADERS}
    body = response.get("body", {}).get("string")
    if isinstance(body, bytes) and _SK_KEY.search(body.decode("utf-8", "replace")):
        response["body"]["string"] = _SK_KEY.sub("sk-<redacted>", body.decode("utf-8")).encode()
    elif isinstance(body, str):
        response["body"]["string"] = _SK_KEY.sub("sk-<redacted>", body)
    return response


# --- matching -------------------------------------------------------------------------------------------------
# vcrpy calls a matcher as matcher(live_request, stored_request) (vcr/cassette.py `_responses`), both already
# through `before_record_request`.

WALLET_PLACEHOLDERS = frozenset({"0xYourWallet", "0xYourWalletAddress"})
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
OPTIONAL_BODY_FIELDS = frozenset(
    {
        # Token Kiosk, Chat Completions > Request body (+ "other standard OpenAI fields ... are also accepted")
        "max_tokens",
        "temperature",
        "top_p",
        "stream",
        "tools",
        "tool_choice",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
        "seed",
        "n",
        "logprobs",
        # AIsa router skill, Parameters table (same names) and Function Calling
        "functions",
        "function_call",
        # the standard OpenAI field llm402 adds to a streamed chat request so it can meter it
        "stream_options",
    }
)
"""Fields a client may send beyond those a documented request shows: the ones the documents list as optional.
Anything else (``thinking``, ``reasoning_effort``, a typo) makes the request differ from the documented one."""
BODY_DEFAULTS: Mapping[str, Any] = {"stream": False}


def _json(body: Any) -> Any:
    if body is None:
        return None
    if isinstance(body, str):
        body = body.encode()
    if not isinstance(body, bytes | bytearray) or not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _path(path: str) -> str:
    segments = [":wallet" if s in WALLET_PLACEHOLDERS or _ADDRESS.match(s) else s for s in path.split("/")]
    return "/".join(segments) or "/"


def contract_uri(live: Any, stored: Any) -> None:
    """Scheme, host, port, query and path; a wallet address in the path matches the documented ``:wallet``
    placeholder (``0xYourWallet``): the tests sign with a fresh throwaway wallet every run."""
    assert (live.scheme, live.host, live.port) == (stored.scheme, stored.host, stored.port), (
        f"{live.scheme}://{live.host}:{live.port} != {stored.scheme}://{stored.host}:{stored.port}"
    )
    assert _path(live.path) == _path(stored.path), f"path {live.path} != {stored.path}"
    assert live.query == stored.query, f"query {live.query} != {stored.query}"


def contract_body(live: Any, stored: Any) -> None:
    """JSON bodies: every field of the documented request is sent with the documented value; any other field the
    client adds must be one the documents list as optional (``stream`` compares as ``false`` when absent). Other
    bodies compare as bytes."""
    a, b = _json(live.body), _json(stored.body)
    if not isinstance(a, dict) or not isinstance(b, dict):
        raw_a, raw_b = live.body or b"", stored.body or b""
        assert raw_a == raw_b, f"body {raw_a[:120]!r} != {raw_b[:120]!r}"
        return
    for name in set(b) | set(BODY_DEFAULTS):
        got, want = a.get(name, BODY_DEFAULTS.get(name)), b.get(name, BODY_DEFAULTS.get(name))
        assert got == want, f"body field {name!r}: sent {got!r}, documented {want!r}"
    extra = set(a) - set(b) - OPTIONAL_BODY_FIELDS
    assert not extra, f"body fields the documented request does not have: {sorted(extra)}"


def _has(request: Any, names: Iterable[str]) -> bool:
    return any(n in request.headers or FILTERED_PREFIX + n in request.headers for n in names)


def paid_state(live: Any, stored: Any) -> None:
    """The unpaid request and its paid replay share method, URL and body: a payment header tells them apart."""
    names = ("payment-signature", "x-payment")
    assert _has(live, names) == _has(stored, names), "payment header presence differs"


def auth_state(live: Any, stored: Any) -> None:
    """Whether an ``Authorization`` header was sent (a Bearer key where the document shows one, none elsewhere)."""
    assert _has(live, ("authorization",)) == _has(stored, ("authorization",)), "authorization presence differs"


MATCHERS: dict[str, Callable[[Any, Any], None]] = {
    "contract_uri": contract_uri,
    "contract_body": contract_body,
    "paid_state": paid_state,
    "auth_state": auth_state,
}
MATCH_ON = ("method", "contract_uri", "contract_body", "paid_state", "auth_state")


def vcr_config() -> dict[str, Any]:
    """The vcrpy options every contract cassette is played (and every live recording made) with."""
    return {
        "match_on": MATCH_ON,
        "filter_headers": VCR_FILTER_HEADERS,
        "before_record_request": before_record_request,
        "before_record_response": before_record_response,
        "decode_compressed_response": True,
        "allow_playback_repeats": False,
    }


def cassette_marks(name: str) -> list[pytest.MarkDecorator]:
    """The marks that make a test replay ``cassettes/<name>.yaml`` (pytest-recording's ``vcr`` and
    ``default_cassette``); for ``pytest.param(..., marks=cassette_marks(name))``."""
    return [pytest.mark.vcr, pytest.mark.default_cassette(f"{name}.yaml")]


def uses_cassette(name: str) -> Callable[[Any], Any]:
    """Decorate a test to replay ``cassettes/<name>.yaml``."""

    def mark(test: Any) -> Any:
        for marker in cassette_marks(name):
            test = marker(test)
        return test

    return mark


# --- secrets --------------------------------------------------------------------------------------------------

_HEX64 = re.compile(r"0x[0-9a-fA-F]{64}(?![0-9a-fA-F])")
_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}(?![0-9a-fA-F])")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{80,}={0,2}")
_BEARER = re.compile(r"bearer\s+(?!<)([A-Za-z0-9._\-]{16,})", re.IGNORECASE)
_TX_CONTEXT = re.compile(r"(tx_hash|transaction|txhash|hash)\W{0,6}$", re.IGNORECASE)
_HEADER_LINE = re.compile(r"^\s*-?\s*(authorization|payment-signature|x-payment)\s*:\s*(.*)$", re.IGNORECASE)


def find_secrets(text: str) -> list[str]:
    """Everything in ``text`` that looks like a secret: ``sk-`` keys with 64 hex, 32-byte hex values outside a
    transaction-hash field (private keys, payment nonces), 65-byte ECDSA signatures, base64 x402 payloads carrying a
    signature, Bearer tokens, unfiltered secret header lines and PEM private keys."""
    found: list[str] = [f"sk- key {m.group()[:8]}..." for m in _SK_KEY.finditer(text)]
    found += [f"signature {m.group()[:10]}..." for m in _SIGNATURE.finditer(text)]
    for match in _HEX64.finditer(text):
        if not _TX_CONTEXT.search(text[max(0, match.start() - 24) : match.start()]):
            found.append(f"32-byte hex {match.group()[:10]}... (private key or nonce)")
    for match in _BASE64.finditer(text):
        try:
            decoded = base64.b64decode(match.group() + "=" * (-len(match.group()) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if b"signature" in decoded or b"authorization" in decoded:
            found.append(f"base64 payment payload {match.group()[:10]}...")
    found += [f"bearer token {m.group(1)[:6]}..." for m in _BEARER.finditer(text)]
    for line in text.splitlines():
        header = _HEADER_LINE.match(line)
        if header and header.group(2).strip() not in ("", FILTERED, f"'{FILTERED}'"):
            found.append(f"unfiltered {header.group(1)} header")
    if "PRIVATE KEY-----" in text:
        found.append("PEM private key")
    return found


# --- what went on the wire ----------------------------------------------------------------------------------------


@dataclass
class Sent:
    """One request as it reached the inner ``httpx.HTTPTransport`` (i.e. as a gateway would have received it)."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def payment(self) -> dict[str, Any] | None:
        """The decoded x402 payment header (``X-Payment`` / ``PAYMENT-SIGNATURE``), if one was sent."""
        value = self.headers.get("x-payment") or self.headers.get("payment-signature")
        return json.loads(base64.b64decode(value)) if value else None


@dataclass
class WireLog:
    """Requests seen by the inner transports (sync and async), in order."""

    sent: list[Sent] = field(default_factory=list)

    def add(self, request: httpx.Request, body: bytes) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.sent.append(Sent(request.method, str(request.url), headers, body))

    def paid(self) -> list[Sent]:
        return [s for s in self.sent if "x-payment" in s.headers or "payment-signature" in s.headers]

    def to(self, path_end: str) -> list[Sent]:
        return [s for s in self.sent if s.path.endswith(path_end)]


# --- checking what llm402 signed ------------------------------------------------------------------------------------


def eip3009_signer(authorization: Mapping[str, Any], signature: str, *, chain_id: int, asset: str) -> str:
    """The address that signed an EIP-3009 ``TransferWithAuthorization`` for USD Coin v2 (Base USDC's domain)."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    typed = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": "USD Coin", "version": "2", "chainId": chain_id, "verifyingContract": asset},
        "message": {
            "from": authorization["from"],
            "to": authorization["to"],
            "value": int(authorization["value"]),
            "validAfter": int(authorization["validAfter"]),
            "validBefore": int(authorization["validBefore"]),
            "nonce": bytes.fromhex(str(authorization["nonce"]).removeprefix("0x")),
        },
    }
    return str(Account.recover_message(encode_typed_data(full_message=typed), signature=signature))


def siwe_signer(message: str, signature: str) -> str:
    """The address that signed an EIP-191 (SIWE) message."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    return str(Account.recover_message(encode_defunct(text=message), signature=signature))
