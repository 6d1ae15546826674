"""Money in integer atomic units (micro-USDC, 6 decimals); `Decimal` only at the edges."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

USDC_DECIMALS = 6
ATOMIC_PER_USD = 10**USDC_DECIMALS
MAX_UINT256 = 2**256 - 1


def usd_to_atomic(value: Decimal | str | int) -> int:
    """Convert a USD amount to micro-USDC exactly; refuse floats, negatives and sub-micro fractions."""
    if isinstance(value, bool | float):
        raise TypeError("money must be a Decimal, str or int, never a float")
    try:
        amount = Decimal(str(value).strip().lstrip("$"))
    except InvalidOperation:
        raise ValueError(f"not a USD amount: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"USD amount must be a finite non-negative number, got {value!r}")
    atomic = amount * ATOMIC_PER_USD
    if atomic != atomic.to_integral_value():
        raise ValueError(f"USD amount {value!r} has more than {USDC_DECIMALS} decimals")
    return int(atomic)


def atomic_to_usd(atomic: int) -> Decimal:
    """Micro-USDC to a USD Decimal (display and configuration only)."""
    return Decimal(atomic) / Decimal(ATOMIC_PER_USD)


def format_usd(atomic: int) -> str:
    """Render micro-USDC as a dollar string with six decimals, e.g. ``$0.012500``."""
    sign = "-" if atomic < 0 else ""
    whole, frac = divmod(abs(atomic), ATOMIC_PER_USD)
    return f"{sign}${whole}.{frac:06d}"


def parse_atomic(value: object, *, allow_zero: bool = False) -> int:
    """Parse an atomic amount from the wire: a base-10 integer string (or int) in 1..2**256-1 (0 too with
    ``allow_zero``: a settlement of nothing is a valid report)."""
    if isinstance(value, bool):
        raise ValueError("amount must be an integer, got a boolean")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise ValueError(f"amount must be an integer string, got {type(value).__name__}")
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"amount must be a non-negative base-10 integer, got {text[:40]!r}")
    amount = int(text)
    if amount == 0 and not allow_zero:
        raise ValueError("amount must be positive")
    if amount > MAX_UINT256:
        raise ValueError("amount does not fit in a uint256")
    return amount
