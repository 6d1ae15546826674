"""Fault injection: the ``X-Sandbox-Fault`` request header (or ``SandboxConfig.faults``), ``;``-separated items.

========================  ==========================================================================================
``status=429|500|502|503`` answer that status before any payment (``retry_after=N`` adds ``Retry-After``)
``delay_ms=N``            wait N ms before answering
``fail_after_settle``     settle the payment (or charge the credit), then answer 500 without a settlement header
``stall_after_settle=S``  settle, then sleep S seconds before answering
``stream_cut=N``          stream N content chunks, then drop the connection without ``[DONE]``
``stream_forever``        keep streaming keep-alive comments and empty chunks until the client goes away
``malformed_402=KIND``    garble the 402: bad_base64, bad_json, missing_payee, negative_amount, fractional_amount,
                          huge_amount, unknown_asset, unknown_network, empty_accepts
``redirect_after_402=URL`` answer the paid replay with a 307 to URL instead of processing it
``change_payee_on_replay`` / ``change_amount_on_replay``  the paid replay gets a fresh 402 (other payee / amount)
``replay_402``            answer a valid paid replay with 402 without settling
``upstream_error``        the model fails after the payment was verified (502, nothing settled or charged)
``oversized=N``           pad the JSON answer to N bytes
``settlement_payer=0x..`` lie about the payer in the settlement header
``settlement_amount=N``   lie about the amount in the settlement header (an upto settlement of N)
``times=N``               apply the fault only to the first N requests carrying this exact spec
========================  ==========================================================================================

Faults apply to the paid endpoints (chat, embeddings, images, generateContent, top-up), to the paid replay as
well (the client re-sends the same headers). The header, when present, replaces ``SandboxConfig.faults``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

MALFORMED_KINDS = frozenset(
    {
        "bad_base64",
        "bad_json",
        "missing_payee",
        "negative_amount",
        "fractional_amount",
        "huge_amount",
        "unknown_asset",
        "unknown_network",
        "empty_accepts",
    }
)
STATUSES = frozenset({429, 500, 502, 503})
MAX_OVERSIZED = 64 * 1024 * 1024
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


class FaultSpecError(ValueError):
    """An unparseable fault spec (answered with 400 VALIDATION_ERROR)."""


@dataclass(frozen=True, slots=True)
class Faults:
    """A parsed fault spec; the default instance injects nothing."""

    status: int | None = None
    retry_after: int | None = None
    delay_ms: int = 0
    fail_after_settle: bool = False
    stall_after_settle: float | None = None
    stream_cut: int | None = None
    stream_forever: bool = False
    malformed_402: str | None = None
    redirect_after_402: str | None = None
    change_payee_on_replay: bool = False
    change_amount_on_replay: bool = False
    replay_402: bool = False
    upstream_error: bool = False
    oversized: int | None = None
    settlement_payer: str | None = None
    settlement_amount: int | None = None
    times: int | None = None


NO_FAULTS = Faults()


def _int(name: str, value: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        raise FaultSpecError(f"{name} needs an integer, not {value[:40]!r}") from None
    if number < minimum:
        raise FaultSpecError(f"{name} must be >= {minimum}")
    return number


def parse_faults(spec: str) -> Faults:
    """Parse ``"status=503;times=1"``. Raises `FaultSpecError`."""
    values: dict[str, object] = {}
    flags = {"fail_after_settle", "stream_forever", "change_payee_on_replay", "change_amount_on_replay", "replay_402"}
    flags.add("upstream_error")
    for raw in spec.split(";"):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip().lower(), value.strip()
        if name in flags:
            if sep and value.lower() not in ("1", "true", "yes"):
                raise FaultSpecError(f"{name} takes no value")
            values[name] = True
        elif not sep or not value:
            raise FaultSpecError(
                f"unknown fault {name[:40]!r}" if name not in Faults.__slots__ else f"{name} needs =value"
            )
        elif name == "status":
            status = _int(name, value)
            if status not in STATUSES:
                raise FaultSpecError(f"status must be one of {sorted(STATUSES)}")
            values[name] = status
        elif name in ("retry_after", "delay_ms", "stream_cut", "settlement_amount"):
            values[name] = _int(name, value)
        elif name == "oversized":
            size = _int(name, value)
            if size > MAX_OVERSIZED:
                raise FaultSpecError(f"oversized is capped at {MAX_OVERSIZED} bytes")
            values[name] = size
        elif name == "times":
            values[name] = _int(name, value, minimum=1)
        elif name == "stall_after_settle":
            try:
                seconds = float(value)
            except ValueError:
                raise FaultSpecError("stall_after_settle needs a number of seconds") from None
            if not 0 <= seconds <= 3600:
                raise FaultSpecError("stall_after_settle must be within 0..3600 seconds")
            values[name] = seconds
        elif name == "malformed_402":
            if value not in MALFORMED_KINDS:
                raise FaultSpecError(f"malformed_402 must be one of {sorted(MALFORMED_KINDS)}")
            values[name] = value
        elif name == "redirect_after_402":
            values[name] = value
        elif name == "settlement_payer":
            if not _ADDRESS.match(value):
                raise FaultSpecError("settlement_payer needs an address")
            values[name] = value
        else:
            raise FaultSpecError(f"unknown fault {name[:40]!r}")
    return Faults(**values)  # type: ignore[arg-type]


class FaultBook:
    """Resolves the faults of each request, counting ``times=N`` per exact spec string."""

    def __init__(self, default_spec: str = "") -> None:
        self._default_spec = default_spec.strip()
        parse_faults(self._default_spec)  # a bad default fails at startup, not on the first request
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def resolve(self, header: str | None) -> Faults:
        """The faults for a request carrying ``header`` (None: the configured default). Raises `FaultSpecError`."""
        spec = (header if header is not None else self._default_spec).strip()
        if not spec:
            return NO_FAULTS
        faults = parse_faults(spec)
        if faults.times is None:
            return faults
        with self._lock:
            self._counts[spec] = seen = self._counts.get(spec, 0) + 1
        return faults if seen <= faults.times else NO_FAULTS
