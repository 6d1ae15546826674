"""Ledger URLs: ``memory://``, ``sqlite:///path`` (default ``~/.llm402/ledger.db`` or ``LLM402_LEDGER``), ``redis://``,
``postgresql://`` (or ``postgres://``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from .base import Ledger
from .memory import MemoryLedger

ENV_LEDGER = "LLM402_LEDGER"
DEFAULT_LEDGER_DIR = "~/.llm402"
"""The default ledger's folder: the only folder llm402 creates for a ledger (any other must exist)."""


def default_ledger_dir() -> Path:
    """``~/.llm402`` for the current HOME."""
    return Path(DEFAULT_LEDGER_DIR).expanduser()


def default_ledger_url(environ: dict[str, str] | None = None) -> str:
    """``LLM402_LEDGER`` or a SQLite file under ``~/.llm402/``."""
    env = os.environ if environ is None else environ
    return env.get(ENV_LEDGER) or f"sqlite:///{default_ledger_dir() / 'ledger.db'}"


def open_ledger(url: str | None = None, *, clock: Callable[[], float] | None = None) -> Ledger:
    """Open the ledger a URL names."""
    url = url or default_ledger_url()
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryLedger() if clock is None else MemoryLedger(clock)
    if scheme == "sqlite":
        from .sqlite import SqliteLedger

        return SqliteLedger.from_url(url) if clock is None else SqliteLedger.from_url(url, clock=clock)
    if scheme in ("redis", "rediss", "redis+cluster"):
        from .redis import RedisLedger

        return RedisLedger.from_url(url) if clock is None else RedisLedger.from_url(url, clock=clock)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresLedger

        return PostgresLedger.from_url(url) if clock is None else PostgresLedger.from_url(url, clock=clock)
    raise ConfigurationError(
        f"unknown ledger URL scheme {scheme!r} (use memory://, sqlite:///path, redis://host:port/db or "
        "postgresql://user@host:port/dbname)"
    )
