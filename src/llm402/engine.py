"""`Engine`: performs the flow's non-HTTP effects (ledger, signer, receipts). Shared by every transport."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Generator
from typing import Any

import httpx

from .approval import Approval, Approver
from .budget.base import Ledger
from .core import (
    Answer,
    Approve,
    CallRequest,
    Deliver,
    Effect,
    Expose,
    Finish,
    FlowConfig,
    Grow,
    Head,
    Record,
    Remaining,
    Reserve,
    Send,
    Sign,
    SignIn,
    SignMessage,
    StoreKey,
    call_flow,
)
from .credit import store_key
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
    ) -> None:
        self.config = config
        self.approver = approver
        self.key_store = key_store
        config.approver = approver is not None
        self.placeholder_auth = f"Bearer {placeholder_api_key}" if placeholder_api_key else None
        self.ledger = ledger
        self.signer = signer
        self.last_receipt: Receipt | None = None
        self._listeners: list[ReceiptListener] = []
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

    def flow(self, call: CallRequest) -> Generator[Effect, Any, None]:
        """A new flow for one request."""
        return call_flow(self.config, call)

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
        if self.key_store:
            store_key(self.key_store, effect.key)
        log.info("llm402 minted an API key for %s", self.config.agent)

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
                    response = client.request(
                        effect.method or "POST", effect.url or "", headers=dict(effect.headers), content=effect.body
                    )
                    value = Head(response.status_code, response.headers, response.content[:MAX_CHALLENGE_BYTES])
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
        while True:
            try:
                effect = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration:
                return None
            value, error = None, None
            if isinstance(effect, _IO_EFFECTS):
                return effect
            try:
                value = self.perform(effect)
            except Exception as exc:
                error = exc
