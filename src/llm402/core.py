"""The call flow as a state machine with no I/O (the sans-IO pattern).

`call_flow` is a generator: it yields *effects* (reserve, send, sign, deliver, answer, finish) and receives their
results; a transport performs them. httpx and httpx2, sync and async, all drive this one machine, so every rule that
protects money lives here once: policy before traffic, reserve before send, one signature per challenge per logical
call, one replay, ``x-should-retry: false`` after a payment, reconcile on every ending.
"""

from __future__ import annotations

import base64
import binascii
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
from typing import Any, Generic, Literal, TypeVar, cast
from urllib.parse import urlsplit

from .approval import Approval, PaymentProposal, external_payment
from .budget.base import DEFAULT_RESERVATION_TTL, Caps, Hold, topup_agent
from .credit import CreditProfile, siwe_message, topup_amount, topup_body, validate_api_key
from .errors import (
    REFUSAL_HEADER,
    ApiKeyRejected,
    BudgetExceeded,
    InsecureGateway,
    InsufficientBalance,
    PaidAnswerLost,
    PaymentOutcomeUnknown,
    PaymentRejected,
    PaymentRequiredError,
    PolicyRefusal,
    PriceUnknown,
    ReservationHeld,
)
from .metering import Usage
from .money import atomic_to_usd, format_usd, usd_to_atomic
from .mpp import ACCEPT_PAYMENT, is_payment_refusal, read_problem
from .policy import Policy
from .pricing import PriceCatalog, estimate_cost, max_completion_tokens, warn_unpriced
from .receipts import PaymentRecord, Receipt
from .x402 import (
    MAX_CHALLENGE_BYTES,
    Challenge,
    Requirement,
    Settlement,
    SignedPayment,
    bind_settlement,
    decode_settlement,
    parse_challenge,
    select_requirement,
)

log = logging.getLogger("llm402")
_GEMINI_PATH = re.compile(r"/models/([^/:]+):(?:generateContent|streamGenerateContent)$")
LEASE_SECONDS = 120.0
"""How long a key mint or top-up may hold its single-flight reservation before a crash is assumed."""
LEASE_WAIT_SECONDS = 60.0
"""How long a call waits for another call's key mint or top-up."""
HEAD_TIMEOUT_SECONDS = 600.0
"""How long an answer's head may take (the OpenAI SDK's default read timeout): part of a reservation's life."""
_MICRO = Decimal("0.000001")
SIGN_IN_WITH_X = "sign-in-with-x"  # x402's extension key (and header name) for proving who pays
TESTNET_CHAIN_IDS = frozenset({84532, 11155111, 421614, 11155420, 80002, 43113, 97, 4002, 1337, 31337})


# --- what the flow asks for ---------------------------------------------------------------------------------

R = TypeVar("R")


class Asks(Generic[R]):
    """An effect whose performer answers with an ``R`` (effects that are not `Asks` are answered with ``None``)."""

    __slots__ = ()


def ask(effect: Asks[R]) -> Generator[Effect, Any, R]:
    """Yield ``effect`` and return its typed answer: ``head = yield from ask(Send(...))``."""
    reply = yield effect  # type: ignore[misc]
    return cast(R, reply)


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
class Sign(Asks[SignedPayment]):
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
class Send(Asks[Head]):
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
class SignMessage(Asks[str]):
    """Sign an EIP-191 message (SIWE); the result is the 0x-hex signature."""

    text: str


@dataclass(frozen=True, slots=True)
class StoreKey:
    """Use a freshly minted API key from now on and keep it where the user said."""

    key: str


@dataclass(frozen=True, slots=True)
class Approve(Asks["Approval | bool"]):
    """Ask the approver about a payment; the result is an `Approval` (or a bool)."""

    proposal: PaymentProposal


@dataclass(frozen=True, slots=True)
class SignIn(Asks[Mapping[str, str]]):
    """Answer a 402's sign-in-with-x extension; the result is the headers to add to the replay (maybe none)."""

    extensions: Mapping[str, Any]
    url: str
    network: str


@dataclass(frozen=True, slots=True)
class Remaining(Asks[int | None]):
    """How much every cap still admits for this agent today (``None``: no cap); the result is ``int | None``."""

    agent: str
    day: str
    caps: Caps


@dataclass(frozen=True, slots=True)
class Record:
    """Store and publish a receipt that reserved nothing (a top-up)."""

    receipt: Receipt


@dataclass(frozen=True, slots=True)
class AwaitRelease(Asks[bool]):
    """Wait until the reservation ``call_id`` (another call's key mint or top-up) is gone; the result is ``True``, or
    ``False`` after ``timeout`` seconds."""

    call_id: str
    timeout: float


@dataclass(frozen=True, slots=True)
class Release:
    """Give up a single-flight reservation that moved no money."""

    call_id: str


@dataclass(frozen=True, slots=True)
class CurrentKey(Asks[str | None]):
    """The credit gateway's API key in use (minted earlier, here or by another process); the result: ``str | None``."""


@dataclass(frozen=True, slots=True)
class LoadPrices:
    """Load the gateway's published prices into the config's catalog (cached; refreshed on a schedule)."""


@dataclass(frozen=True, slots=True)
class NotePayment:
    """Update what the engine remembers of the payment for a request fingerprint (its `PaymentMemory`): ``signed``
    (with ``payment``, ``call_id``, ``now``), ``unknown`` (resendable), ``settled`` (with ``transaction``) or
    ``answered`` (forgotten)."""

    fingerprint: str
    state: Literal["signed", "unknown", "settled", "answered"]
    payment: SignedPayment | None = None
    call_id: str = ""
    now: float = 0.0
    transaction: str | None = None
    counted: bool = False
    """With ``unknown``: the attempt counted the payment as spent."""


@dataclass(frozen=True, slots=True)
class KeepQuote:
    """Remember what a request shape cost, for one-round-trip payments (``None``: forget a stale quote)."""

    key: tuple[Any, ...]
    challenge: Challenge | None
    now: float


@dataclass(frozen=True, slots=True)
class KeepAnswer:
    """Keep a deterministic answer in the response cache."""

    key: str
    answer: CachedAnswer


@dataclass(frozen=True, slots=True)
class KeepSignedIn:
    """This wallet paid a gateway that offers sign-in-with-x: next time try the proof alone first."""

    origin: str
    payer: str


@dataclass(frozen=True, slots=True)
class Deliver(Asks[StreamEnd]):
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
    | AwaitRelease
    | Release
    | CurrentKey
    | LoadPrices
    | NotePayment
    | KeepQuote
    | KeepAnswer
    | KeepSignedIn
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
    credential: str = ""
    """A digest of the caller's own credentials (its ``authorization``), so cached answers are never shared."""
    pay_again: bool = False
    """The caller asked to pay again for an identical request (``llm402-pay-again``)."""

    @property
    def origin(self) -> str:
        """scheme://host[:port]."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def path(self) -> str:
        """The URL path."""
        return urlsplit(self.url).path


def describe_request(
    method: str,
    url: str,
    content_type: str | None,
    body: bytes,
    authorization: str | None = None,
    pay_again: bool = False,
) -> CallRequest:
    """Read what the flow needs from a request: its JSON, model, whether it streams, and who asks.

    Its fingerprint (method, URL and body) is what makes a retry "the same request"."""
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
    credential = hashlib.sha256(authorization.encode()).hexdigest() if authorization else ""
    return CallRequest(method, url, body, data, model, streaming, digest, credential, pay_again)


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


# --- payments that may have settled -------------------------------------------------------------------------


@dataclass(slots=True)
class OutstandingPayment:
    """A signed authorization for one request fingerprint, kept while it can still settle."""

    payment: SignedPayment
    call_id: str
    """The call that signed it (its receipt counts it)."""
    resendable: bool = False
    """The paid attempt ended without a usable answer: a retry re-sends this payment."""
    transaction: str | None = None
    """Set once a gateway showed that it settled (the answer it paid for was lost)."""
    counted: bool = False
    """Whether an attempt already counted it as spent (a refused one is only exposure until it expires)."""


class PaymentMemory:
    """Signed payments by request fingerprint. Once a paid attempt ends without its answer (an error, a 5xx, a 402,
    a redirect), every retry of the same request re-sends the same authorization until it expires: its nonce makes a
    second settlement impossible, and llm402 never signs another while this one can settle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, OutstandingPayment] = {}

    def remember(self, fingerprint: str, payment: SignedPayment, call_id: str, now: float) -> None:
        """A payment was signed for this request (outcome pending)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.payment.valid_before < now]:
                del self._entries[key]
            self._entries[fingerprint] = OutstandingPayment(payment, call_id)

    def mark_unknown(self, fingerprint: str, counted: bool = False) -> None:
        """The paid attempt ended without a usable answer: a retry re-sends this payment (``counted``: that attempt
        counted it as spent)."""
        with self._lock:
            entry = self._entries.get(fingerprint)
            if entry is not None:
                entry.resendable = True
                entry.counted = entry.counted or counted

    def mark_settled(self, fingerprint: str, transaction: str | None) -> None:
        """A gateway showed that the payment settled; its answer was lost."""
        with self._lock:
            entry = self._entries.get(fingerprint)
            if entry is not None:
                entry.resendable = True
                entry.counted = True
                entry.transaction = entry.transaction or transaction

    def forget(self, fingerprint: str) -> None:
        """The paid attempt got its answer."""
        with self._lock:
            self._entries.pop(fingerprint, None)

    def reusable(self, fingerprint: str, now: float) -> OutstandingPayment | None:
        """The payment a retry must re-send, while it is resendable and can still settle."""
        with self._lock:
            entry = self._entries.get(fingerprint)
            if entry is None or not entry.resendable:
                return None
            return entry if entry.payment.valid_before > now else None


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

    def get(self, key: str) -> CachedAnswer | None:
        """The cached answer kept under ``key``."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
            return hit

    def put(self, key: str, answer: CachedAnswer) -> None:
        """Keep an answer."""
        with self._lock:
            self._entries[key] = answer
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
    api_key: str | None = field(default=None, repr=False)
    """A minted key in use: a secret, set by the engine (never by a flow)."""
    mint_keys: bool = False
    metered: bool = False
    """Calls are paid by key or credit and counted from usage and prices (plain, credit and AIsa gateways)."""
    signed_in: set[tuple[str, str]] = field(default_factory=set)
    """(origin, payer) pairs that paid a gateway offering sign-in-with-x: next time the proof alone is tried first."""
    new_id: Callable[[], str] = field(default=lambda: os.urandom(16).hex(), repr=False)
    """Call ids (injected randomness: the flow itself draws none)."""
    approver: bool = False
    strip_fields: frozenset[str] = frozenset()
    identity_headers: Mapping[str, str] = field(default_factory=dict)
    """Who calls and why (``llm402-agent``, ``llm402-intent``), sent with every request."""
    policy_source: Callable[[], Policy] | None = None
    """A live policy (e.g. an on-chain source's ``current``): the engine reads it into ``policy`` before every call."""
    _caps: tuple[Policy, Caps] | None = field(default=None, repr=False, compare=False)

    @property
    def hold_seconds(self) -> float:
        """How long a call's reservation lives: at least as long as the call can run (its head, then its body under
        ``max_stream_seconds``), so a running call is never swept; a day when the body has no deadline."""
        body = self.max_stream_seconds if self.max_stream_seconds is not None else 86_400.0
        return max(self.reservation_ttl, HEAD_TIMEOUT_SECONDS + body + 60.0)

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
    """The settlement report if it is about this payment: this payer, this network and (when named) this asset.
    Any other report says nothing about it (and so can never lower what it counts)."""
    if settlement is None:
        return None
    settlement = bind_settlement(payment, settlement)  # an MPP Payment-Receipt answers this very credential
    req = payment.requirement
    networks = {req.network, str(req.raw.get("network", req.network))}
    mismatch = (
        "payer"
        if (settlement.payer or "").lower() != payment.payer.lower()
        else "network"
        if settlement.network not in networks
        else "asset"
        if settlement.asset is not None and settlement.asset.lower() != req.asset.lower()
        else None
    )
    if mismatch is None:
        return settlement
    if settlement.success:
        log.warning("llm402: the gateway's settlement report does not name this payment's %s; ignoring it", mismatch)
    return Settlement(False, None, None, None, None, error=f"settlement_report_{mismatch}_mismatch")


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
    """Internal: a sub-flow ended the call with a refusal, after counting ``cost`` of any payment it signed."""

    def __init__(
        self, error: PaymentRequiredError, status: int = 402, *, cost: int = 0, settlement: Settlement | None = None
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status
        self.cost = cost
        self.settlement = settlement


@dataclass(slots=True)
class CallState:
    """What one call has done so far: the flow's only mutable state."""

    call_id: str
    started: float
    day: str
    headers: dict[str, str]
    body: bytes = b""
    usage_injected: bool = False
    reserved: int = 0
    """What the ledger holds for this call (0 until `Reserve`)."""
    holds: bool = False
    """Whether the ledger holds a reservation for this call."""
    payment: SignedPayment | None = None
    reused: bool = False
    """``payment`` was signed by an earlier attempt of the same request."""
    earlier_call_id: str | None = None
    """The call that signed a re-sent payment (its exposure is released when this attempt counts the payment)."""
    counted: bool = False
    """Whether the payment is already counted as spent, by an earlier attempt or by this one (read once, at the start:
    the engine's memory of it changes as this attempt reports what happened)."""
    prepaid_shape: tuple[Any, ...] | None = None
    """The request shape whose remembered price paid this call up front (one round trip)."""
    finished: bool = False
    """Whether the call's `Finish` was yielded (on an error on the way out)."""

    @property
    def counts_payment(self) -> bool:
        """Whether this attempt must count its payment: it signed it, or the attempt that did counted nothing."""
        return self.payment is not None and not self.counted

    @property
    def cost_if_lost(self) -> int:
        """What a paid attempt that ended without an answer counts: all of a payment no attempt counted yet."""
        return self.payment.amount if self.payment is not None and self.counts_payment else 0


def _receipt(cfg: FlowConfig, call: CallRequest, st: CallState, **fields: Any) -> Receipt:
    payment = st.payment
    if payment is not None and "payment" not in fields:
        fields["payment"] = _payment_record(payment, fields.pop("settlement", None), reused=st.reused)
    fields.pop("settlement", None)
    return Receipt(
        call_id=st.call_id,
        agent=cfg.agent,
        intent=cfg.intent,
        gateway=call.origin,
        method=call.method,
        path=call.path,
        model=call.model,
        streamed=call.streaming,
        started_at=st.started,
        latency_ms=round((cfg.clock() - st.started) * 1000, 3),
        route=cfg.route,
        reserved=st.reserved,
        **fields,
    )


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
        decision = yield from ask(Approve(proposal))
        if decision is False or (isinstance(decision, Approval) and decision.decision == "deny"):
            reason = decision.reason if isinstance(decision, Approval) else None
            raise PolicyRefusal(
                f"the approver denied a payment of {format_usd(requirement.amount)}: {reason or 'no reason given'}",
                code="approval_denied",
                requested=requirement.amount,
            )
        if isinstance(decision, Approval) and decision.decision == "external" and decision.header_value:
            return external_payment(proposal, decision.header_value)
    payment = yield from ask(Sign(challenge, requirement, url))
    return payment


# --- single flight: one key mint and one top-up at a time per gateway and wallet ----------------------------


def _lease_id(kind: str, cfg: FlowConfig) -> str:
    """The ledger reservation that makes ``kind`` single-flight per gateway and wallet, across processes."""
    return f"{kind}:{cfg.base_url}:{(cfg.payer or '').lower()}"


def _lease(cfg: FlowConfig, kind: str, amount: int, caps: Caps) -> Generator[Effect, Any, str | None]:
    """Hold the single-flight reservation for ``kind`` (``amount`` under ``caps``); ``None`` when another call held
    it and has now finished (the caller reuses what it did)."""
    now = cfg.clock()
    lease = _lease_id(kind, cfg)
    hold = Hold(lease, topup_agent(cfg.agent), _day(now), amount, now + LEASE_SECONDS, cfg.intent)
    try:
        yield Reserve(hold, caps)
    except ReservationHeld:
        finished = yield from ask(AwaitRelease(lease, LEASE_WAIT_SECONDS))
        if not finished:
            raise _Refused(
                InsufficientBalance(f"another {kind} for this wallet did not finish in {LEASE_WAIT_SECONDS:.0f}s")
            ) from None
        return None
    return lease


def _day(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).date().isoformat()


def _api_key(cfg: FlowConfig, credit: CreditProfile) -> Generator[Effect, Any, str | None]:
    """The credit gateway's API key: the one in use, else one minted now (one mint at a time per wallet)."""
    key = yield from ask(CurrentKey())
    if key is not None or not cfg.mint_keys:
        return key
    lease = yield from _lease(cfg, "mint", 0, Caps())
    if lease is None:  # another call minted meanwhile
        key = yield from ask(CurrentKey())
        if key is not None:
            return key
        lease = yield from _lease(cfg, "mint", 0, Caps())
        if lease is None:
            raise _Refused(PaymentRequiredError("could not mint an API key", code="key_mint_failed"))
    try:
        key = yield from ask(CurrentKey())
        if key is None:
            key = yield from _mint_key(cfg, credit)
            yield StoreKey(key)
    finally:
        yield Release(lease)
    return key


def _mint_key(cfg: FlowConfig, credit: CreditProfile) -> Generator[Effect, Any, str]:
    """Mint an API key with a fresh SIWE message (``issuedAt`` now, new nonce) and return it."""
    if cfg.payer is None:
        raise PolicyRefusal("minting an API key needs a wallet", code="no_wallet")
    chain_id = credit.chain_id
    if chain_id is None:  # the gateway's chain, as its top-up 402 presents it
        probe = yield from ask(
            Send(
                {"content-type": "application/json"},
                topup_body(credit.min_topup),
                method="POST",
                url=cfg.base_url + credit.topup_path,
                read_body=True,
            )
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
    signature = yield from ask(SignMessage(text))
    head = yield from ask(
        Send(
            {"content-type": "application/json"},
            _json_body({"message": text, "signature": signature, "label": f"llm402 {cfg.agent}"[:64]}),
            method="POST",
            url=cfg.base_url + credit.keys_path,
            read_body=True,
        )
    )
    key = _read_json(head).get("key")
    if not (200 <= head.status < 300) or not isinstance(key, str):
        raise PaymentRequiredError(
            f"the gateway refused to mint an API key: {_reason(head)}", code="key_mint_failed", status=head.status
        )
    return validate_api_key(key, cfg.base_url + credit.keys_path)  # never store or send a malformed key


def _as_topup(record: PaymentRecord) -> PaymentRecord:
    return replace(record, kind="topup")


def topup_flow(
    cfg: FlowConfig, credit: CreditProfile, needed: int, *, join_in_flight: bool = False
) -> Generator[Effect, Any, Receipt | None]:
    """Buy credit with an x402 payment: at most the policy's top-up limit (default: the max ticket), reserved under
    the daily top-up limit (default: the daily cap) before it is signed, and booked apart from consumption.

    One top-up at a time per gateway and wallet: with ``join_in_flight`` a call that finds another top-up running
    waits for it and returns ``None`` (it reuses that credit); otherwise that is refused.
    Used by a call answered ``INSUFFICIENT_BALANCE`` and by ``llm402 topup``. Returns the top-up's receipt.
    """
    amount = topup_amount(needed, credit.min_topup, cfg.policy)
    try:
        lease = yield from _lease(cfg, "topup", amount, Caps(daily=cfg.policy.daily_topup_cap))
    except BudgetExceeded as exc:
        raise PolicyRefusal(
            f"a top-up of {format_usd(amount)} is above what the daily top-up limit has left: {exc.message}",
            code="topup_refused",
            requested=amount,
        ) from None
    if lease is None:
        if join_in_flight:
            return None
        raise PolicyRefusal("another top-up for this wallet was in flight; try again", code="topup_refused")
    started = cfg.clock()
    bought: list[SignedPayment] = []  # the top-up's payment, once signed
    try:
        head = yield from _pay_topup(cfg, credit, lease, amount, bought)
    except BaseException as exc:
        if isinstance(exc, GeneratorExit):
            raise
        # a signed top-up whose answer was lost counts as spent (it may have settled)
        lost = _topup_receipt(cfg, credit, started, amount, bought, None, type(exc).__name__)
        yield Finish(lease, lost.cost, lost)
        raise
    ok = 200 <= head.status < 300
    done = _topup_receipt(
        cfg,
        credit,
        started,
        amount,
        bought,
        head.status,
        None if ok else f"http_{head.status}",
        decode_settlement(head.headers),
    )
    # a top-up the gateway took is spent; a refused one stays counted as exposure until it expires
    yield Finish(lease, done.cost, done)
    if not ok:
        raise PaymentRejected(f"the gateway refused the top-up payment: {_reason(head)}", amount=bought[0].amount)
    return done


def _pay_topup(
    cfg: FlowConfig, credit: CreditProfile, lease: str, amount: int, bought: list[SignedPayment]
) -> Generator[Effect, Any, Head]:
    """Ask for ``amount`` of credit, pay the 402 (never more than ``amount``), and return the paid answer."""
    url = cfg.base_url + credit.topup_path
    body = topup_body(amount)
    headers = {"content-type": "application/json", "accept-encoding": "identity"}
    head = yield from ask(Send(headers, body, method="POST", url=url, read_body=True))
    if head.status != 402:
        raise PaymentRequiredError(f"top-up did not ask for payment: {_reason(head)}", code="topup_failed")
    chosen = _choose(head, url, cfg.policy.model_copy(update={"max_payment_usd": atomic_to_usd(amount)}))
    if chosen is None:
        raise PaymentRequiredError(f"top-up answered an unreadable 402: {_reason(head)}", code="topup_failed")
    payment = yield from _authorize(cfg, *chosen, url, None, "topup")
    bought.append(payment)
    yield Expose(lease, payment.amount, payment.valid_before)
    paid = yield from ask(
        Send({**headers, payment.header_name: payment.header_value}, body, "POST", url, read_body=True)
    )
    return paid


def _topup_receipt(
    cfg: FlowConfig,
    credit: CreditProfile,
    started: float,
    amount: int,
    bought: list[SignedPayment],
    status: int | None,
    error: str | None,
    settlement: Settlement | None = None,
) -> Receipt:
    """A top-up's receipt: its cost is the payment, unless the gateway answered and refused it."""
    payment = bought[0] if bought else None
    refused = status is not None and not 200 <= status < 300
    return Receipt(
        call_id=cfg.new_id(),
        agent=cfg.agent,
        intent=cfg.intent,
        gateway=_origin(cfg.base_url),
        method="POST",
        path=credit.topup_path,
        model=None,
        status=status,
        streamed=False,
        started_at=started,
        latency_ms=round((cfg.clock() - started) * 1000, 3),
        cost=0 if payment is None or refused else payment.amount,
        reserved=amount,
        payment=None if payment is None else _as_topup(_payment_record(payment, settlement, reused=False)),
        error=error,
    )


# --- one call ------------------------------------------------------------------------------------------------


def refusal_flow(cfg: FlowConfig, call: CallRequest, error: PaymentRequiredError) -> Generator[Effect, Any, None]:
    """A call refused before it starts (e.g. its live policy could not be read): a receipt and the local 402."""
    started = cfg.clock()
    st = CallState(cfg.new_id(), started, _day(started), {})
    yield Finish(st.call_id, 0, _receipt(cfg, call, st, status=402, error=error.code), reserved=False)
    yield Answer.refusal(error)


def call_flow(cfg: FlowConfig, call: CallRequest) -> Generator[Effect, Any, None]:
    """One logical call, from policy check to receipt: gate, reserve, negotiate (key, 402, top-up), deliver and
    reconcile. Every refusal is answered locally with a receipt; nothing is signed outside the policy and ledger."""
    started = cfg.clock()
    st = CallState(
        cfg.new_id(),
        started,
        _day(started),
        {"accept-encoding": "identity", "accept-payment": ACCEPT_PAYMENT, **cfg.identity_headers},
    )
    try:
        hit = yield from _gate(cfg, call, st)
        if hit is not None:
            yield Finish(
                st.call_id,
                0,
                _receipt(
                    cfg,
                    call,
                    st,
                    status=hit.status,
                    cache_hit=True,
                    saved=hit.cost,
                    prompt_tokens=hit.prompt_tokens,
                    completion_tokens=hit.completion_tokens,
                ),
                reserved=False,
            )
            yield Answer(hit.status, {**dict(hit.headers), "x-llm402-cache": "hit"}, hit.body)
            return
        yield from _reserve(cfg, call, st)
        head = yield from _negotiate(cfg, call, st)
    except (_Refused, PaymentRequiredError) as exc:
        refused = exc if isinstance(exc, _Refused) else _Refused(exc)
        error = refused.error
        receipt = _receipt(
            cfg, call, st, status=refused.status, error=error.code, cost=refused.cost, settlement=refused.settlement
        )
        yield Finish(st.call_id, refused.cost, receipt, reserved=st.holds, outstanding=_movable(st, refused.settlement))
        yield Answer.refusal(error, refused.status)
        return
    except Exception as exc:  # a transport error on a request of llm402's own (key mint, top-up)
        yield from _finish_on_error(cfg, call, st, exc)
        raise
    yield from _deliver(cfg, call, st, head)


def _gate(cfg: FlowConfig, call: CallRequest, st: CallState) -> Generator[Effect, Any, CachedAnswer | None]:
    """Before any traffic: the policy (intent, model), a known price under a cap, and the response cache."""
    cfg.policy.check_call(cfg.intent, call.model)
    if cfg.metered and call.model is not None and cfg.prices.lookup(call.model) is None:
        yield LoadPrices()  # the engine fetches the gateway's catalog (once, then on a schedule)
        if cfg.prices.lookup(call.model) is None and cfg.policy.has_cap and not cfg.policy.allow_unpriced:
            raise PriceUnknown(
                f"the price of {call.model!r} is unknown, so a cap cannot bind it; add it to prices= or set "
                "Policy(allow_unpriced=True)",
                model=call.model,
            )
    if cfg.cache is not None and cfg.cache.cacheable(call):
        return cfg.cache.get(_cache_key(cfg, call))
    return None


def _cache_key(cfg: FlowConfig, call: CallRequest) -> str:
    """Who asks, and under what rules: the gateway and request (fingerprint), the credentials, agent and policy."""
    scope = f"{call.fingerprint}\n{call.credential}\n{cfg.agent}\n{cfg.intent}\n{cfg.route}\n{cfg.policy!r}"
    return hashlib.sha256(scope.encode()).hexdigest()


def _reserve(cfg: FlowConfig, call: CallRequest, st: CallState) -> Generator[Effect, Any, None]:
    """Reserve the estimate (nothing for a retry that re-sends a payment an earlier attempt counted)."""
    outstanding = None if call.pay_again else cfg.payments.reusable(call.fingerprint, st.started)
    if outstanding is not None:
        st.payment, st.reused = outstanding.payment, True
        st.earlier_call_id, st.counted = outstanding.call_id, outstanding.counted
        st.headers[outstanding.payment.header_name] = outstanding.payment.header_value
    estimate = 0 if st.reused else estimate_cost(cfg.prices.lookup(call.model), call.json)
    yield Reserve(Hold(st.call_id, cfg.agent, st.day, estimate, st.started + cfg.hold_seconds, cfg.intent), cfg.caps())
    st.reserved, st.holds = estimate, True
    body, st.usage_injected = with_usage_requested(call)
    st.body = _strip_fields(cfg, call, body)


def _send(cfg: FlowConfig, call: CallRequest, st: CallState) -> Generator[Effect, Any, Head]:
    """Send the call as it stands; an attempt that ends without an answer is finished (a payment it carried counts as
    spent and stays resendable) and the error goes on to the caller."""
    try:
        head = yield from ask(Send(st.headers, st.body))
    except BaseException as exc:
        if isinstance(exc, GeneratorExit):
            raise
        cost = st.cost_if_lost
        if st.payment is not None:
            yield from _counting(call, st, cost)
        yield from _finish_on_error(cfg, call, st, exc, cost)
        raise
    return head


def _finish_on_error(
    cfg: FlowConfig, call: CallRequest, st: CallState, exc: BaseException, cost: int = 0
) -> Generator[Effect, Any, None]:
    """An attempt that ends in an error (a transport failure, also on a key mint or top-up's way) still finishes the
    call: its reservation is settled to ``cost`` (all of a payment it carried and no attempt counted yet) and its
    receipt kept."""
    if st.finished or not st.holds:
        return
    st.finished = True
    yield Finish(st.call_id, cost, _receipt(cfg, call, st, status=None, error=type(exc).__name__, cost=cost))


def _negotiate(cfg: FlowConfig, call: CallRequest, st: CallState) -> Generator[Effect, Any, Head]:
    """Send the call and get it an answer worth delivering: the API key, one round trip, a top-up, the 402 dance."""
    credit = cfg.credit
    if credit is not None and call.origin == _origin(cfg.base_url):  # a key goes only to the origin it is for
        key = yield from _api_key(cfg, credit)
        if key is not None:
            st.headers["authorization"] = f"Bearer {key}"
    if st.payment is None:
        yield from _prepay(cfg, call, st)
    head = yield from _send(cfg, call, st)
    if st.payment is not None:  # a retry's payment, or one sent up front: never paid again
        yield from _check_paid_answer(cfg, call, st, head)
        return head
    if head.status == 402 and credit is not None and _error_code(head) in credit.insufficient_codes:
        head = yield from _top_up_and_replay(cfg, call, st, credit)
    if head.status == 401 and credit is not None:
        raise _Refused(
            ApiKeyRejected(
                f"the gateway rejected the API key ({_reason(head)}): it may be revoked; mint a new one with "
                "`llm402 keys create`, or leave api_key unset to let llm402 mint one"
            ),
            status=401,
        )
    if head.status == 402:
        head = yield from _pay_and_replay(cfg, call, st, head)
    return head


def _prepay(cfg: FlowConfig, call: CallRequest, st: CallState) -> Generator[Effect, Any, None]:
    """One round trip: this request shape's price is known, so the payment goes with the first request."""
    if not cfg.policy.one_round_trip:
        return
    known = cfg.quotes.get(quote_key(call), st.started)
    if known is None:
        return
    try:
        requirement = select_requirement(known, cfg.policy)
        check_transport_security(call.url, requirement.network, cfg.policy)
    except PaymentRequiredError:
        return  # the policy changed: pay the ordinary way, if at all
    if requirement.single_use:
        return  # an MPP challenge answers once (its id is the nonce): pay the 402 that comes
    yield from _sign_for(cfg, call, st, known, requirement)
    st.prepaid_shape = quote_key(call)


def _sign_for(
    cfg: FlowConfig, call: CallRequest, st: CallState, challenge: Challenge, requirement: Requirement
) -> Generator[Effect, Any, None]:
    """Grow the reservation to the quote, sign, remember the payment for retries and count it as exposure."""
    if requirement.amount > st.reserved:
        yield Grow(st.call_id, requirement.amount, cfg.caps())
        st.reserved = requirement.amount
    payment = yield from _authorize(cfg, challenge, requirement, call.url, call.model, "call")
    st.payment = payment
    yield NotePayment(call.fingerprint, "signed", payment, st.call_id, st.started)
    yield Expose(st.call_id, payment.amount, payment.valid_before)
    st.headers[payment.header_name] = payment.header_value


def _top_up_and_replay(
    cfg: FlowConfig, call: CallRequest, st: CallState, credit: CreditProfile
) -> Generator[Effect, Any, Head]:
    """Credit ran out: top up (a payment of its own, single-flight) or reuse another call's top-up; replay."""
    bought = yield from topup_flow(cfg, credit, max(st.reserved, 1), join_in_flight=True)
    head = yield from _send(cfg, call, st)
    if bought is None and head.status == 402 and _error_code(head) in credit.insufficient_codes:
        yield from topup_flow(cfg, credit, max(st.reserved, 1), join_in_flight=True)  # another's was not enough
        head = yield from _send(cfg, call, st)
    if head.status == 402 and _error_code(head) in credit.insufficient_codes:
        raise _Refused(
            InsufficientBalance("still not enough credit after a top-up; llm402 does not top up twice for one call")
        )
    return head


def _pay_and_replay(cfg: FlowConfig, call: CallRequest, st: CallState, head: Head) -> Generator[Effect, Any, Head]:
    """The 402 dance: parse, select under policy, (prove who pays,) grow the reservation, sign, replay once."""
    chosen = _choose(head, call.url, cfg.policy)
    if chosen is None:
        return head  # not an x402 challenge: the caller gets the gateway's 402
    challenge, requirement = chosen
    offers_siwx = bool(challenge.extensions and SIGN_IN_WITH_X in challenge.extensions)
    if offers_siwx and (call.origin, cfg.payer) in cfg.signed_in:
        # this wallet paid here before: the proof alone may be enough (as the reference client does); pay only if not
        proof = yield from ask(SignIn(dict(challenge.extensions or {}), call.url, requirement.network))
        if proof:
            head = yield from _send(cfg, call, replace(st, headers={**st.headers, **proof}))
            if head.status != 402:
                return head
            chosen = _choose(head, call.url, cfg.policy)
            if chosen is None:
                return head
            challenge, requirement = chosen
    yield from _sign_for(cfg, call, st, challenge, requirement)
    if cfg.policy.one_round_trip:
        yield KeepQuote(quote_key(call), challenge, st.started)
    head = yield from _send(cfg, call, st)
    yield from _check_paid_answer(cfg, call, st, head)
    if offers_siwx and 200 <= head.status < 300 and cfg.payer is not None:
        yield KeepSignedIn(call.origin, cfg.payer)
    return head


def _counting(call: CallRequest, st: CallState, cost: int, *, note: bool = True) -> Generator[Effect, Any, None]:
    """This attempt counts ``cost`` of its payment: an earlier refused attempt's exposure is released (it is counted
    here instead), and with ``note`` the payment stays resendable, marked as counted."""
    if cost and st.earlier_call_id is not None and not st.counted:
        yield Release(st.earlier_call_id)
    st.counted = st.counted or cost > 0
    if note:
        yield NotePayment(call.fingerprint, "unknown", counted=cost > 0)


_SETTLED_REASONS = ("nonce_already_used", "already_used", "already_settled", "settlement_pending")


def _check_paid_answer(cfg: FlowConfig, call: CallRequest, st: CallState, head: Head) -> Generator[Effect, Any, None]:
    """After a request that carried a payment: a 3xx is not followed and a 402 is not paid again. Raises `_Refused`
    with what the payment counts: all of it when it may have moved, none for a retry (an earlier attempt counted it)."""
    payment = st.payment
    assert payment is not None
    redirected = 300 <= head.status < 400
    if not redirected and not is_payment_refusal(head.status, head.headers, head.body):
        return  # a 402, or a 403 with a Payment-scheme problem (an MPP credential refused or replayed), goes on
    reason = _reason(head)
    if redirected:
        cost = st.cost_if_lost
        yield from _counting(call, st, cost)
        raise _Refused(
            PaymentRejected(
                "the gateway redirected the paid request; llm402 does not follow a paid request elsewhere",
                code="payment_redirected",
                gateway_reason=reason,
                amount=payment.amount,
            ),
            cost=cost,
        )
    settlement = _own_settlement(payment, decode_settlement(head.headers))
    shown = settlement is not None and (settlement.success or settlement.transaction is not None)
    if shown or any(word in reason for word in _SETTLED_REASONS):
        raise (yield from _settled_refusal(cfg, call, st, reason, settlement))
    yield NotePayment(call.fingerprint, "unknown")  # it may still settle: a retry re-sends it, never signs another
    if st.prepaid_shape is not None:
        yield KeepQuote(st.prepaid_shape, None, st.started)  # the remembered price is stale
    if st.reused:
        raise _Refused(
            PaymentOutcomeUnknown(
                "a payment for this call was already sent and its answer was lost; llm402 will not pay twice "
                f"({reason})",
                gateway_reason=reason,
            )
        )
    raise _Refused(
        PaymentRejected(
            f"the gateway refused the signed payment of {format_usd(payment.amount)}: {reason}",
            gateway_reason=reason,
            amount=payment.amount,
        )
    )


def _settled_refusal(
    cfg: FlowConfig, call: CallRequest, st: CallState, reason: str, settlement: Settlement | None
) -> Generator[Effect, Any, _Refused]:
    """The gateway shows the payment settled but gave no answer: `PaidAnswerLost`, counting what moved."""
    payment = st.payment
    assert payment is not None
    transaction = settlement.transaction if settlement is not None else None
    cost = charged(payment, settlement if settlement and settlement.success else None) if st.counts_payment else 0
    yield from _counting(call, st, cost, note=False)
    yield NotePayment(call.fingerprint, "settled", transaction=transaction)
    entry = cfg.payments.reusable(call.fingerprint, st.started)
    transaction = transaction or (entry.transaction if entry is not None else None)
    paid_by = entry.call_id if entry is not None else st.call_id
    return _Refused(
        PaidAnswerLost(
            f"the gateway shows this call's payment of {format_usd(payment.amount)} as settled "
            f"(transaction {transaction or 'not given'}) but answered 402 ({reason}); the answer was lost and "
            "retrying re-sends the same payment, never a second one",
            gateway_reason=reason,
            transaction=transaction,
            paid_call_id=paid_by,
            amount=payment.amount,
        ),
        cost=cost,
        settlement=settlement,
    )


def _movable(st: CallState, settlement: Settlement | None) -> int | None:
    """How much of a signed payment's unsettled remainder can still move (``None``: all of it)."""
    payment = st.payment
    if payment is None or not payment.requirement.upto or settlement is None or not settlement.success:
        return None
    return 0 if settlement.amount is not None else None  # a settled upto authorization is consumed


def _deliver(cfg: FlowConfig, call: CallRequest, st: CallState, head: Head) -> Generator[Effect, Any, None]:
    """Hand the answer over, metering it on the way; reconcile to what was really charged; leave a receipt."""
    payment = st.payment
    settlement = _own_settlement(payment, decode_settlement(head.headers)) if payment is not None else None
    extra: dict[str, str] = {}
    if payment is not None:
        extra["x-should-retry"] = "false"
        if cfg.cost_header and st.counts_payment:
            if payment.requirement.upto and (settlement is None or not settlement.success):
                extra["llm402-cost-max"] = str(payment.amount)  # an upto stream settles after its last byte
            else:
                extra["llm402-cost"] = str(charged(payment, settlement))
    end = yield from ask(Deliver(extra, strip_usage_event=st.usage_injected, deadline_seconds=cfg.max_stream_seconds))
    ok = 200 <= head.status < 300
    usage = end.usage
    if payment is not None:
        if end.settlement is not None and (settlement is None or not settlement.success):
            settlement = _own_settlement(payment, end.settlement)
        actual = charged(payment, settlement) if st.counts_payment else 0  # unless an earlier attempt counted it
        yield from _counting(call, st, actual, note=False)
        answered = ok and not end.aborted
        yield NotePayment(
            call.fingerprint, "answered" if answered else "unknown", counted=not st.counts_payment or actual > 0
        )
    else:
        metered = _usage_cost(cfg, call.model, usage)
        # no usage (an aborted stream, a gateway that never reports it): the reservation, an upper bound, not $0
        actual = (metered if metered is not None else st.reserved) if ok else 0
        if ok and metered is None and call.model is not None and cfg.prices.lookup(call.model) is None:
            warn_unpriced(call.origin, call.model)  # an unpaid answer of unknown price: never counted silently
    if cfg.cache is not None and cfg.cache.cacheable(call) and ok and not end.aborted and end.body is not None:
        kept = tuple((k, v) for k, v in head.headers.items() if k.lower() in ("content-type",))
        tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        yield KeepAnswer(_cache_key(cfg, call), CachedAnswer(head.status, kept, end.body, actual, *tokens))
    receipt = _receipt(
        cfg,
        call,
        st,
        status=head.status,
        cost=actual,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        settlement=settlement,
        error=end.error or (None if ok else f"http_{head.status}"),
        credits_remaining=str(usage.credits_remaining) if usage and usage.credits_remaining is not None else None,
    )
    yield Finish(st.call_id, actual, receipt, outstanding=_movable(st, settlement))


def _challenge_error(header: str | None) -> str | None:
    """The ``error`` of a ``PAYMENT-REQUIRED`` header that is not a payable challenge."""
    if not header:
        return None
    try:
        data = json.loads(base64.b64decode(header[:MAX_CHALLENGE_BYTES], validate=True))
    except (ValueError, binascii.Error):
        return None
    error = data.get("error") if isinstance(data, Mapping) else None
    return error if isinstance(error, str) else None


def _reason(head: Head) -> str:
    """The gateway's own words for a refusal (a short, secret-free string): the x402 ``error``/``errorReason``."""
    reasons: list[str] = []
    settlement = decode_settlement(head.headers)
    if settlement is not None and settlement.error:
        reasons.append(settlement.error)
    try:
        challenge = parse_challenge(head.headers, head.body or b"")
    except PaymentRequiredError:  # a refusal need not be a payable challenge (e.g. ``accepts: []``)
        challenge = None
    error = challenge.error if challenge is not None else _challenge_error(head.headers.get("payment-required"))
    problem = read_problem(head.headers, head.body) if not error else None
    if error:
        reasons.append(error)
    elif problem is not None:
        reasons.append(problem.reason())
    elif head.body:
        try:
            data = json.loads(head.body)
        except ValueError:
            data = head.body[:200].decode(errors="replace")
        if isinstance(data, Mapping):
            err = data.get("error") or data.get("errorReason")
            if isinstance(err, Mapping):
                err = err.get("code") or err.get("message")
            data = err
        if data:
            reasons.append(str(data))
    return "; ".join(dict.fromkeys(r[:200] for r in reasons)) or f"HTTP {head.status}"
