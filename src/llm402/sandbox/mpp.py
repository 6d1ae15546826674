"""MPP on the sandbox: ``evm/charge`` (the HTTP ``Payment`` scheme), verified for real like its x402 payments.

Mounts (chat completions, embeddings and the model list under each):

- ``/mpp/v1``: MPP alone. A 402 carries ``WWW-Authenticate: Payment id=, realm=, method="evm", intent="charge",
  request=, expires=, digest=, opaque=, description=`` (``Cache-Control: no-store``, an RFC 9457 problem body); the
  replay carries ``Authorization: Payment <base64url JSON>``; the answer a ``Payment-Receipt``.
- ``/mpp-auth/v1``: the same with ``header="Payment-Authorization"``: the credential comes in that field, so a
  caller keeps its own ``Authorization`` (each answer says in ``X-Sandbox-Authorization`` whether one came along).
- ``/dual/v1``: dual rail, as pympp's and mppx's EVM servers: the 402 also carries an x402 v2 ``PAYMENT-REQUIRED``
  (``exact``, EIP-3009) with the ``extensions.mppx`` route binding. An x402 payment must echo ``accepted``,
  ``resource`` and ``extensions`` (with a client salt as ``mppx.info.nonce``) and sign the route-bound nonce; one
  without the binding is refused ("x402 payment payload does not bind required route metadata").

Verification is the sandbox's own, written apart from the client's: the challenge id is an HMAC over the echoed
fields (realm, method, intent, request, expires, digest, opaque, header) under a per-app secret, so an echo that
changes any of them (dropping ``opaque``, another body) is not this server's challenge; the EIP-3009 nonce must be
keccak256 of ``["<id>","<realm>"]``, ``validBefore`` no later than ``expires``, ``source`` the payer's ``did:pkh``;
then the facilitator checks signature, payee, amount, validity window, nonce reuse and balance and settles in the
sandbox's test-USDC ledger. A credential used again is answered ``403`` ``verification-failed`` (never a fresh
challenge, so no client is invited to pay twice); other refusals ``402`` with a fresh challenge and a problem.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import app as sandbox
from . import models as m
from .config import SandboxConfig
from .dialects import Quote, requirement, settlement_headers
from .facilitator import Authorization, Payment, decode_payment, peek_payer_nonce
from .faults import Faults, FaultSpecError
from .upstream import UpstreamFailure
from .wire import Refusal, address, uint256

Mode = Literal["mpp", "mpp-auth", "dual"]
MOUNTS: tuple[tuple[str, Mode], ...] = (("/mpp", "mpp"), ("/mpp-auth", "mpp-auth"), ("/dual", "dual"))
REALM = "sandbox.llm402"
PROBLEMS = "https://paymentauth.org/problems/"
PAYMENT_AUTHORIZATION = "Payment-Authorization"
ROUTE_SCHEMA: dict[str, Any] = {
    "additionalProperties": False,
    "properties": {
        "_mppx_scope": {"type": "string"},
        "digest": {"type": "string"},
        "method": {"type": "string"},
        "nonce": {"type": "string"},
        "opaque": {"type": "string"},
    },
    "required": ["method"],
    "type": "object",
}
"""The JSON schema of ``extensions.mppx.info`` that pympp and mppx advertise."""
NOT_BOUND = "x402 payment payload does not bind required route metadata"


# --- encodings ------------------------------------------------------------------------------------------------


def jcs(value: Any) -> bytes:
    """RFC 8785 canonical JSON of the values the sandbox binds (objects, arrays, strings, integers, booleans, null):
    keys sorted by UTF-16 code units, no whitespace. Floats are refused (none are bound here)."""
    return _jcs(value).encode("utf-8")


def _jcs(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_jcs(item) for item in value) + "]"
    if isinstance(value, Mapping):
        keys = sorted(value, key=lambda key: str(key).encode("utf-16-be"))
        return "{" + ",".join(json.dumps(str(k), ensure_ascii=False) + ":" + _jcs(value[k]) for k in keys) + "}"
    raise ValueError(f"cannot canonicalize a {type(value).__name__}")


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def unb64url_json(text: str, what: str) -> Any:
    """Decode base64url (padding optional) JSON; ``ValueError`` naming ``what``."""
    try:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64url JSON") from None


def body_digest(body: bytes) -> str:
    """RFC 9530 ``sha-256=:<base64>:`` of a request body."""
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + ":"


def route_nonce(accepted: Mapping[str, Any], resource: Mapping[str, Any], extensions: Mapping[str, Any]) -> str:
    """The EIP-3009 nonce an x402 payment to a dual-rail route must sign (pympp's and mppx's rule)."""
    joined = "|".join(b64url(jcs(value)) for value in (accepted, resource, extensions))
    return "0x" + hashlib.sha256(joined.encode("utf-8")).hexdigest()


def challenge_nonce(challenge_id: str, realm: str) -> str:
    """The EIP-3009 nonce of a native credential: keccak256 of the compact JSON ``["<id>","<realm>"]``."""
    from eth_hash.auto import keccak

    return "0x" + keccak(json.dumps([challenge_id, realm], separators=(",", ":")).encode("utf-8")).hex()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _when(value: str) -> float:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("no offset")
    return parsed.timestamp()


# --- challenges -----------------------------------------------------------------------------------------------


class Problem(Exception):
    """A refused credential: its problem type (``verification-failed``, ...), status and detail."""

    def __init__(self, kind: str, detail: str, status: int = 402) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.status = kind, detail, status


def _secret(request: Request) -> bytes:
    state = request.app.state
    secret: bytes | None = getattr(state, "mpp_secret", None)
    if secret is None:
        secret = os.urandom(32)
        state.mpp_secret = secret
    return secret


def _binding(secret: bytes, fields: Mapping[str, str | None]) -> str:
    """The challenge id: HMAC-SHA256 over ``realm|method|intent|request|expires|digest|opaque`` (+ ``|header``)."""
    slots = [fields.get(name) or "" for name in ("realm", "method", "intent", "request", "expires", "digest")]
    slots.append(fields.get("opaque") or "")
    if fields.get("header"):
        slots.append(str(fields["header"]))
    return b64url(hmac.new(secret, "|".join(slots).encode("utf-8"), hashlib.sha256).digest())


def _charge_request(cfg: SandboxConfig, amount: int) -> dict[str, Any]:
    return {
        "amount": str(amount),
        "currency": cfg.asset,
        "recipient": cfg.payee,
        "methodDetails": {"chainId": cfg.chain_id, "credentialTypes": ["authorization"], "decimals": 6},
    }


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _issue(request: Request, cfg: SandboxConfig, mode: Mode, quote: Quote, body: bytes) -> tuple[str, str]:
    """A fresh challenge: its ``WWW-Authenticate`` value and id."""
    fields: dict[str, str | None] = {
        "realm": REALM,
        "method": "evm",
        "intent": "charge",
        "request": b64url(jcs(_charge_request(cfg, quote.amount))),
        "expires": _iso(time.time() + cfg.max_timeout_seconds),
        "digest": body_digest(body),
        "opaque": b64url(jcs({"path": request.url.path, "salt": os.urandom(8).hex()})),
        "header": PAYMENT_AUTHORIZATION if mode == "mpp-auth" else None,
    }
    challenge_id = _binding(_secret(request), fields)
    params = [f"id={_quoted(challenge_id)}"] + [
        f"{name}={_quoted(value)}" for name, value in fields.items() if value is not None
    ]
    # display only (never part of the binding): a comma and quotes inside a quoted-string, as clients must handle
    description = quote.description + ', "scripted" sandbox model'
    params.append(f"description={_quoted(description)}")
    return "Payment " + ", ".join(params), challenge_id


def _x402_offer(cfg: SandboxConfig, quote: Quote) -> dict[str, Any]:
    entry = requirement(cfg, "v2", quote)
    entry["extra"] = {"assetTransferMethod": "eip3009", **entry["extra"]}
    return entry


def _route_info(request: Request, body: bytes) -> dict[str, Any]:
    return {"method": request.method.upper(), "digest": body_digest(body)}


def _challenge_response(
    request: Request,
    cfg: SandboxConfig,
    mode: Mode,
    quote: Quote,
    body: bytes,
    problem: Problem | None = None,
    x402_error: str | None = None,
) -> Response:
    """A 402: a fresh Payment challenge and a problem body (dual rail: and the x402 offer with its route binding)."""
    value, challenge_id = _issue(request, cfg, mode, quote, body)
    kind, detail = (problem.kind, problem.detail) if problem else ("payment-required", "Payment is required.")
    payload = {"type": PROBLEMS + kind, "title": kind.replace("-", " ").capitalize(), "status": 402, "detail": detail}
    headers = [
        (b"www-authenticate", value.encode("latin-1")),
        (b"cache-control", b"no-store"),
        (b"content-type", b"application/problem+json"),
    ]
    if mode == "dual":
        required = {
            "x402Version": 2,
            "accepts": [_x402_offer(cfg, quote)],
            "resource": {"url": quote.resource_url},
            "error": x402_error or "PAYMENT-SIGNATURE header is required",
            "extensions": {"mppx": {"info": _route_info(request, body), "schema": ROUTE_SCHEMA}},
        }
        encoded = base64.b64encode(json.dumps(required, separators=(",", ":")).encode()).decode()
        headers.append((b"payment-required", encoded.encode("ascii")))
    raw = json.dumps({**payload, "challengeId": challenge_id}).encode()
    response = Response(raw, 402)
    response.raw_headers = [*headers, (b"content-length", str(len(raw)).encode())]
    return response


def _problem_response(problem: Problem) -> Response:
    """A final refusal without a fresh challenge (a credential used again: 403)."""
    title = problem.kind.replace("-", " ").capitalize()
    body = {"type": PROBLEMS + problem.kind, "title": title, "status": problem.status, "detail": problem.detail}
    return Response(
        json.dumps(body).encode(),
        problem.status,
        {"cache-control": "no-store"},
        media_type="application/problem+json",
    )


# --- verification ---------------------------------------------------------------------------------------------


def _text(data: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise Problem("malformed-credential", f"the credential's challenge.{name} is missing or not a string")
    return value


def _credential(value: str) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """``(challenge echo, payload, source)`` of a ``Payment <base64url JSON>`` value."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "payment" or not token.strip():
        raise Problem("malformed-credential", "not a Payment credential")
    try:
        data = unb64url_json(token.strip(), "the credential")
    except ValueError as exc:
        raise Problem("malformed-credential", str(exc)) from None
    if not isinstance(data, dict) or not isinstance(data.get("challenge"), dict):
        raise Problem("malformed-credential", "the credential has no challenge object")
    if not isinstance(data.get("payload"), dict):
        raise Problem("malformed-credential", "the credential has no payload object")
    source = data.get("source")
    return data["challenge"], data["payload"], source if isinstance(source, str) else None


def _check_echo(
    request: Request, cfg: SandboxConfig, mode: Mode, quote: Quote, body: bytes, echo: Mapping[str, Any]
) -> tuple[str, float]:
    """The echoed challenge is one this server issued, for this request, unexpired: ``(id, expires)``."""
    fields = {
        name: _text(echo, name, required=name in ("realm", "method", "intent", "request"))
        for name in ("realm", "method", "intent", "request", "expires", "digest", "opaque", "header")
    }
    challenge_id = _text(echo, "id")
    assert challenge_id is not None
    if not hmac.compare_digest(challenge_id, _binding(_secret(request), fields)):
        raise Problem("invalid-challenge", "the echoed challenge is not one this server issued (or was altered)")
    if fields["realm"] != REALM or fields["method"] != "evm" or fields["intent"] != "charge":
        raise Problem("invalid-challenge", "the challenge is not an evm/charge of this realm")
    if (fields["header"] or None) != (PAYMENT_AUTHORIZATION if mode == "mpp-auth" else None):
        raise Problem("invalid-challenge", "the challenge was issued for another credential field")
    try:
        expires = _when(fields["expires"] or "")
    except ValueError:
        raise Problem("payment-expired", "the challenge has no valid expires") from None
    if expires <= time.time():
        raise Problem("payment-expired", f"the challenge expired at {fields['expires']}")
    if fields["digest"] != body_digest(body):
        raise Problem("invalid-challenge", "the request body is not the one the challenge was issued for")
    try:
        echoed_request = unb64url_json(fields["request"] or "", "the echoed request")
        opaque = unb64url_json(fields["opaque"] or "", "the echoed opaque")
    except ValueError as exc:
        raise Problem("invalid-challenge", str(exc)) from None
    if echoed_request != _charge_request(cfg, quote.amount):
        raise Problem("invalid-challenge", "the challenge was issued for another price")
    if not isinstance(opaque, dict) or opaque.get("path") != request.url.path:
        raise Problem("invalid-challenge", "the challenge was issued for another route")
    return challenge_id, expires


def _authorization(payload: Mapping[str, Any]) -> tuple[Authorization, str]:
    try:
        if payload.get("type") != "authorization":
            raise ValueError("payload.type is not 'authorization'")
        nonce, signature = payload.get("nonce"), payload.get("signature")
        if not isinstance(nonce, str) or len(nonce) != 66 or not nonce.startswith("0x"):
            raise ValueError("payload.nonce is not a bytes32 hex string")
        if not isinstance(signature, str) or not signature.startswith("0x"):
            raise ValueError("payload.signature is not hex")
        auth = Authorization(
            from_=address(payload.get("from"), "payload.from"),
            to=address(payload.get("to"), "payload.to"),
            value=uint256(payload.get("value"), "payload.value"),
            valid_after=uint256(payload.get("validAfter"), "payload.validAfter"),
            valid_before=uint256(payload.get("validBefore"), "payload.validBefore"),
            nonce=nonce,
        )
    except ValueError as exc:
        raise Problem("invalid-payload", str(exc)) from None
    return auth, signature


def _verify_native(
    st: sandbox.SandboxState, request: Request, mode: Mode, quote: Quote, body: bytes, value: str
) -> Payment:
    """A native ``evm/charge`` credential, verified; raises `Problem`."""
    cfg = st.config
    echo, payload, source = _credential(value)
    challenge_id, expires = _check_echo(request, cfg, mode, quote, body, echo)
    auth, signature = _authorization(payload)
    if auth.nonce.lower() != challenge_nonce(challenge_id, REALM):
        raise Problem("verification-failed", "the authorization nonce is not the challenge's hash")
    if auth.valid_before > int(expires) + 1:
        raise Problem("verification-failed", "the authorization stays valid past the challenge's expiry")
    expected_source = f"did:pkh:eip155:{cfg.chain_id}:{auth.from_}".lower()
    if source is not None and source.lower() != expected_source:
        raise Problem("verification-failed", "the credential's source is not the payer on this chain")
    payment = Payment(2, "exact", cfg.network, cfg.asset, auth, signature)
    try:
        st.facilitator.verify(payment, quote.amount, "v2")
    except Refusal as refusal:
        st.store.record_attempt(auth.from_, auth.nonce, "refused", refusal.reason, request.url.path)
        if refusal.reason == "nonce_already_used":
            raise Problem("verification-failed", "Credential has already been used", status=403) from None
        kind = "payment-expired" if refusal.reason == "expired" else "verification-failed"
        raise Problem(kind, f"{refusal.reason}: {refusal.message}") from None
    return payment


def _verify_x402(st: sandbox.SandboxState, request: Request, quote: Quote, body: bytes, header: str) -> Payment:
    """An x402 payment to the dual-rail route, route binding included; raises `Refusal`."""
    cfg = st.config
    payment = decode_payment(header)
    data = json.loads(base64.b64decode(header.strip() + "=" * (-len(header.strip()) % 4)))
    extensions = data.get("extensions")
    binding = extensions.get("mppx") if isinstance(extensions, dict) else None
    info = binding.get("info") if isinstance(binding, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("nonce"), str):
        raise Refusal("route_not_bound", NOT_BOUND)
    assert isinstance(extensions, dict)
    assert isinstance(binding, dict)
    if {k: v for k, v in info.items() if k != "nonce"} != _route_info(request, body) or binding.get(
        "schema"
    ) != ROUTE_SCHEMA:
        raise Refusal("route_mismatch", "x402 payment payload extensions do not match route binding")
    resource = {"url": quote.resource_url}
    if data.get("resource") != resource:
        raise Refusal("route_mismatch", "x402 payment payload resource does not match route resource")
    offer = _x402_offer(cfg, quote)
    if data.get("accepted") != offer:
        raise Refusal("requirements_mismatch", "x402 payment payload does not match route requirements")
    if payment.authorization.nonce.lower() != route_nonce(offer, resource, extensions):
        raise Refusal("route_mismatch", "x402 authorization nonce does not match route binding")
    st.facilitator.verify(payment, quote.amount, "v2")
    return payment


# --- the routes -----------------------------------------------------------------------------------------------


def _receipt(transaction: str) -> str:
    receipt = {"method": "evm", "reference": transaction, "status": "success", "timestamp": _iso(time.time())}
    return b64url(json.dumps(receipt, separators=(",", ":")).encode())


async def _paid(request: Request, mode: Mode, build: Callable[[sandbox.SandboxState, Any], sandbox.Job]) -> Response:
    st = sandbox._state(request)
    cfg = st.config
    try:
        faults = st.faults.resolve(request.headers.get("x-sandbox-fault"))
    except FaultSpecError as exc:
        raise sandbox.ApiError(400, f"bad X-Sandbox-Fault: {exc}") from None
    if faults.delay_ms:
        await asyncio.sleep(faults.delay_ms / 1000)
    if faults.status is not None:
        raise sandbox.ApiError(faults.status, f"Injected fault: HTTP {faults.status}")
    body = await request.body()
    try:
        job = build(st, await sandbox._json(request))
    except m.BadRequest as exc:
        raise sandbox.ApiError(400, str(exc)) from None
    quote = Quote(job.quote, str(request.url), job.description)
    field = PAYMENT_AUTHORIZATION if mode == "mpp-auth" else "authorization"
    credential = request.headers.get(field)
    x402 = request.headers.get("payment-signature") if mode == "dual" else None
    native = credential is not None and credential.lower().startswith("payment ")
    if credential is not None and native:
        try:
            payment = _verify_native(st, request, mode, quote, body, credential)
        except Problem as problem:
            if problem.status == 403:
                return _problem_response(problem)
            return _challenge_response(request, cfg, mode, quote, body, problem)
    elif x402 is not None:
        try:
            payment = _verify_x402(st, request, quote, body, x402)
        except Refusal as refusal:
            payer, nonce = peek_payer_nonce(x402)
            st.store.record_attempt(payer, nonce, "refused", refusal.reason, request.url.path)
            refused = Problem("verification-failed", refusal.message)
            return _challenge_response(request, cfg, mode, quote, body, refused, x402_error=refusal.reason)
    else:
        return _challenge_response(request, cfg, mode, quote, body)
    return await _settle_and_answer(request, st, mode, job, faults, payment, native=native)


async def _settle_and_answer(
    request: Request,
    st: sandbox.SandboxState,
    mode: Mode,
    job: sandbox.Job,
    faults: Faults,
    payment: Payment,
    *,
    native: bool,
) -> Response:
    """Produce (a failure settles nothing), settle, answer with the receipt."""
    path, auth = request.url.path, payment.authorization
    try:
        if faults.upstream_error:
            raise UpstreamFailure("injected upstream_error fault")
        produced = await job.produce()
    except UpstreamFailure as exc:
        st.store.record_attempt(payment.payer, auth.nonce, "unsettled", "upstream_error", path)
        raise sandbox.ApiError(502, f"Provider returned an error ({exc}); the payment was not settled") from None
    try:
        settled = st.facilitator.settle(payment, path)
    except Refusal as refusal:  # a lost race for the nonce: the same credential settled meanwhile
        await sandbox._discard(produced)
        st.store.record_attempt(payment.payer, auth.nonce, "refused", refusal.reason, path)
        return _problem_response(Problem("verification-failed", "Credential has already been used", status=403))
    st.store.record_attempt(payment.payer, auth.nonce, "settled", None, path)
    headers: dict[str, str] = {"Payment-Receipt": _receipt(settled.transaction), "Cache-Control": "private"}
    if not native:
        headers.update(settlement_headers(st.config, "v2", payment.payer, settled.transaction, auth.value))
    if mode == "mpp-auth":
        headers["X-Sandbox-Authorization"] = "present" if "authorization" in request.headers else "absent"
    if faults.fail_after_settle:
        await sandbox._discard(produced)
        raise sandbox.ApiError(500, "Injected failure after settlement (fail_after_settle)")
    return sandbox._respond(st, produced, headers, faults)


def _route(
    mode: Mode, build: Callable[[sandbox.SandboxState, Any], sandbox.Job]
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await _paid(request, mode, build)

    return endpoint


def mpp_routes() -> list[BaseRoute]:
    """The MPP mounts (see the module's docstring)."""
    routes: list[BaseRoute] = []
    for prefix, mode in MOUNTS:
        v1 = f"{prefix}/v1"
        routes += [
            Route(f"{v1}/models", sandbox.list_models, methods=["GET"]),
            Route(f"{v1}/chat/completions", _route(mode, sandbox._chat_job), methods=["POST"]),
            Route(f"{v1}/embeddings", _route(mode, sandbox._embeddings_job), methods=["POST"]),
        ]
    return routes
