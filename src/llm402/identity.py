"""Agent identity: the wallet that pays, and optionally the ENS name it answers to.

A name is trusted only once verified against the chain: resolved forward to the signing wallet, and checked in
reverse (the wallet's primary name is that name). A name that points elsewhere is refused with `IdentityError`
before any call is made. Budgets and receipts are keyed by `Identity.budget_key`: the ENS name when verified, else
the checksummed address, so renaming an unverified label never resets a budget.

The chain is reached through ``LLM402_ETH_RPC`` (an http(s) JSON-RPC URL; never logged, it may hold an API key) or a
``web3.Web3`` / ``ens.ENS`` given in code. ``LLM402_ENS_REGISTRY`` overrides the ENS registry address (testnets).
web3 is imported only when a name is resolved: ``import llm402`` stays cheap.

The identity travels with calls in two headers (`identity_headers`) and, where a gateway declares it in its 402,
through x402's sign-in-with-x extension (`siwx_headers`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from .errors import ConfigurationError
from .wallet import Signer

if TYPE_CHECKING:
    from ens import ENS
    from web3 import Web3

ENV_ETH_RPC = "LLM402_ETH_RPC"
ENV_ENS_REGISTRY = "LLM402_ENS_REGISTRY"
AGENT_HEADER = "llm402-agent"
INTENT_HEADER = "llm402-intent"
SIWX_HEADER = "sign-in-with-x"  # x402's SIGN_IN_WITH_X extension key, also its header name
RPC_TIMEOUT_SECONDS = 10.0
_EVM_CHAIN = re.compile(r"eip155:[0-9]+")
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_LINE_SEPARATORS = frozenset("\u2028\u2029")
_SIWX_TEXT = ("domain", "uri", "version", "nonce", "issuedAt", "statement", "expirationTime", "notBefore", "requestId")


class IdentityError(ConfigurationError):
    """The agent's identity could not be established: an ENS name that resolves to another address than the signing
    wallet, a missing reverse record, an unreachable RPC, or a sign-in challenge for another origin."""

    code = "identity_error"


def _checksum(address: str) -> str:
    from eth_utils.address import is_address, to_checksum_address

    if not isinstance(address, str) or not is_address(address):
        raise IdentityError(f"not an Ethereum address: {address!r}")
    return str(to_checksum_address(address))


def _normalize_name(name: str) -> str:
    from ens.exceptions import InvalidName
    from ens.utils import normalize_name

    try:
        return str(normalize_name(name))
    except (InvalidName, ValueError, TypeError) as exc:
        raise IdentityError(f"{name!r} is not a valid ENS name: {exc}") from None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who pays: a checksummed wallet address, and an ENS name that is only trusted when ``verified``."""

    address: str
    ens_name: str | None = None
    verified: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _checksum(self.address))
        if self.verified and not self.ens_name:
            raise IdentityError("an identity can only be verified with an ENS name")

    @property
    def budget_key(self) -> str:
        """What budgets, receipts and headers name this agent by: the verified ENS name, else the address."""
        return self.ens_name if self.verified and self.ens_name else self.address

    @classmethod
    def resolve(
        cls,
        wallet: Signer | str,
        ens_name: str | None = None,
        *,
        web3: Web3 | ENS | None = None,
        environ: Mapping[str, str] | None = None,
        require_reverse: bool = True,
    ) -> Identity:
        """The identity of ``wallet`` (a `Signer` or an address), verifying ``ens_name`` when a chain is reachable
        (``web3``, else ``LLM402_ETH_RPC``). Without one the name is kept but not trusted (``verified=False``).

        Raises `IdentityError` when the name resolves to another address, has no address record, or (with
        ``require_reverse``) the wallet's primary name is not this name.
        """
        address = _checksum(wallet if isinstance(wallet, str) else wallet.address)
        if not ens_name:
            return cls(address)
        ns = ens_of(web3) if web3 is not None else ens_from_env(environ)
        if ns is None:
            return cls(address, _normalize_name(ens_name), verified=False)
        return cls(address, verify_ens_name(ns, ens_name, address, require_reverse=require_reverse), verified=True)


# --- the chain ------------------------------------------------------------------------------------------------


def ens_of(web3: Web3 | ENS) -> ENS:
    """The ENS module of a ``Web3`` (``w3.ens``, which may point at a custom registry), or an ``ENS`` as is."""
    from ens import ENS

    if isinstance(web3, ENS):
        return web3
    ns = web3.ens
    if not isinstance(ns, ENS):
        raise IdentityError("this Web3 has an async ENS module; llm402 resolves names synchronously")
    return ns


def web3_from_env(environ: Mapping[str, str] | None = None) -> Web3 | None:
    """A ``Web3`` on ``LLM402_ETH_RPC`` (its ENS on ``LLM402_ENS_REGISTRY`` when set), or ``None`` when unset."""
    env = os.environ if environ is None else environ
    url = (env.get(ENV_ETH_RPC) or "").strip()
    if not url:
        return None
    from web3 import HTTPProvider, Web3

    if not url.startswith(("http://", "https://")):
        raise IdentityError(f"{ENV_ETH_RPC} must be an http(s) JSON-RPC URL")
    w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": RPC_TIMEOUT_SECONDS}))
    registry = (env.get(ENV_ENS_REGISTRY) or "").strip()
    if registry:
        from ens import ENS

        w3.ens = ENS.from_web3(w3, addr=_checksum(registry))
    return w3


def ens_from_env(environ: Mapping[str, str] | None = None) -> ENS | None:
    """The ENS module of `web3_from_env`, or ``None`` when no RPC is configured."""
    w3 = web3_from_env(environ)
    return None if w3 is None else ens_of(w3)


def _rpc_failure(what: str, exc: BaseException) -> IdentityError:
    # The exception text may repeat the RPC URL (and the API key in it): name only its type.
    return IdentityError(f"cannot {what}: the Ethereum RPC failed ({type(exc).__name__})")


def verify_ens_name(ns: ENS, name: str, address: str, *, require_reverse: bool = True) -> str:
    """Check that ``name`` resolves to ``address`` (and, with ``require_reverse``, that ``address``'s primary name is
    ``name``); return the normalized name. Raises `IdentityError`."""
    normalized = _normalize_name(name)
    wallet = _checksum(address)
    try:
        forward = ns.address(normalized)
    except Exception as exc:
        raise _rpc_failure(f"resolve {normalized}", exc) from None
    if forward is None:
        raise IdentityError(f"ENS name {normalized} has no address record; point it at the signing wallet {wallet}")
    if _checksum(forward) != wallet:
        raise IdentityError(
            f"ENS name {normalized} resolves to {_checksum(forward)}, not to the signing wallet {wallet}: "
            "refusing to act under a name that belongs to another address"
        )
    if require_reverse:
        try:
            reverse = ns.name(wallet)  # web3 already checks that the reverse name resolves forward to wallet
        except Exception as exc:
            raise _rpc_failure(f"read the reverse record of {wallet}", exc) from None
        if reverse is None or _normalize_name(reverse) != normalized:
            found = f"names {reverse}" if reverse else "is not set"
            raise IdentityError(
                f"the reverse record (primary name) of {wallet} {found}, not {normalized}: set the wallet's primary "
                "name to this name, or pass require_reverse=False to trust the forward record alone"
            )
    return normalized


def _looks_like_ens(agent: str) -> bool:
    return "." in agent and not agent.lower().startswith("0x") and not any(c.isspace() for c in agent)


def gateway_identity(
    agent: str | Identity | None,
    wallet: Signer | None,
    *,
    web3: Web3 | ENS | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, Identity | None]:
    """What a `Gateway` keys budgets and receipts by, and the identity behind it (``None`` for a bare agent id).

    - an `Identity`: its ``budget_key``; it must be the wallet's (`IdentityError` otherwise);
    - a dotted name (``judge.krump.eth``) with a wallet and a chain (``web3`` or ``LLM402_ETH_RPC``): verified
      against the wallet, refused when it resolves elsewhere;
    - any other string: an agent id, used as given (no chain, no verification);
    - nothing: the wallet's checksummed address (or ``"default"`` without a wallet).
    """
    if isinstance(agent, Identity):
        if wallet is not None and _checksum(wallet.address) != agent.address:
            raise IdentityError(f"the identity is for {agent.address}, but the wallet signs as {wallet.address}")
        return agent.budget_key, agent
    if not agent:
        if wallet is None:
            return "default", None
        identity = Identity(wallet.address)
        return identity.budget_key, identity
    if wallet is not None and _looks_like_ens(agent):
        ns = ens_of(web3) if web3 is not None else ens_from_env(environ)
        if ns is not None:
            identity = Identity(wallet.address, verify_ens_name(ns, agent, wallet.address), verified=True)
            return identity.budget_key, identity
    return agent, None


# --- the identity on the wire ---------------------------------------------------------------------------------


def _header_value(text: str) -> str:
    """Visible ASCII as is; anything else (unicode names, control characters) percent-encoded (UTF-8)."""
    return quote(text, safe=_HEADER_SAFE)


def identity_headers(identity: Identity | str | None, intent: str | None) -> dict[str, str]:
    """The headers that carry who calls and why: ``llm402-agent`` (the verified ENS name, else the address or the
    agent id) and ``llm402-intent`` (when there is one). Non-ASCII is percent-encoded as UTF-8."""
    headers: dict[str, str] = {}
    label = identity.budget_key if isinstance(identity, Identity) else identity
    if label:
        headers[AGENT_HEADER] = _header_value(label)
    if intent:
        headers[INTENT_HEADER] = _header_value(intent)
    return headers


def control_character(text: str) -> str | None:
    """The first character of ``text`` that must never reach a signed message, as ``U+XXXX``, else ``None``: a control
    character (Unicode category Cc: C0, DEL, C1) or a line or paragraph separator (U+2028, U+2029). Any of them could
    start a new line, or a new field, in the text a wallet signs."""
    if text.isascii() and text.isprintable():
        return None
    for char in text:
        if char in _LINE_SEPARATORS or unicodedata.category(char) == "Cc":
            return f"U+{ord(char):04X}"
    return None


def _signed_text(field: str, value: object) -> str:
    """``value`` of the challenge's ``field`` when it is text that can be signed; `IdentityError` otherwise."""
    if not isinstance(value, str):
        raise IdentityError(f"the gateway's sign-in-with-x challenge has a {field} that is not text")
    found = control_character(value)
    if found is not None:
        raise IdentityError(
            f"the gateway's sign-in-with-x challenge holds a control character ({found}) in {field}: "
            "refusing to sign it"
        )
    return value


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def siwx_headers(
    extensions: Mapping[str, Any] | None,
    signer: Signer,
    request_url: str,
    *,
    network: str | None = None,
) -> dict[str, str]:
    """Answer a 402's sign-in-with-x extension: the ``sign-in-with-x`` header (an EIP-4361 message signed by
    ``signer``, as base64 JSON in the x402 SDK's ``SIWxPayload`` shape), or ``{}`` when the challenge declares no EVM
    sign-in.

    ``request_url`` is the URL that answered the 402: a challenge whose domain or URI is another origin is refused
    (`IdentityError`), so a gateway cannot make the wallet sign in somewhere else. So is a challenge with a control
    character or a line separator in any field (`control_character`): a line break in a ``requestId`` or a
    ``resources`` item would add lines, and fields, to the text the wallet signs. ``network`` (CAIP-2) picks that
    chain when several are offered. Built on the ``siwe`` package (the SDK's extension module needs ``jsonschema``
    just to import), and checked against the SDK's verifier in the tests.
    """
    declaration = (extensions or {}).get(SIWX_HEADER)
    if not isinstance(declaration, Mapping):
        return {}
    info = declaration.get("info")
    chains = declaration.get("supportedChains")
    if not isinstance(info, Mapping) or not isinstance(chains, list):
        raise IdentityError("the gateway's sign-in-with-x extension is malformed (info/supportedChains)")
    evm = [
        str(c["chainId"])
        for c in chains
        if isinstance(c, Mapping) and c.get("type") == "eip191" and _EVM_CHAIN.fullmatch(str(c.get("chainId", "")))
    ]
    if not evm:
        return {}
    chain_id = network if network in evm else evm[0]
    for required in ("domain", "uri", "nonce", "issuedAt"):
        if not isinstance(info.get(required), str) or not info[required]:
            raise IdentityError(f"the gateway's sign-in-with-x challenge has no {required}")
    # Every field the gateway chose goes into the signed text: no control character or line break in any of them,
    # checked before anything else reads them (the origin check below compares parsed URLs, which drop CR, LF, tab).
    text = {name: _signed_text(name, info[name]) for name in _SIWX_TEXT if info.get(name) is not None}
    resources = info.get("resources")
    if resources is not None:
        if not isinstance(resources, list):
            raise IdentityError("the gateway's sign-in-with-x challenge has resources that are not a list")
        resources = [_signed_text(f"resources[{i}]", item) for i, item in enumerate(resources)]
    domain, uri = text["domain"], text["uri"]
    origin = _origin(request_url)
    if domain != urlsplit(request_url).netloc or _origin(uri) != origin:
        raise IdentityError(
            f"refusing to sign in with x: the challenge is for {domain} ({_origin(uri)}), but {origin} asked for it"
        )
    fields: dict[str, Any] = {
        "domain": domain,
        "address": signer.address,
        "uri": uri,
        "version": text.get("version") or "1",
        "chainId": chain_id,
        "type": "eip191",
        "nonce": text["nonce"],
        "issuedAt": text["issuedAt"],
    }
    for name in ("statement", "expirationTime", "notBefore", "requestId"):
        if name in text:
            fields[name] = text[name]
    if resources is not None:
        fields["resources"] = resources

    from siwe import SiweMessage

    try:
        message = SiweMessage(
            domain=domain,
            address=signer.address,
            statement=fields.get("statement"),
            uri=uri,
            version=fields["version"],
            chain_id=int(chain_id.split(":", 1)[1]),
            nonce=fields["nonce"],
            issued_at=fields["issuedAt"],
            expiration_time=fields.get("expirationTime"),
            not_before=fields.get("notBefore"),
            request_id=fields.get("requestId"),
            resources=fields.get("resources"),
        ).prepare_message()
    except ValueError as exc:  # pydantic's ValidationError included
        raise IdentityError(f"the gateway's sign-in-with-x challenge is not a valid SIWE message: {exc}") from None
    fields["signature"] = "0x" + signer.sign_message(message).hex()
    encoded = base64.b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode("ascii")
    return {SIWX_HEADER: encoded}
