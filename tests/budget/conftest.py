"""Fixtures for the ledger contract: a real Redis-compatible server and a real PostgreSQL server on free loopback ports
(``redis_server`` and ``postgres_server``, from tests/conftest.py), a settable clock, and one ledger per backend
(memory, a SQLite file, a Redis namespace, a PostgreSQL schema)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_support import Clock, with_query

from llm402.budget import Ledger, open_ledger

BACKENDS = ("memory", "sqlite", "redis", "postgres")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def url_for(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh ledger URL: a new file, or a new Redis namespace or PostgreSQL schema on the session's server (started
    on first use)."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        folder = tmp_path / "ledgers"  # a ledger's folder must exist: llm402 creates only ~/.llm402
        folder.mkdir(exist_ok=True)
        return f"sqlite:///{folder}/ledger.db"
    if backend == "postgres":
        return with_query(request.getfixturevalue("postgres_server"), schema=f"test_{uuid.uuid4().hex[:12]}")
    server = request.getfixturevalue("redis_server")
    return f"{server}?namespace=test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger URL other processes can open too (indirectly parametrized with one of sqlite, redis, postgres)."""
    return url_for(str(request.param), tmp_path, request)


@pytest.fixture
def ledger_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return url_for(backend, tmp_path, request)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(ledger_url: str, clock: Clock) -> Iterator[Ledger]:
    opened = open_ledger(ledger_url, clock=clock)
    yield opened
    opened.close()
