"""The sandbox's configuration: network, asset, payee, prices, limits and default faults."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

Dialect = Literal["v2", "v1", "kiosk"]
Mode = Literal["v2", "v1", "kiosk", "free", "aisa", "upto"]
"""How a mount answers: x402 in a dialect, ``free`` (a plain gateway: no payment), ``aisa`` (AIsa's
``api_key_proxy`` with prepaid credits, its error envelope and ``usage.cost``; x402 v2 without a key), or ``upto``
(x402 v2 offering the ``upto`` scheme, a Permit2 ceiling settled to the metered cost, beside ``exact``)."""
DIALECTS: tuple[Dialect, ...] = ("v2", "v1", "kiosk")

PAYEE_KEY = "0x730d9372e02ddd01ff19005f574e6bb719b72f1d31dff2c0dd779263d201cb80"
"""sha256("llm402 sandbox payee"): a throwaway key, public on purpose; only the sandbox's test USDC is at stake."""
PAYEE_ADDRESS = "0x26048d144cf2D32a966DaC5D7C331588f1062dd3"
"""The address of `PAYEE_KEY` (a test checks the derivation)."""
OTHER_PAYEE_ADDRESS = "0x798F05Edc32C1cb32aF2225F3D051dED281425Ba"
"""The payee the ``change_payee_on_replay`` fault switches to: sha256("llm402 sandbox payee (changed)")'s address."""

FACILITATOR_KEY = "0xd937b61115f7733d5edede4db32e623b6e00216cd01a4667c125c7d51db88c72"
"""sha256("llm402 sandbox facilitator"): the key behind the facilitator address upto payments are bound to."""
FACILITATOR_ADDRESS = "0x586702f8aA31F6764073AA33E075ed6611c73869"
"""The address of `FACILITATOR_KEY` (``extra.facilitatorAddress`` of the sandbox's upto offers)."""

BASE_SEPOLIA_USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model of the price table. Prices are USD per 1M tokens (decimals, converted once to integers)."""

    id: str
    context_length: int
    prompt_price: Decimal
    completion_price: Decimal

    @property
    def name(self) -> str:
        """The model name without its provider prefix."""
        return self.id.split("/", 1)[-1]

    @property
    def provider(self) -> str:
        """The provider prefix (``sandbox`` for the scripted models)."""
        return self.id.split("/", 1)[0] if "/" in self.id else "sandbox"

    @property
    def prompt_micro_per_1m(self) -> int:
        """Prompt price in micro-USDC per 1M tokens (exact)."""
        return _micro(self.prompt_price)

    @property
    def completion_micro_per_1m(self) -> int:
        """Completion price in micro-USDC per 1M tokens (exact)."""
        return _micro(self.completion_price)


def _micro(usd: Decimal) -> int:
    micro = usd * 1_000_000
    if micro != micro.to_integral_value() or micro < 0:
        raise ValueError(f"price {usd} USD per 1M tokens is not a whole number of micro-USDC")
    return int(micro)


DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("sandbox/small", 128_000, Decimal("0.15"), Decimal("0.60")),
    ModelSpec("sandbox/medium", 200_000, Decimal("1.25"), Decimal("10.00")),
    ModelSpec("sandbox/large", 1_000_000, Decimal("3.00"), Decimal("15.00")),
    ModelSpec("sandbox/vision", 128_000, Decimal("0.60"), Decimal("3.00")),
)


@dataclass
class SandboxConfig:
    """Everything the sandbox needs; every field has a default (Base Sepolia, test USDC, the scripted models)."""

    network: str = "eip155:84532"
    network_v1: str = "base-sepolia"
    network_label: str = "Base Sepolia (Testnet)"
    chain_id: int = 84532
    asset: str = BASE_SEPOLIA_USDC
    asset_name: str = "USDC"
    asset_version: str = "2"
    payee: str = PAYEE_ADDRESS
    facilitator_address: str = FACILITATOR_ADDRESS
    markup_bps: int = 0
    default_dialect: Dialect = "v2"
    max_timeout_seconds: int = 60
    rate_limit_per_minute: int = 600
    rate_limit_per_day: int = 100_000
    topup_min_usd: int = 1
    topup_max_usd: int = 10_000
    siwe_statement: str = "Sign in to the AI Gateway"
    stream_chunk_delay_ms: int = 0
    upstream_url: str | None = None
    upstream_api_key: str | None = None
    faults: str = ""
    db_path: str = ":memory:"
    models: tuple[ModelSpec, ...] = field(default_factory=lambda: DEFAULT_MODELS)
    image_price_micro: int = 40_000
    default_max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.default_dialect not in DIALECTS:
            raise ValueError(f"default_dialect must be one of {DIALECTS}, not {self.default_dialect!r}")
        if self.markup_bps < 0:
            raise ValueError("markup_bps must be >= 0")
        for spec in self.models:
            _ = spec.prompt_micro_per_1m, spec.completion_micro_per_1m  # fail early on a price finer than 1e-6 USD

    def model(self, model_id: str) -> ModelSpec | None:
        """The price-table entry of ``model_id``, or None."""
        return next((m for m in self.models if m.id == model_id), None)
