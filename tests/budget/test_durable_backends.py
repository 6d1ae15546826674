"""What only the durable backends promise: URLs, file permissions, indexes (SQLite); one hash slot, namespaces (Redis)."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
from ledger_support import T0, Clock

from llm402.budget import Caps, Hold, LedgerTotals, open_ledger
from llm402.budget.base import receipt_day
from llm402.budget.redis import RedisLedger
from llm402.budget.sqlite import SqliteLedger, path_from_url
from llm402.errors import BudgetExceeded, ConfigurationError
from llm402.receipts import Receipt

DAY = receipt_day(T0)


def test_open_ledger_picks_the_backend(tmp_path: Path, redis_server: str) -> None:
    sqlite_ledger = open_ledger(f"sqlite:///{tmp_path}/a.db")
    redis_ledger = open_ledger(f"{redis_server}?namespace=pick")
    assert isinstance(sqlite_ledger, SqliteLedger)
    assert isinstance(redis_ledger, RedisLedger)
    assert redis_ledger.namespace == "pick"
    sqlite_ledger.close()
    redis_ledger.close()


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
