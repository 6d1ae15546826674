"""The call flow as a state machine with no I/O (the sans-IO pattern).

`call_flow` is a generator: it yields *effects* (reserve, send, sign, deliver, answer, finish) and receives their
results; a transport performs them. httpx and httpx2, sync and async, all drive this one machine, so every rule that
protects money lives here once: policy before traffic, reserve before send, one signature per challenge per logical
call, one replay, ``x-should-retry: false`` after a payment, reconcile on every ending.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, Literal
from urllib.parse import urlsplit

from .approval import Approval, PaymentProposal, external_payment
from .budget.base import DEFAULT_RESERVATION_TTL, Caps, Hold
from .credit import CreditProfile, siwe_message, topup_amount, topup_body
from .errors import (
    REFUSAL_HEADER,
    ApiKeyRejected,
    InsecureGateway,
    PaymentOutcomeUnknown,
    PaymentRejected,
    PaymentRequiredError,
    PolicyRefusal,
)
from .metering import Usage
from .money import atomic_to_usd, format_usd, usd_to_atomic
from .policy import Policy
from .pricing import PriceCatalog, estimate_cost, max_completion_tokens
from .receipts import PaymentRecord, Receipt
from .x402 import (
    Challenge,
    Requirement,
    Settlement,
    SignedPayment,
    decode_settlement,
    parse_challenge,
    select_requirement,
)

log = logging.getLogger("llm402")
_GEMINI_PATH = re.compile(r"/models/([^/:]+):(?:generateContent|streamGenerateContent)$")
REUSE_MARGIN_SECONDS = 5.0
_MICRO = Decimal("0.000001")
SIGN_IN_WITH_X = "sign-in-with-x"  # x402's extension key (and header name) for proving who pays
TESTNET_CHAIN_IDS = frozenset({84532, 11155111, 421614, 11155420, 80002, 43113, 97, 4002, 1337, 31337})


# --- what the flow asks for ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    """Status and headers of a response; ``body`` only for a 402 (read, bounded) so it can be parsed."""

    status: int
    headers: Mapping[str, str]
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a delivered response body ended."""

    usage: Usage | None
    aborted: bool = False
    error: str | None = None
    body: bytes | None = field(default=None, repr=False)
    settlement: Settlement | None = None
    """A settlement reported after the body (an upto stream's final ``: payment-response`` SSE comment)."""


@dataclass(frozen=True, slots=True)
class Reserve:
    """Reserve in the ledger (atomic; may raise `BudgetExceeded`)."""

    hold: Hold
    caps: Caps


@dataclass(frozen=True, slots=True)
class Grow:
    """Raise the reservation to a quoted amount (may raise `BudgetExceeded`)."""

    call_id: str
    amount: int
    caps: Caps


@dataclass(frozen=True, slots=True)
class Sign:
    """Sign the chosen requirement (may raise `SignerError`)."""

    challenge: Challenge
    requirement: Requirement
    resource_url: str


@dataclass(frozen=True, slots=True)
class Expose:
    """Record that a signed payment is outstanding until ``valid_before``."""

    call_id: str
    amount: int
    valid_before: float


@dataclass(frozen=True, slots=True)
class Send:
    """Send the caller's request with these headers set and this body; the result is a `Head`.

    With ``url`` set it is a request of llm402's own (a credit top-up, a key mint): only ``headers`` are sent.
    ``read_body`` asks for the (bounded) body of any status, not only a 402's.
    """

    headers: Mapping[str, str]
    body: bytes
    method: str | None = None
    url: str | None = None
    read_body: bool = False


@dataclass(frozen=True, slots=True)
class SignMessage:
    """Sign an EIP-191 message (SIWE); the result is the 0x-hex signature."""

    text: str


@dataclass(frozen=True, slots=True)
class StoreKey:
    """Keep a freshly minted API key where the user said."""

    key: str


@dataclass(frozen=True, slots=True)
class Approve:
    """Ask the approver about a payment; the result is an `Approval` (or a bool)."""

    proposal: PaymentProposal


@dataclass(frozen=True, slots=True)
class SignIn:
    """Answer a 402's sign-in-with-x extension; the result is the headers to add to the replay (maybe none)."""

    extensions: Mapping[str, Any]
    url: str
    network: str


@dataclass(frozen=True, slots=True)
class Remaining:
    """How much every cap still admits for this agent today (``None``: no cap); the result is ``int | None``."""

    agent: str
    day: str
    caps: Caps


@dataclass(frozen=True, slots=True)
class Record:
    """Store and publish a receipt that reserved nothing (a top-up)."""

    receipt: Receipt


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand the last response to the caller with these headers added, metering its body; resumes with `StreamEnd`."""

    headers: Mapping[str, str]
    strip_usage_event: bool
    deadline_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer the caller locally, without (further) network traffic."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @classmethod
    def refusal(cls, error: PaymentRequiredError, status: int = 402) -> Answer:
        """The local 402 envelope for a refusal."""
        return cls(
            status,
            {"content-type": "application/json", "x-should-retry": "false", REFUSAL_HEADER: error.code},
            json.dumps(error.envelope()).encode(),
        )


@dataclass(frozen=True, slots=True)
class Finish:
    """Settle the reservation to ``actual`` (``reserved=False``: nothing was reserved) and publish the receipt.

    ``outstanding``: how much of a signed payment's unsettled remainder can still move (``None``: all of it)."""

    call_id: str
    actual: int
    receipt: Receipt
    reserved: bool = True
    outstanding: int | None = None


Effect = (
    Reserve
    | Grow
    | Sign
    | Expose
    | Send
    | Deliver
    | Answer
    | Finish
    | SignMessage
    | StoreKey
    | Approve
    | Remaining
    | Record
    | SignIn
)


# --- the request as the flow sees it ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallRequest:
    """One outgoing request, read once by the transport."""

    method: str
    url: str
    body: bytes
    json: Mapping[str, Any] | None
    model: str | None
    streaming: bool
    fingerprint: str

    @property
    def origin(self) -> str:
        """scheme://host[:port]."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def path(self) -> str:
        """The URL path."""
        return urlsplit(self.url).path


def describe_request(method: str, url: str, content_type: str | None, body: bytes) -> CallRequest:
    """Read what the flow needs from a request: its JSON, model and whether it streams."""
    data: Mapping[str, Any] | None = None
    if body and (content_type is None or "json" in content_type):
        try:
            parsed = json.loads(body)
            data = parsed if isinstance(parsed, Mapping) else None
        except ValueError:
            data = None
    model = data.get("model") if data is not None else None
    path = urlsplit(url).path
    if not isinstance(model, str):
        match = _GEMINI_PATH.search(path)
        model = match.group(1) if match else None
    streaming = bool(data and data.get("stream") is True) or path.endswith(":streamGenerateContent")
    digest = hashlib.sha256(method.encode() + b" " + url.encode() + b"\n" + body).hexdigest()
    return CallRequest(method, url, body, data, model, streaming, digest)


def with_usage_requested(call: CallRequest) -> tuple[bytes, bool]:
    """Add ``stream_options.include_usage`` to a streamed chat request that lacks it (so it can be metered)."""
    data = call.json
    if not call.streaming or data is None or not call.path.endswith("/chat/completions"):
        return call.body, False
    options = data.get("stream_options")
    if isinstance(options, Mapping) and options.get("include_usage") is not None:
        return call.body, False
    merged = {
        **data,
        "stream_options": {**(options if isinstance(options, Mapping) else {}), "include_usage": True},
    }
    return json.dumps(merged, separators=(",", ":")).encode(), True


# --- payments whose outcome is unknown ------------------------------------------------------------------------


class PaymentMemory:
    """Signed payments by request fingerprint. A retry of a call whose paid attempt failed without a clear answer
    re-sends the same authorization (its nonce makes a second settlement impossible); it never signs another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[SignedPayment, bool]] = {}

    def remember(self, fingerprint: str, payment: SignedPayment) -> None:
        """A payment was signed for this request (outcome pending)."""
        with self._lock:
            now = time.time()
            for key in [k for k, (p, _) in self._entries.items() if p.valid_before < now]:
                del self._entries[key]
            self._entries[fingerprint] = (payment, False)

    def mark_unknown(self, fingerprint: str) -> None:
        """The paid attempt ended without a usable answer: a retry may re-send this payment."""
        with self._lock:
            entry = self._entries.get(fingerprint)
            if entry is not None:
                self._entries[fingerprint] = (entry[0], True)

    def forget(self, fingerprint: str) -> None:
        """The paid attempt got its answer (or a definite refusal)."""
        with self._lock:
            self._entries.pop(fingerprint, None)

    def reusable(self, fingerprint: str, now: float) -> SignedPayment | None:
        """The payment to re-send for a retry, if one is outstanding and still valid."""
        with self._lock:
            entry = self._entries.get(fingerprint)
            if entry is None or not entry[1]:
                return None
            if entry[0].valid_before - REUSE_MARGIN_SECONDS <= now:
                del self._entries[fingerprint]
                return None
            return entry[0]


class QuoteMemory:
    """Payment requirements a gateway asked for, by request shape, so the next identical-shaped call can pay with
    its first request (one round trip). Bounded LRU; entries expire after ``ttl`` seconds."""

    def __init__(self, size: int = 1024, ttl: float = 300.0) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Any, ...], tuple[Challenge, float]] = OrderedDict()
        self._size = size
        self._ttl = ttl

    def get(self, key: tuple[Any, ...], now: float) -> Challenge | None:
        """The remembered challenge for ``key``, if fresh."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[1] + self._ttl < now:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: tuple[Any, ...], challenge: Challenge, now: float) -> None:
        """Remember what this shape of request cost."""
        with self._lock:
            self._entries[key] = (challenge, now)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def forget(self, key: tuple[Any, ...]) -> None:
        """The gateway asked for something else: drop the stale quote."""
        with self._lock:
            self._entries.pop(key, None)


def quote_key(call: CallRequest) -> tuple[Any, ...]:
    """What a price depends on, conservatively: endpoint, model, completion budget, streaming, body size."""
    budget = max_completion_tokens(call.json) if call.json is not None else None
    return (call.method, call.url, call.model, budget, call.streaming, len(call.body))


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A deterministic answer kept by the opt-in response cache."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = field(repr=False)
    cost: int
    prompt_tokens: int
    completion_tokens: int


class ResponseCache:
    """Opt-in cache of deterministic answers (temperature 0 or a seed; same model, messages, tools): an identical
    request is answered locally and never paid twice. Bounded LRU by entries."""

    def __init__(self, size: int = 1024) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._size = size

    @staticmethod
    def cacheable(call: CallRequest) -> bool:
        """Non-streamed requests whose answer is deterministic."""
        data = call.json
        if data is None or call.streaming or call.method != "POST":
            return False
        if call.path.endswith("/embeddings"):
            return True
        return data.get("temperature") == 0 or data.get("seed") is not None

    def get(self, call: CallRequest) -> CachedAnswer | None:
        """The cached answer to this exact request."""
        with self._lock:
            hit = self._entries.get(call.fingerprint)
            if hit is not None:
                self._entries.move_to_end(call.fingerprint)
            return hit

    def put(self, call: CallRequest, answer: CachedAnswer) -> None:
        """Keep an answer."""
        with self._lock:
            self._entries[call.fingerprint] = answer
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


# --- configuration the flow reads ------------------------------------------------------------------------------


@dataclass(slots=True)
class FlowConfig:
    """Everything the flow reads. Plain values and pure lookups: no sockets, files or ledgers."""

    agent: str
    intent: str | None
    policy: Policy
    prices: PriceCatalog = field(default_factory=PriceCatalog)
    payments: PaymentMemory = field(default_factory=PaymentMemory)
    quotes: QuoteMemory = field(default_factory=QuoteMemory)
    cache: ResponseCache | None = None
    clock: Callable[[], float] = time.time
    cost_header: bool = True
    reservation_ttl: float = DEFAULT_RESERVATION_TTL
    max_stream_seconds: float | None = 600.0
    route: str | None = None
    base_url: str = ""
    payer: str | None = None
    credit: CreditProfile | None = None
    api_key: str | None = field(default=None, repr=False)  # a minted key: a secret
    mint_keys: bool = False
    approver: bool = False
    strip_fields: frozenset[str] = frozenset()
    identity_headers: Mapping[str, str] = field(default_factory=dict)
    """Who calls and why (``llm402-agent``, ``llm402-intent``), sent with every request."""
    policy_source: Callable[[], Policy] | None = None
    """A live policy (e.g. an on-chain source's ``current``): read into ``policy`` at the start of every call."""
    _caps: tuple[Policy, Caps] | None = field(default=None, repr=False, compare=False)

    def caps(self) -> Caps:
        """The policy's caps in micro-USDC (converted once per policy value)."""
        cached = self._caps
        if cached is None or cached[0] is not self.policy:
            cached = (self.policy, Caps(self.policy.daily_cap, self.policy.total_budget, self.policy.global_cap))
            self._caps = cached
        return cached[1]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport_security(url: str, network: str, policy: Policy) -> None:
    """Refuse to pay on a real network over plain HTTP to a non-loopback host (unless the policy opts in)."""
    parts = urlsplit(url)
    if parts.scheme == "https" or policy.allow_insecure_http or _is_loopback(parts.hostname or ""):
        return
    chain = int(network.split(":", 1)[1]) if network.startswith("eip155:") else 0
    if chain in TESTNET_CHAIN_IDS:
        return
    raise InsecureGateway(
        f"refusing to pay on {network} over plain HTTP to {parts.hostname}; use https or set allow_insecure_http",
        network=network,
    )


def _usage_cost(cfg: FlowConfig, model: str | None, usage: Usage | None) -> int | None:
    if usage is None:
        return None
    if usage.cost_usd is not None:
        return usd_to_atomic(usage.cost_usd.quantize(_MICRO, rounding=ROUND_CEILING))
    price = cfg.prices.lookup(model)
    return None if price is None else price.cost(usage.prompt_tokens, usage.completion_tokens)


def _payment_record(payment: SignedPayment, settlement: Settlement | None, *, reused: bool) -> PaymentRecord:
    req = payment.requirement
    return PaymentRecord(
        scheme=req.scheme,
        network=req.network,
        asset=req.asset,
        amount=payment.amount,
        payer=payment.payer,
        payee=req.pay_to,
        transaction=settlement.transaction if settlement else None,
        settled=settlement.success if settlement else None,
        reused=reused,
        settled_amount=settlement.amount if settlement and settlement.success else None,
    )


def _own_settlement(payment: SignedPayment, settlement: Settlement | None) -> Settlement | None:
    """The settlement report, unless it names another payer (then it says nothing about this payment)."""
    if settlement is not None and settlement.payer and settlement.payer.lower() != payment.payer.lower():
        log.warning("llm402: the gateway reported a settlement for another payer; ignoring it")
        return Settlement(False, None, None, None, None, error="settlement_for_another_payer")
    return settlement


def charged(payment: SignedPayment, settlement: Settlement | None) -> int:
    """What a signed payment may have moved, in atomic units: all of an exact authorization (a report cannot make
    it cheaper); for upto, the amount a successful settlement report names, never above the ceiling, and the whole
    ceiling while no such report has come (it may still be settled until it expires)."""
    if not payment.requirement.upto or settlement is None or not settlement.success or settlement.amount is None:
        return payment.amount
    if settlement.amount > payment.amount:
        log.warning("llm402: the gateway reported settling more than the upto ceiling; counting the ceiling")
        return payment.amount
    return settlement.amount


# --- the flow ------------------------------------------------------------------------------------------------


class _Refused(Exception):
    """Internal: a sub-flow ended the call with a refusal (already answered in the receipt's terms)."""

    def __init__(self, error: PaymentRequiredError, status: int = 402) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status


def _json_body(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _read_json(head: Head) -> Mapping[str, Any]:
    try:
        data = json.loads(head.body or b"")
    except ValueError:
        return {}
    return data if isinstance(data, Mapping) else {}


def _error_code(head: Head) -> str | None:
    err = _read_json(head).get("error")
    if isinstance(err, Mapping):
        err = err.get("code")
    return err if isinstance(err, str) else None


def _strip_fields(cfg: FlowConfig, call: CallRequest, body: bytes) -> bytes:
    """Remove request fields the gateway is known to reject (Token Kiosk: ``thinking``, ``reasoning_effort``)."""
    if not cfg.strip_fields or call.json is None:
        return body
    present = cfg.strip_fields & set(call.json)
    if not present:
        return body
    log.warning("llm402: removed %s, which this gateway rejects", ", ".join(sorted(present)))
    data = json.loads(body)
    for name in present:
        data.pop(name, None)
    return _json_body(data)


def _choose(head: Head, url: str, policy: Policy) -> tuple[Challenge, Requirement] | None:
    """402 -> the challenge and the requirement to pay (parse, select under policy, check the transport).
    ``None`` when the 402 is not an x402 challenge. Raises `PaymentRequiredError` for every refusal."""
    challenge = parse_challenge(head.headers, head.body or b"")
    if challenge is None:
        return None
    requirement = select_requirement(challenge, policy)
    check_transport_security(url, requirement.network, policy)
    return challenge, requirement


def _authorize(
    cfg: FlowConfig,
    challenge: Challenge,
    requirement: Requirement,
    url: str,
    model: str | None,
    kind: Literal["call", "topup"],
) -> Generator[Effect, Any, SignedPayment]:
    """Ask the approver (when one is set), then sign, or take the payment header the approver supplied."""
    if cfg.approver:
        proposal = PaymentProposal(kind, cfg.agent, cfg.intent, url, model, challenge.dialect, requirement)
        decision = yield Approve(proposal)
        if decision is False or (isinstance(decision, Approval) and decision.decision == "deny"):
            reason = decision.reason if isinstance(decision, Approval) else None
            raise PolicyRefusal(
                f"the approver denied a payment of {format_usd(requirement.amount)}: {reason or 'no reason given'}",
                code="approval_denied",
                requested=requirement.amount,
            )
        if isinstance(decision, Approval) and decision.decision == "external" and decision.header_value:
            return external_payment(proposal, decision.header_value)
    payment: SignedPayment = yield Sign(challenge, requirement, url)
    return payment


def _mint_key(cfg: FlowConfig, call: CallRequest, credit: CreditProfile) -> Generator[Effect, Any, str]:
    """Mint an API key with a fresh SIWE message (``issuedAt`` now, new nonce), keep it, return it."""
    if cfg.payer is None:
        raise PolicyRefusal("minting an API key needs a wallet", code="no_wallet")
    chain_id = credit.chain_id
    if chain_id is None:  # the gateway's chain, as its top-up 402 presents it
        probe = yield Send(
            {"content-type": "application/json"},
            topup_body(credit.min_topup),
            method="POST",
            url=cfg.base_url + credit.topup_path,
            read_body=True,
        )
        challenge = parse_challenge(probe.headers, probe.body or b"") if probe.status == 402 else None
        if challenge is None:
            raise PaymentRequiredError(
                f"cannot learn the gateway's chain from {credit.topup_path} (HTTP {probe.status}); "
                "set the credit profile's chain_id",
                code="key_mint_failed",
            )
        chain_id = int(challenge.requirements[0].network.split(":", 1)[1])
    text = siwe_message(cfg.payer, cfg.base_url + credit.keys_path, chain_id, credit.statement)
    signature: str = yield SignMessage(text)
    head = yield Send(
        {"content-type": "application/json"},
        _json_body({"message": text, "signature": signature, "label": f"llm402 {cfg.agent}"[:64]}),
        method="POST",
        url=cfg.base_url + credit.keys_path,
        read_body=True,
    )
    key = _read_json(head).get("key")
    if not (200 <= head.status < 300) or not isinstance(key, str):
        raise PaymentRequiredError(
            f"the gateway refused to mint an API key: {_reason(head)}", code="key_mint_failed", status=head.status
        )
    yield StoreKey(key)
    return key


def topup_flow(
    cfg: FlowConfig, credit: CreditProfile, needed: int, own_reservation: int = 0
) -> Generator[Effect, Any, Receipt]:
    """Buy credit with an x402 payment, bounded by the policy and what the caps have left; record it apart.

    Used by a call answered ``INSUFFICIENT_BALANCE`` and by ``llm402 topup``. Returns the top-up's receipt.
    """
    day = datetime.fromtimestamp(cfg.clock(), UTC).date().isoformat()
    remaining = yield Remaining(cfg.agent, day, cfg.caps())
    budget_left = None if remaining is None else remaining + own_reservation
    amount = topup_amount(needed, credit.min_topup, cfg.policy, budget_left)
    url = cfg.base_url + credit.topup_path
    origin = _origin(url)
    body = topup_body(amount)
    headers = {"content-type": "application/json", "accept-encoding": "identity"}
    started = cfg.clock()
    head = yield Send(headers, body, method="POST", url=url, read_body=True)
    if head.status != 402:
        raise PaymentRequiredError(f"top-up did not ask for payment: {_reason(head)}", code="topup_failed")
    limit = cfg.policy.model_copy(update={"max_payment_usd": atomic_to_usd(amount)})
    chosen = _choose(head, url, limit)
    if chosen is None:
        raise PaymentRequiredError(f"top-up answered an unreadable 402: {_reason(head)}", code="topup_failed")
    payment = yield from _authorize(cfg, *chosen, url, None, "topup")
    head = yield Send({**headers, payment.header_name: payment.header_value}, body, "POST", url, read_body=True)
    settlement = decode_settlement(head.headers)
    record = _payment_record(payment, settlement, reused=False)
    receipt = Receipt(
        call_id=os.urandom(16).hex(),
        agent=cfg.agent,
        intent=cfg.intent,
        gateway=origin,
        method="POST",
        path=credit.topup_path,
        model=None,
        status=head.status,
        streamed=False,
        started_at=started,
        latency_ms=round((cfg.clock() - started) * 1000, 3),
        payment=_as_topup(record),
        error=None if 200 <= head.status < 300 else f"http_{head.status}",
    )
    yield Record(receipt)
    if not 200 <= head.status < 300:
        raise PaymentRejected(f"the gateway refused the top-up payment: {_reason(head)}", amount=payment.amount)
    return receipt


def _as_topup(record: PaymentRecord) -> PaymentRecord:
    return replace(record, kind="topup")


def call_flow(cfg: FlowConfig, call: CallRequest) -> Generator[Effect, Any, None]:
    """One logical call, from policy check to receipt."""
    started = cfg.clock()
    call_id = os.urandom(16).hex()
    day = datetime.fromtimestamp(started, UTC).date().isoformat()

    def receipt(**fields: Any) -> Receipt:
        return Receipt(
            call_id=call_id,
            agent=cfg.agent,
            intent=cfg.intent,
            gateway=call.origin,
            method=call.method,
            path=call.path,
            model=call.model,
            streamed=call.streaming,
            started_at=started,
            latency_ms=round((cfg.clock() - started) * 1000, 3),
            route=cfg.route,
            **fields,
        )

    # 1. policy, before any traffic
    try:
        if cfg.policy_source is not None:
            cfg.policy = cfg.policy_source()
        cfg.policy.check_call(cfg.intent, call.model)
    except PolicyRefusal as refusal:
        yield Finish(call_id, 0, receipt(status=402, error=refusal.code), reserved=False)
        yield Answer.refusal(refusal)
        return
    caps = cfg.caps()

    # 2. a deterministic request answered before is answered from the cache: nothing is sent or paid
    cacheable = cfg.cache is not None and cfg.cache.cacheable(call)
    hit = cfg.cache.get(call) if cfg.cache is not None and cacheable else None
    if hit is not None:
        tokens = {"prompt_tokens": hit.prompt_tokens, "completion_tokens": hit.completion_tokens}
        yield Finish(call_id, 0, receipt(status=hit.status, cache_hit=True, saved=hit.cost, **tokens), reserved=False)
        yield Answer(hit.status, {**dict(hit.headers), "x-llm402-cache": "hit"}, hit.body)
        return

    # 3. a retry of a call whose payment is outstanding re-sends that payment, and reserves nothing new
    payment = cfg.payments.reusable(call.fingerprint, started)
    reused = payment is not None
    estimate = 0 if reused else estimate_cost(cfg.prices.lookup(call.model), call.json)
    try:
        yield Reserve(Hold(call_id, cfg.agent, day, estimate, started + cfg.reservation_ttl, cfg.intent), caps)
    except PolicyRefusal as refusal:
        yield Finish(call_id, 0, receipt(status=402, error=refusal.code), reserved=False)
        yield Answer.refusal(refusal)
        return
    reserved = estimate

    body, injected = with_usage_requested(call)
    body = _strip_fields(cfg, call, body)
    headers: dict[str, str] = {"accept-encoding": "identity", **cfg.identity_headers}
    if payment is not None:
        headers[payment.header_name] = payment.header_value

    prepaid: SignedPayment | None = None

    def failed(exc: BaseException, status: int | None = None) -> Finish:
        """A paid attempt that ended without an answer counts the payment as spent (it may have settled)."""
        cost = payment.amount if payment is not None and not reused else 0
        if payment is not None:
            cfg.payments.mark_unknown(call.fingerprint)
        record = _payment_record(payment, None, reused=reused) if payment is not None else None
        return Finish(
            call_id,
            cost,
            receipt(status=status, error=type(exc).__name__, cost=cost, reserved=reserved, payment=record),
        )

    try:
        # 3. credit gateways: an API key minted by SIWE when none is configured
        if cfg.credit is not None and cfg.api_key is None and cfg.mint_keys and call.method == "POST":
            cfg.api_key = yield from _mint_key(cfg, call, cfg.credit)
        if cfg.api_key is not None:
            headers["authorization"] = f"Bearer {cfg.api_key}"

        # one round trip: this request shape's price is known, so the payment goes with the first request
        shape = quote_key(call) if cfg.policy.one_round_trip else None  # what a known price is remembered by
        known = cfg.quotes.get(shape, started) if shape is not None and payment is None else None
        if known is not None:
            try:
                requirement = select_requirement(known, cfg.policy)
                check_transport_security(call.url, requirement.network, cfg.policy)
            except PaymentRequiredError:
                known = None  # the policy changed: pay the ordinary way, if at all
        if known is not None:
            if requirement.amount > reserved:
                yield Grow(call_id, requirement.amount, caps)
                reserved = requirement.amount
            prepaid = yield from _authorize(cfg, known, requirement, call.url, call.model, "call")
            cfg.payments.remember(call.fingerprint, prepaid)
            yield Expose(call_id, prepaid.amount, prepaid.valid_before)
            headers[prepaid.header_name] = prepaid.header_value
            payment = prepaid

        try:
            head: Head = yield Send(headers, body)
        except BaseException as exc:
            yield failed(exc)
            raise
        paid_up_front = payment is not None and not reused and head.status != 402
        outstanding = 0
        if prepaid is not None and shape is not None and head.status == 402:
            # the gateway did not take the payment sent up front: it stays exposure until it expires; pay the new quote
            cfg.quotes.forget(shape)
            cfg.payments.forget(call.fingerprint)
            headers.pop(prepaid.header_name, None)
            payment, outstanding = None, prepaid.amount

        # 4. credit exhausted: top up (an x402 payment of its own) and replay once
        if (
            head.status == 402
            and cfg.credit is not None
            and payment is None
            and _error_code(head) in cfg.credit.insufficient_codes
        ):
            yield from topup_flow(cfg, cfg.credit, reserved, reserved)
            head = yield Send(headers, body)
            if head.status == 402 and _error_code(head) in cfg.credit.insufficient_codes:
                raise _Refused(
                    PaymentRequiredError(
                        "still not enough credit after a top-up; llm402 does not top up twice for one call",
                        code="insufficient_balance",
                    )
                )
        if head.status == 401 and cfg.credit is not None:
            raise _Refused(
                ApiKeyRejected(
                    f"the gateway rejected the API key ({_reason(head)}): it may be revoked; mint a new one with "
                    "`llm402 keys create`, or leave api_key unset to let llm402 mint one"
                ),
                status=401,
            )

        # 5. the 402 dance: parse, select under policy, grow the reservation, sign, replay once
        if head.status == 402 and reused:
            cfg.payments.forget(call.fingerprint)
            raise _Refused(
                PaymentOutcomeUnknown(
                    "a payment for this call was already sent and its answer was lost; llm402 will not pay twice",
                    gateway_reason=_reason(head),
                )
            )
        if head.status == 402:
            chosen = _choose(head, call.url, cfg.policy)
            if chosen is not None:
                challenge, requirement = chosen
                if requirement.amount + outstanding > reserved:  # the quote is above the estimate: grow first
                    yield Grow(call_id, requirement.amount + outstanding, caps)
                    reserved = requirement.amount + outstanding
                payment = yield from _authorize(cfg, challenge, requirement, call.url, call.model, "call")
                if shape is not None:
                    cfg.quotes.put(shape, challenge, started)
                if challenge.extensions and SIGN_IN_WITH_X in challenge.extensions:
                    headers.update((yield SignIn(dict(challenge.extensions), call.url, requirement.network)))
    except _Refused as refused:
        yield Finish(call_id, 0, receipt(status=refused.status, error=refused.error.code, reserved=reserved))
        yield Answer.refusal(refused.error, refused.status)
        return
    except PaymentRequiredError as refusal:
        yield Finish(call_id, 0, receipt(status=402, error=refusal.code, reserved=reserved))
        yield Answer.refusal(refusal)
        return
    if payment is not None and not reused and not paid_up_front:
        cfg.payments.remember(call.fingerprint, payment)
        valid_before = max(payment.valid_before, prepaid.valid_before if prepaid is not None else 0)
        yield Expose(call_id, payment.amount + outstanding, valid_before)
        headers[payment.header_name] = payment.header_value
        try:
            head = yield Send(headers, body)
        except BaseException as exc:
            yield failed(exc)
            raise
        if head.status == 402 or 300 <= head.status < 400:
            redirected = head.status != 402
            rejection = PaymentRejected(
                "the gateway redirected the paid request; llm402 does not follow a paid request elsewhere"
                if redirected
                else f"the gateway refused the signed payment of {format_usd(payment.amount)}: {_reason(head)}",
                code="payment_redirected" if redirected else "payment_rejected",
                gateway_reason=_reason(head),
                amount=payment.amount,
            )
            if redirected:
                cfg.payments.mark_unknown(call.fingerprint)
            else:
                cfg.payments.forget(call.fingerprint)
            cost = payment.amount if redirected else 0
            record = _payment_record(payment, None, reused=False)
            yield Finish(
                call_id,
                cost,
                receipt(status=head.status, error=rejection.code, cost=cost, reserved=reserved, payment=record),
            )
            yield Answer.refusal(rejection)
            return

    # 6. hand the response over, metering it on the way
    settlement = _own_settlement(payment, decode_settlement(head.headers)) if payment is not None else None
    extra: dict[str, str] = {}
    if payment is not None:
        extra["x-should-retry"] = "false"
        if cfg.cost_header and not reused:
            if payment.requirement.upto and (settlement is None or not settlement.success):
                extra["llm402-cost-max"] = str(payment.amount)  # an upto stream settles after its last byte
            else:
                extra["llm402-cost"] = str(charged(payment, settlement))
    deadline = cfg.max_stream_seconds if call.streaming else None
    end: StreamEnd = yield Deliver(extra, strip_usage_event=injected, deadline_seconds=deadline)

    # 7. reconcile to what was really charged, and leave a receipt
    ok = 200 <= head.status < 300
    usage = end.usage
    still_movable: int | None = None  # None: all of a signed payment's unsettled remainder may still move
    if payment is not None:
        if ok and not end.aborted:
            cfg.payments.forget(call.fingerprint)
        else:
            cfg.payments.mark_unknown(call.fingerprint)
        if end.settlement is not None and (settlement is None or not settlement.success):
            settlement = _own_settlement(payment, end.settlement)
        # a reused payment was counted by the call that signed it
        actual = 0 if reused else charged(payment, settlement)
        if payment.requirement.upto and settlement is not None and settlement.success and settlement.amount is not None:
            still_movable = outstanding  # the upto authorization is consumed; an unused up-front one may still move
    else:
        metered = _usage_cost(cfg, call.model, usage)
        if metered is not None and ok:
            actual = metered
        elif ok:
            # no usage reported (an aborted stream, or a gateway that never sends it): reconcile by the reservation,
            # an upper bound, rather than recording a priced call as free (invariant 5)
            actual = reserved
        else:
            actual = 0
    error = end.error or (None if ok else f"http_{head.status}")
    if cacheable and cfg.cache is not None and ok and not end.aborted and end.body is not None:
        kept = tuple((k, v) for k, v in head.headers.items() if k.lower() in ("content-type",))
        cfg.cache.put(
            call,
            CachedAnswer(
                head.status,
                kept,
                end.body,
                actual,
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
            ),
        )
    yield Finish(
        call_id,
        actual,
        receipt(
            status=head.status,
            cost=actual,
            reserved=reserved,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            payment=_payment_record(payment, settlement, reused=reused) if payment is not None else None,
            error=error,
            credits_remaining=str(usage.credits_remaining) if usage and usage.credits_remaining is not None else None,
        ),
        outstanding=still_movable,
    )


def _reason(head: Head) -> str:
    """The gateway's own words for a refusal (a short, secret-free string)."""
    for name in ("x-sandbox-refusal",):
        if head.headers.get(name):
            return str(head.headers[name])[:200]
    try:
        challenge = parse_challenge(head.headers, head.body or b"")
    except PaymentRequiredError:
        challenge = None
    if challenge is not None and challenge.error:
        return challenge.error[:200]
    if head.body:
        try:
            data = json.loads(head.body)
        except ValueError:
            return head.body[:200].decode(errors="replace")
        if isinstance(data, Mapping):
            err = data.get("error")
            if isinstance(err, Mapping):
                return str(err.get("code") or err.get("message"))[:200]
            if err:
                return str(err)[:200]
    return f"HTTP {head.status}"
