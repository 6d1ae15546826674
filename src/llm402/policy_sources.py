"""Where a `Policy` comes from, and how several combine: code, a file, the AgentPolicy contract, ENS text records.

Every source is a constraint, never a grant. Combined with `merge_policies` (or `MergedPolicySource` for live
sources), the strictest rule of each kind wins: the smallest cap, the intersection of allow-lists. So the order of
sources never matters, and no source can loosen what another forbids.

Live sources (`ContractPolicySource`, `EnsPolicySource`) cache what they read and read again once ``ttl`` seconds
have passed on their clock (injectable), so a change written on chain applies to the agent's next call after that,
without a restart. They fail closed: a definitive answer from the chain (an agent without a policy, a malformed
record) refuses every call until it changes; an unreachable RPC keeps the last policy read for at most
``max_stale`` seconds more, then refuses every call.

web3 is imported only when a chain is read: ``import llm402`` stays cheap.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import ConfigurationError, PolicyRefusal
from .identity import ens_of
from .money import MAX_UINT256, atomic_to_usd, usd_to_atomic
from .policy import Policy

if TYPE_CHECKING:
    from ens import ENS
    from web3 import Web3

log = logging.getLogger("llm402")

CONTRACT_NAME = "AgentPolicy"
UNLIMITED = MAX_UINT256
"""What AgentPolicy stores for "no limit" (``max_value(uint256)``)."""
EXACT_LIMIT = 10**24
"""Caps above this many minor units (10^18 USD) count as no limit: they are past what a `Policy` holds exactly."""
BATCH = 64  # AgentPolicy's MAX_BATCH
TEXT_KEYS: Mapping[str, str] = {
    "llm402.max_ticket": "max_payment_usd",
    "llm402.daily_cap": "daily_cap_usd",
    "llm402.total_budget": "total_budget_usd",
    "llm402.intents": "allowed_intents",
    "llm402.models": "allowed_models",
}
"""ENS text record -> `Policy` field. Caps are USD decimals (``"0.05"``); lists are comma-separated names."""


class PolicySourceError(ConfigurationError):
    """A source answered, and its answer is not a usable policy (no policy for the agent, a malformed record)."""

    code = "policy_source_error"


class PolicyUnavailable(PolicyRefusal):
    """No current policy can be had (the source refused or its chain is unreachable past ``max_stale``): llm402
    refuses the call before any traffic rather than spend without a policy."""

    code = "policy_unavailable"


@runtime_checkable
class PolicySource(Protocol):
    """Anything that knows the policy in force now. A `Gateway` asks it once per call."""

    def current(self) -> Policy:
        """The policy to apply to the next call (may raise `PolicyUnavailable`)."""
        ...


# --- merging ------------------------------------------------------------------------------------------------------

_CAPS = (
    "max_payment_usd",
    "daily_cap_usd",
    "total_budget_usd",
    "global_cap_usd",
    "topup_max_usd",
    "daily_topup_cap_usd",
)
_SETS = ("allowed_intents", "allowed_models", "allowed_networks")
_ANY_MODEL = "*"


def _min_cap(values: Sequence[Decimal | None]) -> Decimal | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _intersect(values: Sequence[frozenset[str] | None]) -> frozenset[str] | None:
    present = [v for v in values if v is not None]
    return frozenset.intersection(*present) if present else None


def _intersect_folded(values: Sequence[frozenset[str] | None]) -> frozenset[str] | None:
    """Case-insensitive intersection (addresses); keeps the first policy's spelling."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    common = frozenset.intersection(*(frozenset(x.lower() for x in v) for v in present))
    return frozenset(x for x in present[0] if x.lower() in common)


def _intersect_models(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    if _ANY_MODEL in a:
        return b if _ANY_MODEL not in b else frozenset({_ANY_MODEL})
    return a if _ANY_MODEL in b else a & b


def _merge_models_by_intent(
    values: Sequence[dict[str, frozenset[str]] | None],
) -> dict[str, frozenset[str]] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    merged: dict[str, frozenset[str]] = {}
    for mapping in present:
        for intent, models in mapping.items():
            merged[intent] = _intersect_models(merged[intent], models) if intent in merged else frozenset(models)
    return merged


def _merge_assets(values: Sequence[frozenset[str] | None]) -> frozenset[str] | None:
    """``None`` admits the x402 SDK's known stablecoins; mixed with explicit lists, only listed stablecoins remain."""
    explicit = _intersect_folded(values)
    if explicit is None or all(v is not None for v in values):
        return explicit
    from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS

    known = {str(entry["asset"]).lower() for entries in DEFAULT_ASSETS.values() for entry in entries}
    return frozenset(a for a in explicit if a.lower() in known)


def merge_policies(*policies: Policy) -> Policy:
    """One policy that allows only what every given policy allows: the strictest cap of each kind, the intersection
    of every allow-list (``None``, "no restriction", is the identity), the shortest validity window, and HTTP, one
    round trip and a preference for upto only where all agree. ``merge_policies()`` is the default policy."""
    if not policies:
        return Policy()
    if len(policies) == 1:
        return policies[0]
    merged: dict[str, Any] = {}
    for name in _CAPS:
        merged[name] = _min_cap([getattr(p, name) for p in policies])
    for name in _SETS:
        merged[name] = _intersect([getattr(p, name) for p in policies])
    merged["allowed_payees"] = _intersect_folded([p.allowed_payees for p in policies])
    merged["allowed_assets"] = _merge_assets([p.allowed_assets for p in policies])
    merged["allowed_schemes"] = frozenset.intersection(*(p.allowed_schemes for p in policies))
    merged["models_by_intent"] = _merge_models_by_intent([p.models_by_intent for p in policies])
    merged["max_validity_seconds"] = min(p.max_validity_seconds for p in policies)
    merged["topup_min_usd"] = _min_cap([p.topup_min_usd for p in policies])  # a preferred size: the smallest
    merged["allow_insecure_http"] = all(p.allow_insecure_http for p in policies)
    merged["one_round_trip"] = all(p.one_round_trip for p in policies)
    merged["prefer_upto"] = all(p.prefer_upto for p in policies)
    merged["allow_unpriced"] = all(p.allow_unpriced for p in policies)
    allowed = set.intersection(*(set(p.payment_protocols) for p in policies))  # the first's order of preference
    merged["payment_protocols"] = tuple(r for r in policies[0].payment_protocols if r in allowed) or ("x402",)
    merged["alert_at"] = tuple(sorted({t for p in policies for t in p.alert_at}))  # every source's alerts
    unknown = set(Policy.model_fields) - set(merged)
    for name in sorted(unknown):  # a field added to Policy later: merge it only if every policy agrees
        values = {repr(getattr(p, name)) for p in policies}
        if len(values) > 1:
            raise ConfigurationError(f"merge_policies does not know how to merge differing values of {name!r}")
        merged[name] = getattr(policies[0], name)
    return Policy.model_validate(merged)


class MergedPolicySource:
    """Several sources (fixed `Policy` values or live `PolicySource` objects) seen as one: `merge_policies` of their
    current policies, read at every call (each live source keeps its own cache and TTL)."""

    def __init__(self, *sources: Policy | PolicySource) -> None:
        if not sources:
            raise ConfigurationError("MergedPolicySource needs at least one source")
        self.sources: tuple[Policy | PolicySource, ...] = sources

    def current(self) -> Policy:
        """The strictest combination of every source's current policy."""
        return merge_policies(*(s if isinstance(s, Policy) else s.current() for s in self.sources))

    def __repr__(self) -> str:
        return f"MergedPolicySource({', '.join(repr(s) for s in self.sources)})"


# --- refreshing ---------------------------------------------------------------------------------------------------


class RefreshingPolicySource:
    """A cached policy, read again after ``ttl`` seconds of ``clock``. Subclasses implement `load`.

    `load` raising `PolicySourceError` is a definitive answer: every call is refused until a later read succeeds.
    Any other exception is a transient failure: the last good policy is served for at most ``max_stale`` seconds
    past its TTL (a failed read is retried after ``retry_seconds``), then every call is refused.
    """

    def __init__(
        self,
        *,
        ttl: float = 60.0,
        max_stale: float = 300.0,
        retry_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0 or max_stale < 0 or retry_seconds < 0:
            raise ConfigurationError("ttl, max_stale and retry_seconds must not be negative")
        self.ttl = ttl
        self.max_stale = max_stale
        self.retry_seconds = retry_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._policy: Policy | None = None
        self._error: PolicySourceError | None = None
        self._fresh_until = float("-inf")
        self._stale_until = float("-inf")

    def load(self) -> Policy:
        """Read the policy from its source (I/O). Raise `PolicySourceError` for a definitive refusal."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short, secret-free name for messages."""
        return type(self).__name__

    def current(self) -> Policy:
        """The cached policy while fresh, else a new read (see the class docstring for failures)."""
        with self._lock:
            now = self.clock()
            if now >= self._fresh_until:
                self._read(now)
            if self._error is not None:
                raise PolicyUnavailable(f"no policy from {self.describe()}: {self._error}")
            if self._policy is None:
                raise PolicyUnavailable(f"no policy from {self.describe()}: its source is unreachable")
            return self._policy

    def refresh(self) -> Policy:
        """Read now, whatever the TTL says."""
        with self._lock:
            self._fresh_until = float("-inf")
        return self.current()

    def _read(self, now: float) -> None:
        try:
            policy = self.load()
        except PolicySourceError as exc:
            self._policy, self._error = None, exc
            self._fresh_until = now + self.ttl
            self._stale_until = float("-inf")
            log.warning("llm402: %s refuses: %s", self.describe(), exc)
            return
        except Exception as exc:  # the RPC, a revert, a decoding error: transient until max_stale
            self._fresh_until = now + min(self.retry_seconds, self.ttl)
            if self._policy is not None and now < self._stale_until:
                log.warning(
                    "llm402: cannot refresh %s (%s); keeping the last policy read", self.describe(), type(exc).__name__
                )
            else:
                self._policy = None
                if self._error is None:
                    log.error("llm402: cannot read %s (%s)", self.describe(), type(exc).__name__)
            return
        self._policy, self._error = policy, None
        self._fresh_until = now + self.ttl
        self._stale_until = now + self.ttl + self.max_stale


# --- the AgentPolicy contract ---------------------------------------------------------------------------------------


def name_hash(name: str) -> bytes:
    """keccak256 of the UTF-8 name: how AgentPolicy stores intents and models."""
    from eth_utils.crypto import keccak

    return bytes(keccak(text=name))


def agent_policy_source_code() -> str:
    """The Vyper source of AgentPolicy, as shipped with llm402."""
    return files("llm402").joinpath("contracts", f"{CONTRACT_NAME}.vy").read_text(encoding="utf-8")


def agent_policy_abi() -> list[dict[str, Any]]:
    """AgentPolicy's ABI, as shipped with llm402 (reading the contract needs no compiler)."""
    text = files("llm402").joinpath("contracts", f"{CONTRACT_NAME}.abi.json").read_text(encoding="utf-8")
    abi: list[dict[str, Any]] = json.loads(text)
    return abi


def compile_agent_policy() -> tuple[list[dict[str, Any]], str]:
    """Compile the shipped AgentPolicy with the ``vyper`` package (``pip install llm402[onchain]``): (abi, bytecode)."""
    try:
        import vyper
    except ImportError:
        raise ConfigurationError("compiling AgentPolicy needs vyper: pip install 'llm402[onchain]'") from None
    out = vyper.compile_code(agent_policy_source_code(), output_formats=["abi", "bytecode"])
    return out["abi"], out["bytecode"]


def deploy_agent_policy(web3: Web3, *, sender: str | None = None) -> str:
    """Compile and deploy AgentPolicy from ``sender`` (default: ``web3.eth.default_account``), which becomes its
    owner; return the contract's address. For real networks, review and deploy with your usual tooling instead."""
    abi, bytecode = compile_agent_policy()
    factory = web3.eth.contract(abi=abi, bytecode=bytecode)
    tx: dict[str, Any] = {"from": sender} if sender else {}
    receipt = web3.eth.wait_for_transaction_receipt(factory.constructor().transact(tx))
    address = receipt["contractAddress"]
    if not address:
        raise PolicySourceError("AgentPolicy deployment produced no contract address")
    return str(address)


def _usd(minor: int) -> Decimal | None:
    return None if minor >= EXACT_LIMIT else atomic_to_usd(minor)


def _listed(fn: Callable[[str, list[bytes]], Any], agent: str, names: Sequence[str]) -> frozenset[str]:
    allowed: set[str] = set()
    for start in range(0, len(names), BATCH):
        chunk = names[start : start + BATCH]
        flags = fn(agent, [name_hash(n) for n in chunk]).call()
        allowed.update(n for n, ok in zip(chunk, flags, strict=True) if ok)
    return frozenset(allowed)


def _names(values: Iterable[str] | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        raise ConfigurationError("give candidate names as a collection, not one string")
    return tuple(sorted(set(values)))


class _AgentPolicyReader:
    """One AgentPolicy contract seen for one agent; `read` returns (revision, policy)."""

    def __init__(
        self,
        web3: Web3,
        address: str,
        agent: str,
        intents: Iterable[str] | None,
        models: Iterable[str] | None,
    ) -> None:
        from eth_utils.address import is_address, to_checksum_address

        for label, value in (("contract", address), ("agent", agent)):
            if not isinstance(value, str) or not is_address(value):
                raise ConfigurationError(f"AgentPolicy {label} must be an Ethereum address, got {value!r}")
        contract_address = to_checksum_address(address)
        self.address = str(contract_address)
        self.agent = str(to_checksum_address(agent))
        self.intents = _names(intents)
        self.models = _names(models)
        self.contract = web3.eth.contract(address=contract_address, abi=agent_policy_abi())

    def revision(self) -> tuple[int, tuple[Any, ...]]:
        limits = tuple(self.contract.functions.policy_of(self.agent).call())
        configured, _ticket, _daily, _total, _any_intent, _any_model, revision = limits
        if not configured:
            raise PolicySourceError(
                f"agent {self.agent} has no policy on AgentPolicy {self.address} (never set, or revoked): "
                "the owner must call set_policy"
            )
        return int(revision), limits

    def policy(self, limits: tuple[Any, ...]) -> Policy:
        _configured, ticket, daily, total, any_intent, any_model, _revision = limits
        functions = self.contract.functions
        intents = None if any_intent else _listed(functions.intents_listed, self.agent, self.intents)
        models = None if any_model else _listed(functions.models_listed, self.agent, self.models)
        return Policy(
            max_payment_usd=_usd(int(ticket)),
            daily_cap_usd=_usd(int(daily)),
            total_budget_usd=_usd(int(total)),
            allowed_intents=intents,
            allowed_models=models,
        )


def policy_from_contract(
    web3: Web3,
    address: str,
    agent: str,
    *,
    intents: Iterable[str] | None = None,
    models: Iterable[str] | None = None,
) -> Policy:
    """The policy AgentPolicy at ``address`` holds for ``agent`` (its wallet address), read once.

    The contract stores keccak256 hashes, so it can only confirm names it is asked about: ``intents`` and ``models``
    are the candidate names (the ones the agent uses). The policy allows those the contract lists, or any name when
    the contract's any_intent / any_model flag is set; without candidates and without the flag, nothing is allowed.
    Caps of ``max_value(uint256)`` are no limit. Raises `PolicySourceError` when the agent has no policy.
    """
    reader = _AgentPolicyReader(web3, address, agent, intents, models)
    _revision, limits = reader.revision()
    return reader.policy(limits)


class ContractPolicySource(RefreshingPolicySource):
    """`policy_from_contract`, cached for ``ttl`` seconds. A refresh costs one call when nothing changed (the
    contract's per-agent revision), three otherwise."""

    def __init__(
        self,
        web3: Web3,
        address: str,
        agent: str,
        *,
        intents: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
        ttl: float = 60.0,
        max_stale: float = 300.0,
        retry_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ttl=ttl, max_stale=max_stale, retry_seconds=retry_seconds, clock=clock)
        self._reader = _AgentPolicyReader(web3, address, agent, intents, models)
        self._revision: int | None = None
        self._last: Policy | None = None

    @property
    def address(self) -> str:
        """The contract's checksummed address."""
        return self._reader.address

    @property
    def agent(self) -> str:
        """The agent's checksummed address."""
        return self._reader.agent

    def describe(self) -> str:
        """AgentPolicy at 0x... for 0x..."""
        return f"AgentPolicy {self.address} for {self.agent}"

    def load(self) -> Policy:
        """Read the agent's revision; read the rest only when it changed."""
        revision, limits = self._reader.revision()
        if self._last is not None and revision == self._revision:
            return self._last
        policy = self._reader.policy(limits)
        self._revision, self._last = revision, policy
        return policy

    def allows_intent(self, name: str) -> bool:
        """Whether the contract allows this intent for the agent now (one call, no cache; any name)."""
        return bool(self._reader.contract.functions.intent_allowed(self.agent, name_hash(name)).call())

    def allows_model(self, name: str) -> bool:
        """Whether the contract allows this model for the agent now (one call, no cache; any name)."""
        return bool(self._reader.contract.functions.model_allowed(self.agent, name_hash(name)).call())

    def __repr__(self) -> str:
        return f"ContractPolicySource({self.address!r}, agent={self.agent!r}, ttl={self.ttl})"


# --- ENS text records -----------------------------------------------------------------------------------------------


def _text_list(value: str) -> frozenset[str] | None:
    items = frozenset(item.strip() for item in value.split(",") if item.strip())
    return None if items == {"*"} else items


def policy_from_text_records(records: Mapping[str, str], *, source: str = "ENS text records") -> Policy:
    """A policy from ``llm402.*`` text records (see `TEXT_KEYS`); empty or missing records set nothing.
    Raises `PolicySourceError` for a record that is not a USD amount or a list."""
    fields: dict[str, Any] = {}
    for key, field in TEXT_KEYS.items():
        value = (records.get(key) or "").strip()
        if not value:
            continue
        if field.endswith("_usd"):
            try:
                usd_to_atomic(value)
            except (ValueError, TypeError) as exc:
                raise PolicySourceError(f"{source}: {key}={value[:40]!r} is not a USD amount ({exc})") from None
            fields[field] = Decimal(value.lstrip("$"))
        else:
            fields[field] = _text_list(value)
    try:
        return Policy.from_mapping(fields, source=source)
    except ConfigurationError as exc:
        raise PolicySourceError(str(exc)) from None


def policy_from_ens(web3: Web3 | ENS, name: str) -> Policy:
    """The policy in the ``llm402.*`` text records of ENS ``name``, read through its resolver once."""
    ns = ens_of(web3)
    records = {key: ns.get_text(name, key) or "" for key in TEXT_KEYS}
    return policy_from_text_records(records, source=f"ENS text records of {name}")


class EnsPolicySource(RefreshingPolicySource):
    """`policy_from_ens`, cached for ``ttl`` seconds (five text records per refresh)."""

    def __init__(
        self,
        web3: Web3 | ENS,
        name: str,
        *,
        ttl: float = 300.0,
        max_stale: float = 900.0,
        retry_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ttl=ttl, max_stale=max_stale, retry_seconds=retry_seconds, clock=clock)
        self._ens = ens_of(web3)
        self.name = name

    def describe(self) -> str:
        """ENS text records of <name>."""
        return f"ENS text records of {self.name}"

    def load(self) -> Policy:
        """Read the five ``llm402.*`` records."""
        return policy_from_ens(self._ens, self.name)

    def __repr__(self) -> str:
        return f"EnsPolicySource({self.name!r}, ttl={self.ttl})"
