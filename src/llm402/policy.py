"""`Policy`: what an agent may spend, on what, and to whom. A value: build it, print it, load it from a file.

Every amount is configured in USD (``Decimal``) and used in micro-USDC (``int``). ``None`` means "no limit" for caps
and "no restriction" for allow-lists, except assets: ``allowed_assets=None`` admits only the USD stablecoins the
official x402 SDK knows. A policy that does not set the max ticket or the daily cap gets safe defaults ($1 a payment,
$10 per agent per UTC day); only an explicit ``None`` lifts them.
"""

from __future__ import annotations

import json
import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigurationError, PolicyRefusal
from .money import format_usd, usd_to_atomic

ENV_POLICY = "LLM402_POLICY"
DEFAULT_MAX_PAYMENT_USD = Decimal("1")
"""The max ticket of a policy that names none (the official x402 client's own default)."""
DEFAULT_DAILY_CAP_USD = Decimal("10")
"""The per-agent daily cap of a policy that names none."""
DEFAULT_LIMITS = ("max_payment_usd", "daily_cap_usd")


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors())


def _lower(values: frozenset[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(v.lower() for v in values)


class Policy(BaseModel):
    """Spending rules enforced before any money moves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_payment_usd: Decimal | None = Field(
        DEFAULT_MAX_PAYMENT_USD, description="max ticket: the most one payment may be (None: no limit)"
    )
    daily_cap_usd: Decimal | None = Field(
        DEFAULT_DAILY_CAP_USD, description="per agent per UTC day, payments and metered usage (None: no cap)"
    )
    total_budget_usd: Decimal | None = Field(None, description="per agent, all time")
    global_cap_usd: Decimal | None = Field(None, description="all agents sharing one ledger")
    allowed_intents: frozenset[str] | None = None
    models_by_intent: dict[str, frozenset[str]] | None = Field(
        None, description="intent -> models allowed for it ('*' allows any)"
    )
    allowed_models: frozenset[str] | None = None
    allowed_networks: frozenset[str] | None = Field(None, description="CAIP-2 ids, e.g. eip155:8453")
    allowed_assets: frozenset[str] | None = Field(None, description="token addresses; None = SDK-known stablecoins")
    allowed_payees: frozenset[str] | None = None
    allowed_schemes: frozenset[str] = Field(
        frozenset({"exact", "upto"}), description="x402 schemes llm402 may pay with (it knows exact and upto)"
    )
    prefer_upto: bool = Field(
        True,
        description="where a gateway offers x402 upto, authorize its ceiling and settle the actual cost "
        "(needs the wallet's one-time Permit2 approval)",
    )
    max_validity_seconds: int = Field(3600, gt=0, description="longest payment validity window accepted")
    topup_min_usd: Decimal | None = None
    topup_max_usd: Decimal | None = Field(None, description="largest credit top-up (None: the max ticket)")
    daily_topup_cap_usd: Decimal | None = Field(
        None, description="credit top-ups per agent per UTC day (None: the daily cap)"
    )
    allow_unpriced: bool = Field(
        False, description="under a cap, let calls through to models whose price is unknown (counted as $0)"
    )
    allow_insecure_http: bool = Field(False, description="pay over plain HTTP to a non-loopback host")
    payment_protocols: tuple[Literal["x402", "mpp"], ...] = Field(
        ("x402", "mpp"), description="the protocols llm402 pays by, most preferred first (a route may offer both)"
    )
    alert_at: tuple[Decimal, ...] = Field(
        (), description="fractions of each cap that raise a budget alert once per period, e.g. [0.8, 1]"
    )
    alert_webhook: str | None = Field(
        None, description="URL that receives each budget alert as a JSON POST", repr=False
    )  # webhook URLs often carry a token (Slack's do): never in a repr or a log
    one_round_trip: bool = Field(
        False, description="send a signed payment with the first request when the price is known"
    )

    def __init__(self, **data: Any) -> None:
        """Validate; a problem raises `ConfigurationError` naming the field (as a policy file does)."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigurationError(f"invalid policy: {_problems(exc)}") from None

    @field_validator("payment_protocols")
    @classmethod
    def _protocols(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("name each payment protocol once, at least one (x402, mpp)")
        return value

    @field_validator("alert_at")
    @classmethod
    def _fractions(cls, value: tuple[Decimal, ...]) -> tuple[Decimal, ...]:
        if any(not 0 < v <= 1 for v in value):
            raise ValueError("alert thresholds are fractions of a cap in (0, 1], e.g. 0.8 for 80%")
        return tuple(sorted(set(value)))

    @field_validator(
        "max_payment_usd",
        "daily_cap_usd",
        "total_budget_usd",
        "global_cap_usd",
        "topup_min_usd",
        "topup_max_usd",
        "daily_topup_cap_usd",
    )
    @classmethod
    def _usd(cls, value: Decimal | None) -> Decimal | None:
        if value is not None:
            usd_to_atomic(value)  # raises on negatives and sub-micro fractions
        return value

    # --- atomic views -------------------------------------------------------------------------------------
    @staticmethod
    def _atomic(value: Decimal | None) -> int | None:
        return None if value is None else usd_to_atomic(value)

    @property
    def max_payment(self) -> int | None:
        """Max ticket in micro-USDC."""
        return self._atomic(self.max_payment_usd)

    @property
    def daily_cap(self) -> int | None:
        """Daily cap per agent in micro-USDC."""
        return self._atomic(self.daily_cap_usd)

    @property
    def total_budget(self) -> int | None:
        """Total budget per agent in micro-USDC."""
        return self._atomic(self.total_budget_usd)

    @property
    def global_cap(self) -> int | None:
        """Global cap in micro-USDC."""
        return self._atomic(self.global_cap_usd)

    @property
    def topup_max(self) -> int | None:
        """Largest single top-up in micro-USDC: ``topup_max_usd``, else the max ticket (``None``: no limit)."""
        return self._atomic(self.topup_max_usd if self.topup_max_usd is not None else self.max_payment_usd)

    @property
    def daily_topup_cap(self) -> int | None:
        """Top-ups per agent per UTC day in micro-USDC: ``daily_topup_cap_usd``, else the daily cap."""
        return self._atomic(self.daily_topup_cap_usd if self.daily_topup_cap_usd is not None else self.daily_cap_usd)

    @property
    def has_cap(self) -> bool:
        """Whether any consumption cap (daily, total, global) is set."""
        return any(v is not None for v in (self.daily_cap_usd, self.total_budget_usd, self.global_cap_usd))

    @property
    def default_limits(self) -> tuple[str, ...]:
        """The safe default limits this policy runs on because it does not name them."""
        return tuple(name for name in DEFAULT_LIMITS if name not in self.model_fields_set)

    @property
    def topup_min(self) -> int | None:
        """Smallest automatic top-up in micro-USDC."""
        return self._atomic(self.topup_min_usd)

    # --- checks (pure; raise PolicyRefusal) ---------------------------------------------------------------
    def check_call(self, intent: str | None, model: str | None) -> None:
        """Refuse an intent or model the policy does not allow (before any network traffic)."""
        if self.allowed_intents is not None and (intent is None or intent not in self.allowed_intents):
            raise PolicyRefusal(
                f"intent {intent!r} is not allowed (allowed: {sorted(self.allowed_intents)})",
                code="intent_not_allowed",
                intent=intent,
            )
        if model is None:
            return
        if self.allowed_models is not None and model not in self.allowed_models:
            raise PolicyRefusal(f"model {model!r} is not allowed", code="model_not_allowed", model=model)
        if self.models_by_intent is not None and intent is not None and intent in self.models_by_intent:
            allowed = self.models_by_intent[intent]
            if "*" not in allowed and model not in allowed:
                raise PolicyRefusal(
                    f"model {model!r} is not allowed for intent {intent!r} (allowed: {sorted(allowed)})",
                    code="model_not_allowed",
                    model=model,
                    intent=intent,
                )

    def check_amount(self, amount: int) -> None:
        """Refuse a payment above the max ticket."""
        cap = self.max_payment
        if cap is not None and amount > cap:
            raise PolicyRefusal(
                f"payment of {format_usd(amount)} is above the max ticket of {format_usd(cap)}",
                code="payment_over_ticket",
                requested=amount,
                cap=cap,
            )

    def network_allowed(self, network: str) -> bool:
        """Whether a CAIP-2 network is allowed."""
        return self.allowed_networks is None or network in self.allowed_networks

    def payee_allowed(self, payee: str) -> bool:
        """Whether paying this address is allowed."""
        allowed = _lower(self.allowed_payees)
        return allowed is None or payee.lower() in allowed

    def asset_explicitly_allowed(self, asset: str) -> bool | None:
        """True/False when an allow-list is set; None when the SDK's known-asset table decides."""
        allowed = _lower(self.allowed_assets)
        return None if allowed is None else asset.lower() in allowed

    # --- sources --------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "policy") -> Policy:
        """Validate a mapping; errors name the field and the problem."""
        try:
            return cls(**data)
        except ConfigurationError as exc:  # raised by __init__ as "invalid policy: ..."
            raise ConfigurationError(f"invalid {source}: {str(exc).removeprefix('invalid policy: ')}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Load a TOML or JSON policy file (by extension; TOML otherwise). A ``[policy]`` table is accepted."""
        file = Path(path).expanduser()
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read policy file {file}: {exc.strerror}") from None
        try:
            data: Any = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"policy file {file} is not valid {file.suffix or 'TOML'}: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("policy"), dict):
            data = data["policy"]
        if not isinstance(data, dict):
            raise ConfigurationError(f"policy file {file} must hold a table/object")
        return cls.from_mapping(data, source=f"policy file {file}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Policy:
        """The policy file named by ``LLM402_POLICY``, or the default (no limits) policy."""
        env = os.environ if environ is None else environ
        path = env.get(ENV_POLICY)
        return cls.from_file(path) if path else cls()
