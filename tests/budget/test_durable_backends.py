"""What only the durable backends promise: URLs, file permissions, indexes (SQLite); one hash slot, namespaces (Redis);
schemas, versions, the lock, reconnection (PostgreSQL)."""

from __future__ import annotations

import sqlite3
import stat
import threading
import uuid
from pathlib import Path

import pytest
from ledger_support import T0, Clock, with_query

from llm402.budget import Caps, Hold, LedgerTotals, open_ledger
from llm402.budget.base import receipt_day
from llm402.budget.postgres import PostgresLedger, split_url
from llm402.budget.redis import RedisLedger
from llm402.budget.sqlite import SqliteLedger, path_from_url
from llm402.errors import BudgetExceeded, ConfigurationError
from llm402.receipts import Receipt

DAY = receipt_day(T0)


def test_open_ledger_picks_the_backend(tmp_path: Path, redis_server: str, postgres_server: str) -> None:
    sqlite_ledger = open_ledger(f"sqlite:///{tmp_path}/a.db")
    redis_ledger = open_ledger(f"{redis_server}?namespace=pick")
    postgres_ledger = open_ledger(with_query(postgres_server, schema="pick"))
    short_scheme = open_ledger(with_query(postgres_server.replace("postgresql://", "postgres://", 1), schema="pick"))
    assert isinstance(sqlite_ledger, SqliteLedger)
    assert isinstance(redis_ledger, RedisLedger)
    assert isinstance(postgres_ledger, PostgresLedger)
    assert isinstance(short_scheme, PostgresLedger)
    assert redis_ledger.namespace == "pick"
    assert postgres_ledger.schema == short_scheme.schema == "pick"
    for opened in (sqlite_ledger, redis_ledger, postgres_ledger, short_scheme):
        opened.close()
    with pytest.raises(ConfigurationError, match="postgresql://"):
        open_ledger("mysql://x/y")


# --- SQLite ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///tmp/x/ledger.db", "/tmp/x/ledger.db"),
        ("sqlite:////tmp/x/ledger.db", "/tmp/x/ledger.db"),  # what default_ledger_url() writes
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite:///tmp/with%20space.db", "/tmp/with space.db"),
    ],
)
def test_sqlite_url_paths(url: str, path: str) -> None:
    assert path_from_url(url) == path


def test_sqlite_url_home_and_bad_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert path_from_url("sqlite:///~/.llm402/ledger.db") == f"{tmp_path}/.llm402/ledger.db"
    for bad in ("sqlite://", "sqlite:///", "sqlite://host/x.db", "redis://x"):
        with pytest.raises(ConfigurationError):
            path_from_url(bad)


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "dir"
    directory.mkdir(parents=True)  # a ledger's folder must exist: only ~/.llm402 is created (test_ledger_paths.py)
    ledger = SqliteLedger.from_url(f"sqlite:///{directory}/ledger.db")
    assert stat.S_IMODE((directory / "ledger.db").stat().st_mode) == 0o600
    ledger.close()
    with sqlite3.connect(directory / "ledger.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_reserve_never_reads_receipts_and_lookups_use_indexes(tmp_path: Path) -> None:
    """Reserve stays O(open reservations) however many receipts accumulate; the receipt queries use indexes."""
    ledger = SqliteLedger(tmp_path / "l.db", clock=Clock())
    statements: list[str] = []
    ledger._conn.set_trace_callback(statements.append)
    ledger.reserve(Hold("c1", "a", DAY, 10, T0 + 60), Caps(daily=100, total=100, global_=100))
    ledger.grow("c1", 20, Caps(daily=100, total=100, global_=100))
    ledger._conn.set_trace_callback(None)
    assert statements and not any("receipts" in s for s in statements)

    def plan(sql: str, *args: object) -> str:
        return " ".join(row[-1] for row in ledger._conn.execute("EXPLAIN QUERY PLAN " + sql, args))

    assert "reservations_by_expiry" in plan("SELECT agent FROM reservations WHERE expires_at <= ?", T0)
    assert "receipts_by_started" in plan("SELECT data FROM receipts WHERE started_at >= ? ORDER BY started_at, id", T0)
    ledger.close()


def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    first = open_ledger(url, clock=Clock())
    first.reserve(Hold("c1", "a", DAY, 300, T0 + 60), Caps())
    first.reserve(Hold("c2", "a", DAY, 200, T0 + 60), Caps())
    first.settle("c2", 150, None)
    first.close()
    second = open_ledger(url, clock=Clock())
    assert second.totals("a", DAY) == LedgerTotals(150, 300, 150, 300, 150, 300)
    second.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigurationError, match="schema version 99"):
        SqliteLedger(path)


# --- Redis ----------------------------------------------------------------------------------------------------------


def test_redis_keys_of_a_namespace_share_one_slot(redis_server: str) -> None:
    """Cluster safety: every key the scripts touch (agents, days, reservations, receipts) hashes to one slot."""
    import redis
    from redis.crc import key_slot

    ledger = RedisLedger.from_url(f"{redis_server}?namespace=slots", clock=Clock())
    caps = Caps(daily=10_000, total=10_000, global_=10_000)
    for i, agent in enumerate(["alice", "bob:{x}", "ça"]):
        ledger.reserve(Hold(f"c{i}", agent, DAY, 100, T0 + 60), caps)
        ledger.expose(f"c{i}", 100, T0 + 30)
    ledger.settle("c0", 0, None)  # leaves a dangling reservation
    ledger.record(Receipt("r", "alice", None, "gw", "POST", "/v1/chat/completions", None, 200, False, T0, 1.0, cost=5))
    client = redis.Redis.from_url(redis_server)
    keys = list(client.scan_iter(match="{slots}:*"))
    client.close()
    assert len(keys) >= 6
    assert {key_slot(k) for k in keys} == {key_slot(b"{slots}")}
    ledger.close()


def test_redis_namespaces_are_independent(redis_server: str) -> None:
    first = RedisLedger.from_url(f"{redis_server}?namespace=ns-a", clock=Clock())
    second = RedisLedger.from_url(f"{redis_server}?namespace=ns-b", clock=Clock())
    first.reserve(Hold("c1", "a", DAY, 900, T0 + 60), Caps(global_=1_000))
    second.reserve(Hold("c1", "a", DAY, 900, T0 + 60), Caps(global_=1_000))  # same call id, other budget
    with pytest.raises(BudgetExceeded):
        first.reserve(Hold("c2", "b", DAY, 101, T0 + 60), Caps(global_=1_000))
    first.close()
    second.close()


def test_redis_rejects_a_namespace_with_braces(redis_server: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisLedger.from_url(f"{redis_server}?namespace=a{{b}}")


# --- PostgreSQL -----------------------------------------------------------------------------------------------------


@pytest.fixture
def pg_url(postgres_server: str) -> str:
    return with_query(postgres_server, schema=f"durable_{uuid.uuid4().hex[:12]}")


def test_postgres_urls() -> None:
    assert split_url("postgresql://u:pw@db.example:5433/budget?schema=team_a&sslmode=require") == (
        "postgresql://u:pw@db.example:5433/budget?sslmode=require",
        "team_a",
    )
    assert split_url("postgres://u@/budget?host=/run/pg")[1] == "llm402"
    for bad in (
        "postgresql://h/db?schema=a-b",
        "postgresql://h/db?schema=",
        'postgresql://h/db?schema=x"y',
        "redis://x",
    ):
        with pytest.raises(ConfigurationError):
            split_url(bad)


def test_postgres_repr_hides_the_password(pg_url: str) -> None:
    url = pg_url.replace("postgres@", "postgres:hunter2secret@", 1)  # trust authentication ignores the password
    ledger = PostgresLedger.from_url(url)
    assert "hunter2secret" not in repr(ledger)
    assert "127.0.0.1" in repr(ledger) or "postgres" in repr(ledger)
    ledger.close()


def test_postgres_state_survives_reopening_and_schemas_are_independent(pg_url: str) -> None:
    first = open_ledger(pg_url, clock=Clock())
    first.reserve(Hold("c1", "a", DAY, 300, T0 + 60), Caps())
    first.reserve(Hold("c2", "a", DAY, 200, T0 + 60), Caps())
    first.settle("c2", 150, None)
    first.close()
    second = open_ledger(pg_url, clock=Clock())
    assert second.totals("a", DAY) == LedgerTotals(150, 300, 150, 300, 150, 300)
    other = open_ledger(pg_url.replace("schema=durable_", "schema=other_"), clock=Clock())
    assert other.totals("a", DAY) == LedgerTotals(0, 0, 0, 0, 0, 0)
    other.reserve(Hold("c1", "a", DAY, 900, T0 + 60), Caps(global_=1_000))  # same call id, other budget
    second.close()
    other.close()


def test_postgres_refuses_a_newer_schema_version(pg_url: str) -> None:
    ledger = PostgresLedger.from_url(pg_url)
    schema = ledger.schema
    ledger._conn.execute(f'UPDATE "{schema}".meta SET schema_version = 99')
    ledger.close()
    with pytest.raises(ConfigurationError, match="schema version 99"):
        PostgresLedger.from_url(pg_url)


def test_postgres_receipt_with_a_nul_escape_is_stored(pg_url: str) -> None:
    """A gateway's error text may hold U+0000; a ``jsonb`` column would refuse it and lose a paid call's receipt."""
    ledger = open_ledger(pg_url, clock=Clock())
    odd = Receipt("r", "alice", None, "gw", "POST", "/v1/chat/completions", None, 502, False, T0, 1.0, error="a\x00b")
    ledger.record(odd)
    assert list(ledger.receipts()) == [odd]
    ledger.close()


def test_postgres_reserve_waits_for_the_ledger_lock(pg_url: str) -> None:
    """The advisory lock serializes money writes: a reserve waits while another session holds it, then sees what that
    session committed (so two reserves can never both read the same free room)."""
    import psycopg

    from llm402.budget.postgres import _lock_key

    ledger = PostgresLedger.from_url(pg_url, clock=Clock())
    caps = Caps(daily=1_000)
    other = psycopg.connect(pg_url.split("?", maxsplit=1)[0], autocommit=True)
    other.execute("BEGIN")
    other.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(ledger.schema),))
    other.execute(
        f'INSERT INTO "{ledger.schema}".reservations (call_id, agent, day, amount, state, expires_at) '
        "VALUES ('rival', 'alice', %s, 700, 'held', %s)",
        (DAY, T0 + 60),
    )
    outcome: list[object] = []
    worker = threading.Thread(
        target=lambda: outcome.append(_try_reserve(ledger, Hold("mine", "alice", DAY, 400, T0 + 60), caps))
    )
    worker.start()
    worker.join(0.5)
    assert worker.is_alive(), "the reserve must wait for the lock"
    other.execute("COMMIT")
    worker.join(10)
    assert outcome == ["refused"], "after the lock, the rival's 700 is seen: 400 more would break the cap"
    other.close()
    ledger.close()


def _try_reserve(ledger: PostgresLedger, hold: Hold, caps: Caps) -> str:
    try:
        ledger.reserve(hold, caps)
    except BudgetExceeded:
        return "refused"
    return "reserved"


def test_postgres_reconnects_after_the_server_drops_the_session(pg_url: str) -> None:
    import psycopg

    ledger = PostgresLedger.from_url(pg_url, clock=Clock())
    ledger.reserve(Hold("c1", "a", DAY, 100, T0 + 60), Caps())
    pid = ledger._conn.info.backend_pid
    with psycopg.connect(pg_url.split("?", maxsplit=1)[0], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        ledger.reserve(Hold("c2", "a", DAY, 100, T0 + 60), Caps())  # the call that meets the dead session fails
    ledger.reserve(Hold("c2", "a", DAY, 100, T0 + 60), Caps())  # the next one reconnects
    assert ledger.totals("a", DAY).day_reserved == 200
    ledger.close()


def test_receipt_json_is_the_to_dict_document() -> None:
    import json

    from llm402.budget.base import receipt_from_json, receipt_to_json
    from llm402.receipts import PaymentRecord

    paid = Receipt(
        "c1",
        "alice",
        "judging",
        "gw",
        "POST",
        "/v1/chat/completions",
        "m",
        200,
        True,
        T0,
        3.5,
        cost=7,
        payment=PaymentRecord("exact", "eip155:8453", "0xasset", 7, "0xpayer", "0xpayee", "0xtx", True),
        attempts=({"route": "r1", "status": 402, "nested": {"a": [1, 2]}},),
    )
    assert json.loads(receipt_to_json(paid)) == json.loads(json.dumps(paid.to_dict()))
    assert receipt_from_json(receipt_to_json(paid)) == paid
    newer = json.loads(receipt_to_json(paid)) | {"field_from_the_future": 1}
    assert receipt_from_json(json.dumps(newer)) == paid
