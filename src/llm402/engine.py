"""`Engine`: performs the flow's non-HTTP effects (ledger, signer, receipts). Shared by every transport."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, cast

import httpx

from .alerts import AlertListener, BudgetAlert, claim, crossed, post_webhook
from .approval import Approval, Approver
from .budget.base import Caps, Hold, Ledger, receipt_day
from .budget.memory import MemoryLedger
from .core import (
    Answer,
    Approve,
    AwaitRelease,
    CallRequest,
    CurrentKey,
    Deliver,
    Effect,
    Expose,
    Finish,
    FlowConfig,
    Grow,
    Head,
    KeepAnswer,
    KeepQuote,
    KeepSignedIn,
    LoadPrices,
    NotePayment,
    Record,
    Release,
    Remaining,
    Reserve,
    Send,
    Sign,
    SignIn,
    SignMessage,
    StoreKey,
    call_flow,
    refusal_flow,
)
from .credit import load_key, store_key
from .errors import PaymentRequiredError, ReservationHeld
from .receipts import Receipt, current_receipt
from .wallet import Signer
from .x402 import MAX_CHALLENGE_BYTES, sign_payment

log = logging.getLogger("llm402")

ReceiptListener = Callable[[Receipt], None]
delivery_context: contextvars.ContextVar[contextvars.Context | None] = contextvars.ContextVar(
    "llm402_delivery_context", default=None
)
"""Set while a delivered body finishes: the call's context at delivery, where receipt listeners run."""
IOEffect = Send | Deliver | Answer
_IO_EFFECTS = (Send, Deliver, Answer)
PRICES_RETRY = 60.0
"""Seconds between fetches of a gateway's published prices while a model's price is still unknown."""
LEASE_POLL = 0.05
_BOOKKEEPING = frozenset({NotePayment, KeepQuote, KeepAnswer, KeepSignedIn})
"""Effects that only touch this process's memory."""
_LEDGER_EFFECTS = frozenset({Reserve, Grow, Expose, Record, Remaining, AwaitRelease, Release})
_SIGNER_EFFECTS = frozenset({Sign, SignMessage, SignIn})


class _ProcessListeners:
    """Listeners of every gateway's receipts in this process (observability: `llm402.otel.instrument`)."""

    def __init__(self) -> None:
        self.listeners: tuple[ReceiptListener, ...] = ()  # replaced, never mutated: read without the lock
        self._lock = threading.Lock()

    def add(self, listener: ReceiptListener) -> None:
        with self._lock:
            if listener not in self.listeners:
                self.listeners = (*self.listeners, listener)

    def remove(self, listener: ReceiptListener) -> None:
        with self._lock:
            self.listeners = tuple(x for x in self.listeners if x is not listener)


_process = _ProcessListeners()


def add_process_listener(listener: ReceiptListener) -> None:
    """Call ``listener`` with the receipt of every call through any gateway of this process."""
    _process.add(listener)


def remove_process_listener(listener: ReceiptListener) -> None:
    """Stop calling ``listener``."""
    _process.remove(listener)


STANDALONE_SECONDS = 30.0
"""How long a request of llm402's own outside a call (``llm402 topup``) may take, body included."""


def _send_standalone(client: httpx.Client, send: Send) -> Head:
    """One request of llm402's own: at most 64 KiB of its body, read within `STANDALONE_SECONDS`."""
    deadline = time.monotonic() + STANDALONE_SECONDS
    request = client.build_request(send.method or "POST", send.url or "", headers=dict(send.headers), content=send.body)
    request.extensions["timeout"] = httpx.Timeout(STANDALONE_SECONDS).as_dict()
    response = client.send(request, stream=True)
    body = bytearray()
    try:
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > MAX_CHALLENGE_BYTES or time.monotonic() > deadline:
                break
    finally:
        response.close()
    return Head(response.status_code, response.headers, bytes(body[:MAX_CHALLENGE_BYTES]))


class Engine:
    """Runs `call_flow` for one gateway: its config, ledger and signer, and where receipts go."""

    def __init__(
        self,
        config: FlowConfig,
        ledger: Ledger,
        signer: Signer | None,
        placeholder_api_key: str | None = None,
        approver: Approver | None = None,
        key_store: str | None = None,
        price_loader: Callable[[], object] | None = None,
    ) -> None:
        self.config = config
        self.price_loader = price_loader
        self._prices_tried_at = -float("inf")
        self._key_lock = threading.Lock()
        self.approver = approver
        self.key_store = key_store
        config.approver = approver is not None
        self.placeholder_auth = f"Bearer {placeholder_api_key}" if placeholder_api_key else None
        self.ledger = ledger
        self._ledger_blocks = not isinstance(ledger, MemoryLedger)
        self.signer = signer
        self.last_receipt: Receipt | None = None
        self._listeners: list[ReceiptListener] = []
        self._alert_listeners: list[AlertListener] = []
        self._lock = threading.Lock()
        self._handlers: dict[type, Callable[[Any], Any]] = {
            Reserve: self._reserve,
            Grow: self._grow,
            Sign: self._sign,
            Expose: self._expose,
            Finish: self._finish,
            Record: self._record,
            Remaining: self._remaining,
            SignMessage: self._sign_message,
            StoreKey: self._store_key,
            SignIn: self._sign_in,
            Approve: self._approve,
            AwaitRelease: self._await_release,
            Release: self._release,
            CurrentKey: self._current_key,
            LoadPrices: self._load_prices,
            NotePayment: self._note_payment,
            KeepQuote: self._keep_quote,
            KeepAnswer: self._keep_answer,
            KeepSignedIn: self._keep_signed_in,
        }
        """Each non-HTTP effect's performer, by its exact type (one dict lookup instead of a chain of isinstance)."""

    def add_listener(self, listener: ReceiptListener) -> None:
        """Call ``listener`` with every receipt (adapters use this for cost callbacks)."""
        with self._lock:  # copy on write: publishing reads the list without the lock
            self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: ReceiptListener) -> None:
        """Stop calling ``listener``."""
        with self._lock:
            if listener in self._listeners:
                listeners = list(self._listeners)
                listeners.remove(listener)
                self._listeners = listeners

    def blocks(self, effect: Effect) -> bool:
        """Whether performing ``effect`` may block (ledger or network I/O, a remote signer, user callbacks): an async
        transport performs those off the event loop and the rest on it."""
        kind = type(effect)
        if kind in _BOOKKEEPING:
            return False
        if kind in _LEDGER_EFFECTS:
            return self._ledger_blocks
        if kind is Finish:
            return (
                self._ledger_blocks or bool(self._listeners or _process.listeners) or bool(self.config.policy.alert_at)
            )
        if kind in _SIGNER_EFFECTS:
            return bool(getattr(self.signer, "blocking", True))
        return True

    @property
    def starts_blocking(self) -> bool:
        """Whether making a flow may block (a live policy source reads its source)."""
        return self.config.policy_source is not None

    def flow(self, call: CallRequest) -> Generator[Effect, Any, None]:
        """A new flow for one request (under the live policy, when the policy is a live source)."""
        config = self.config
        if config.policy_source is not None:
            try:
                config.policy = config.policy_source()
            except PaymentRequiredError as exc:  # e.g. an on-chain policy that was revoked or cannot be read
                return refusal_flow(config, call, exc)
        return call_flow(config, call)

    def perform(self, effect: Effect) -> Any:
        """Carry out a non-HTTP effect."""
        handler = self._handlers.get(type(effect))
        if handler is None:
            raise TypeError(f"not a ledger or signer effect: {type(effect).__name__}")
        return handler(effect)

    def _reserve(self, effect: Reserve) -> None:
        self.ledger.reserve(effect.hold, effect.caps)

    def _grow(self, effect: Grow) -> None:
        self.ledger.grow(effect.call_id, effect.amount, effect.caps)

    def _sign(self, effect: Sign) -> Any:
        if self.signer is None:
            from .errors import SignerError

            raise SignerError("the gateway asked for a payment and no wallet is configured", code="no_wallet")
        return sign_payment(effect.challenge, effect.requirement, self.signer, effect.resource_url)

    def _expose(self, effect: Expose) -> None:
        self.ledger.expose(effect.call_id, effect.amount, effect.valid_before)

    def _record(self, effect: Record) -> None:
        self.ledger.record(effect.receipt)
        self._publish(effect.receipt)

    def _sign_message(self, effect: SignMessage) -> str:
        if self.signer is None:
            from .errors import SignerError

            raise SignerError("signing in to the gateway needs a wallet", code="no_wallet")
        return "0x" + self.signer.sign_message(effect.text).hex()

    def _store_key(self, effect: StoreKey) -> None:
        with self._key_lock:
            if self.key_store:
                store_key(self.key_store, effect.key)
            self.config.api_key = effect.key
        log.info("llm402 minted an API key for %s", self.config.agent)

    def _current_key(self, effect: CurrentKey) -> str | None:
        """The minted key in use, else one another process kept in the key store since."""
        with self._key_lock:
            if self.config.api_key is None and self.key_store:
                self.config.api_key = load_key(self.key_store)
            return self.config.api_key

    def _await_release(self, effect: AwaitRelease) -> bool:
        """Poll until the reservation is gone (by briefly taking it over, at zero, and giving it back)."""
        deadline = time.monotonic() + effect.timeout
        while True:
            now = self.config.clock()
            try:
                self.ledger.reserve(Hold(effect.call_id, "", "", 0, now + 5.0), Caps())
            except ReservationHeld:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(LEASE_POLL)
                continue
            self.ledger.settle(effect.call_id, 0, None)
            return True

    def _note_payment(self, effect: NotePayment) -> None:
        payments, fingerprint = self.config.payments, effect.fingerprint
        if effect.state == "signed" and effect.payment is not None:
            payments.remember(fingerprint, effect.payment, effect.call_id, effect.now)
        elif effect.state == "unknown":
            payments.mark_unknown(fingerprint, effect.counted)
        elif effect.state == "settled":
            payments.mark_settled(fingerprint, effect.transaction)
        elif effect.state == "answered":
            payments.forget(fingerprint)

    def _keep_quote(self, effect: KeepQuote) -> None:
        if effect.challenge is None:
            self.config.quotes.forget(effect.key)
        else:
            self.config.quotes.put(effect.key, effect.challenge, effect.now)

    def _keep_answer(self, effect: KeepAnswer) -> None:
        if self.config.cache is not None:
            self.config.cache.put(effect.key, effect.answer)

    def _keep_signed_in(self, effect: KeepSignedIn) -> None:
        self.config.signed_in.add((effect.origin, effect.payer))

    def _release(self, effect: Release) -> None:
        self.ledger.settle(effect.call_id, 0, None)

    def _load_prices(self, effect: LoadPrices) -> None:
        """Fetch the gateway's published prices (a model's price is unknown), at most once a minute."""
        now = time.monotonic()
        if self.price_loader is None or now - self._prices_tried_at < PRICES_RETRY:
            return
        self._prices_tried_at = now
        try:
            self.price_loader()
        except Exception as exc:  # an unreachable catalog leaves prices unknown: capped calls are refused
            log.warning("llm402: could not load the gateway's prices: %s", type(exc).__name__)
            return

    def _approve(self, effect: Approve) -> Any:
        if self.approver is None:
            return Approval.approve()
        return self.approver(effect.proposal)

    def _sign_in(self, effect: SignIn) -> dict[str, str]:
        from .errors import PaymentRequiredError
        from .identity import IdentityError, siwx_headers

        if self.signer is None:
            return {}
        try:
            return siwx_headers(effect.extensions, self.signer, effect.url, network=effect.network)
        except IdentityError as exc:
            raise PaymentRequiredError(str(exc), code="sign_in_refused") from None

    def _remaining(self, effect: Remaining) -> int | None:
        totals = self.ledger.totals(effect.agent, effect.day)
        left = [
            cap - spent - reserved
            for cap, spent, reserved in (
                (effect.caps.daily, totals.day_spent, totals.day_reserved),
                (effect.caps.total, totals.agent_spent, totals.agent_reserved),
                (effect.caps.global_, totals.global_spent, totals.global_reserved),
            )
            if cap is not None
        ]
        return max(0, min(left)) if left else None

    def _finish(self, effect: Finish) -> None:
        receipt = effect.receipt
        if effect.reserved:
            self.ledger.settle(effect.call_id, effect.actual, receipt, effect.outstanding)
        else:
            self.ledger.record(receipt)
        self._publish(receipt)
        if self.config.policy.alert_at and effect.actual:
            self._check_alerts(receipt)

    def add_alert_listener(self, listener: AlertListener) -> None:
        """Call ``listener`` with each budget alert this process fires."""
        with self._lock:
            self._alert_listeners = [*self._alert_listeners, listener]

    def _check_alerts(self, receipt: Receipt) -> None:
        """Fire each alert threshold a cap has crossed, once per period across every process on this ledger."""
        config = self.config
        day = receipt_day(receipt.started_at)
        totals = self.ledger.totals(config.agent, day)
        now = config.clock()
        for alert in crossed(config.agent, day, config.caps(), totals, config.policy.alert_at):
            if claim(self.ledger, alert, now):
                self._fire(alert)

    def _fire(self, alert: BudgetAlert) -> None:
        log.warning("%s", alert.message())
        for listener in self._alert_listeners:
            try:
                listener(alert)
            except Exception:  # an alert listener must never break a paid call
                log.exception("llm402 alert listener failed")
        if self.config.policy.alert_webhook:
            post_webhook(self.config.policy.alert_webhook, alert)

    def _publish(self, receipt: Receipt) -> None:
        self.last_receipt = receipt
        current_receipt.set(receipt)
        log.debug(
            "llm402 call %s %s model=%s status=%s cost=%d error=%s",
            receipt.method,
            receipt.path,
            receipt.model,
            receipt.status,
            receipt.cost,
            receipt.error,
        )
        listeners = self._listeners  # replaced, never mutated: safe to read without the lock
        if _process.listeners:
            listeners = [*listeners, *_process.listeners]
        if not listeners:
            return
        context = delivery_context.get()
        for listener in listeners:
            try:
                if context is not None:
                    context.run(listener, receipt)
                else:
                    listener(receipt)
            except Exception:  # a listener must never break a paid call
                log.exception("llm402 receipt listener failed")

    def run_standalone(self, flow: Generator[Effect, Any, Any], client: httpx.Client) -> Any:
        """Drive a flow of llm402's own requests (a top-up, a key mint) over a plain sync client; its result."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                effect = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                if isinstance(effect, Send):
                    value = _send_standalone(client, effect)
                elif isinstance(effect, Deliver | Answer):
                    raise TypeError("a standalone flow cannot deliver or answer a caller")
                else:
                    value = self.perform(effect)
            except Exception as exc:
                error = exc

    def advance(
        self, flow: Generator[Effect, Any, None], value: Any = None, error: BaseException | None = None
    ) -> IOEffect | None:
        """Resume ``flow`` and run it until it needs HTTP (`Send`, `Deliver`, `Answer`) or ends (``None``)."""
        return cast("IOEffect | None", self.run_until(flow, value, error))

    def run_until(
        self,
        flow: Generator[Effect, Any, None],
        value: Any = None,
        error: BaseException | None = None,
        pause: Callable[[Effect], bool] | None = None,
    ) -> Effect | None:
        """`advance`, also stopping before an effect ``pause`` picks: it is returned unperformed (the async driver
        performs the effects that may block on a worker thread)."""
        while True:
            try:
                effect = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration:
                return None
            value, error = None, None
            if isinstance(effect, _IO_EFFECTS) or (pause is not None and pause(effect)):
                return effect
            try:
                value = self.perform(effect)
            except Exception as exc:  # the flow decides what a failed effect means
                error = exc
