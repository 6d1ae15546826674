"""Routing rules as values (tenacity style): when to fall back, how long to wait, when a route's circuit opens.

Each rule is a small frozen value a user can build, print and compare; the router only evaluates them. The mutable
per-route state (consecutive failures, an open circuit, a Retry-After hold) lives in `RouteHealth`, apart from the
rules it follows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Literal

from tenacity import RetryCallState, stop_after_attempt, wait_exponential_jitter
from tenacity.stop import stop_base
from tenacity.wait import wait_base

Clock = Callable[[], float]

SERVER_ERRORS = frozenset(range(500, 600))
DEFAULT_FALLBACK_STATUSES = frozenset({408, 429}) | SERVER_ERRORS
"""Statuses that say "this route, not this request": a timeout, a rate limit, any server error."""
CONTEXT_ERROR_STATUSES = frozenset({400, 413, 422})
_CONTEXT_MARKERS = (
    "context_length",
    "context length",
    "context window",
    "maximum context",
    "too many tokens",
    "prompt is too long",
)


def retry_after_seconds(headers: Mapping[str, str], now: Callable[[], float] = time.time) -> float | None:
    """The wait a response asks for: ``retry-after-ms`` (OpenAI), ``Retry-After`` in seconds or as an HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


_MODEL_MARKERS = ("model_not_found", "unknown model", "model not found", "no such model", "invalid model")


def looks_like_unknown_model(status: int, body: bytes) -> bool:
    """A 404, or a 400/422 saying the model does not exist: the route's model is not on its gateway."""
    if status == 404:
        return True
    if status not in (400, 422):
        return False
    text = body[:4096].decode("utf-8", "replace").lower()
    return any(marker in text for marker in _MODEL_MARKERS)


def looks_like_context_error(status: int, body: bytes) -> bool:
    """A 400/413/422 whose error text is about the context window (gateways word it differently)."""
    if status not in CONTEXT_ERROR_STATUSES:
        return False
    text = body[:4096].decode("utf-8", "replace").lower()
    return any(marker in text for marker in _CONTEXT_MARKERS)


class wait_retry_after(wait_base):  # noqa: N801 - tenacity's naming, so it reads like its siblings
    """Wait what the gateway asked (``Retry-After``, carried by the failed pass), and never less than ``fallback``.

    Composes like any tenacity wait: ``wait_retry_after(wait_exponential_jitter(multiplier=0.25, max=8))``.
    """

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        base = float(self.fallback(retry_state))
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        hint = getattr(error, "retry_after", None)
        return max(base, float(hint)) if isinstance(hint, int | float) else base

    def __repr__(self) -> str:
        return f"wait_retry_after({self.fallback!r})"


def _default_stop() -> stop_base:
    return stop_after_attempt(3)


def _default_wait() -> wait_base:
    return wait_exponential_jitter(multiplier=0.25, max=8.0, jitter=0.25)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often the router goes over its routes again, and how long it waits in between.

    One *pass* tries every route still in play once, in order; a pass that ends without an answer is retried under
    ``stop``, after ``wait`` or the longest Retry-After that is still running, whichever is longer. A Retry-After
    above ``max_retry_after`` takes the route out of the call instead of stalling it.
    """

    stop: stop_base = field(default_factory=_default_stop)
    wait: wait_base = field(default_factory=_default_wait)
    max_retry_after: float = 30.0


@dataclass(frozen=True, slots=True)
class FallbackRules:
    """What makes the router leave a route for the next one.

    ``statuses``: gateway answers that blame the route (default: 408, 429, every 5xx).
    ``context_length``: a 400/413/422 about the context window moves on to a route that may have a larger one.
    ``unknown_model``: a 404, or a 400 saying the model does not exist. The router names each route's model, so
    a model a gateway does not offer is the route's fault, not the caller's.
    ``unpaid_402``: a gateway 402 the core did not pay (not an x402 challenge, e.g. an API key out of credit).
    ``refusals``: llm402's local refusals (``x-llm402-refusal`` codes) that fall back; ``None`` = all of them. Only a
    refusal llm402 made counts: a gateway's answer carrying that header or envelope is judged as the gateway's (its
    402 falls under ``unpaid_402``, its 5xx under ``statuses``). A refusal never left the machine, and the next
    route's own policy and budget are checked again before any traffic, so falling back on one cannot spend what the
    refusal protected. ``budget_exceeded`` is narrowed further by the router: a cap refusal is the same on another
    route only when that route books into the same ledger, under the same cap, for the same agent (any agent, for the
    global cap), and would reserve at least as much; those routes are skipped without a try, and the others (their own
    ledger or agent, or cheaper) are tried.
    Anything else (400, 401, 404, ...) is the request's fault, is the same on every route, and goes to the caller.
    """

    statuses: frozenset[int] = DEFAULT_FALLBACK_STATUSES
    context_length: bool = True
    unknown_model: bool = True
    unpaid_402: bool = True
    refusals: frozenset[str] | None = None

    def falls_back_on_refusal(self, code: str) -> bool:
        """Whether a local refusal with ``code`` moves on to the next route."""
        return self.refusals is None or code in self.refusals


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Open a route's circuit after ``failures`` consecutive failures (5xx, timeouts, connection errors, lost
    answers); skip it without traffic for ``cooldown`` seconds; then let exactly one probe decide."""

    failures: int = 5
    cooldown: float = 30.0

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError("CircuitBreaker.failures must be >= 1")
        if self.cooldown < 0:
            raise ValueError("CircuitBreaker.cooldown must be >= 0")


class Admission(Enum):
    """How a route was let in: normally, or as the single probe of a half-open circuit."""

    CLOSED = "closed"
    PROBE = "probe"


Health = Literal["success", "failure", "neutral"]
"""What an attempt says about its route: it works, it failed, or nothing (a local refusal, a rate limit)."""


class RouteHealth:
    """One route's circuit and Retry-After hold, shared by every call through the router (thread-safe)."""

    def __init__(self, breaker: CircuitBreaker, clock: Clock) -> None:
        self.breaker = breaker
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._hold_until = 0.0

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        """``closed`` (traffic flows), ``open`` (skipped), ``half_open`` (cool-down over: one probe may go)."""
        with self._lock:
            return self._state(self._clock())

    def _state(self, now: float) -> Literal["closed", "open", "half_open"]:
        if self._opened_at is None:
            return "closed"
        return "half_open" if now - self._opened_at >= self.breaker.cooldown else "open"

    def held_for(self) -> float:
        """Seconds left of a Retry-After hold (0 when none)."""
        with self._lock:
            return max(0.0, self._hold_until - self._clock())

    def reopens_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self._opened_at + self.breaker.cooldown - self._clock())

    def admit(self) -> Admission | Literal["circuit_open", "rate_limited"]:
        """Let an attempt in, or say why not. A half-open circuit admits one probe at a time."""
        with self._lock:
            now = self._clock()
            if now < self._hold_until:
                return "rate_limited"
            state = self._state(now)
            if state == "closed":
                return Admission.CLOSED
            if state == "open" or self._probing:
                return "circuit_open"
            self._probing = True
            return Admission.PROBE

    def hold(self, seconds: float) -> None:
        """Keep traffic off this route for ``seconds`` (a Retry-After), for every call."""
        with self._lock:
            self._hold_until = max(self._hold_until, self._clock() + seconds)

    def record(self, outcome: Health, admission: Admission) -> None:
        """Count an attempt's outcome; a probe's outcome closes or re-opens the circuit."""
        with self._lock:
            probe = admission is Admission.PROBE
            if probe:
                self._probing = False
            if outcome == "success":
                self._failures = 0
                self._opened_at = None
            elif outcome == "failure":
                self._failures += 1
                if probe or self._failures >= self.breaker.failures:
                    self._opened_at = self._clock()

    def __repr__(self) -> str:
        return f"RouteHealth(state={self.state!r}, failures={self._failures})"
