"""`PostgresLedger`: one ledger on a PostgreSQL server, shared by every process and machine that connects to it
(``postgresql://user:password@host:port/dbname``, also ``postgres://``).

Atomicity. Every write that changes money (reserve, grow, expose, settle, recover) is one transaction that first
takes a transaction-level advisory lock of the ledger (``pg_advisory_xact_lock``, keyed by the schema name), then reads
the sums, compares the caps and writes. The lock serializes the ledger's money writes across every connection, as
SQLite's ``BEGIN IMMEDIATE`` does on one machine and a Lua script does on Redis, so committed plus reserved never
exceeds a cap whatever the number of threads, processes or machines (invariant 4). The lock is taken in its own
statement before anything is read: under READ COMMITTED each later statement then sees every money write committed
before the lock was granted. The lock goes with the transaction (commit, rollback, or the server ending a dead
session), so a crashed client cannot keep it; ``lock_timeout`` bounds the wait and
``idle_in_transaction_session_timeout`` frees the lock of a client that hangs inside a transaction.

Why an advisory lock rather than ``SELECT ... FOR UPDATE`` on total rows or SERIALIZABLE: the global cap makes every
reservation touch the global row anyway, so row locks would serialize the same writes while adding lock-order
questions (a reserve's sweep settles other agents' rows); SERIALIZABLE would need retry loops around every write. One
lock, taken first, cannot deadlock and needs no retry. Reads (``totals``, ``receipts``, the spend report) take no
lock: each is one statement, hence one consistent snapshot.

Concurrent writes of one ledger object share one such transaction (and one WAL flush), each under a savepoint
(`group_commit`); none returns before that transaction has committed.

Durability. A reservation is committed before ``reserve`` returns; with the server's default ``synchronous_commit =
on`` the commit waits for the WAL flush, so a reservation survives a crash of the client and of the server before the
request leaves (invariant 3). A session whose ``synchronous_commit`` is ``off`` is switched back to ``on``.

Tables live in one schema, ``llm402`` by default (``?schema=name`` picks another; independent budgets can share a
database). Spent money is in running totals (one row per agent-day, per agent and globally), open reservations in their
own small table, receipts in an append-only table with the columns the spend report groups by and the receipt's JSON
document. ``schema_version`` in the ``meta`` table versions the layout, as ``PRAGMA user_version`` does for SQLite.
"""

# ruff: noqa: S608  (the one name put into SQL text is the schema: matched against _SCHEMA_NAME, then double-quoted)

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import BudgetExceeded, ConfigurationError, ReservationHeld
from ..receipts import Receipt
from .base import (
    TOPUP_SUFFIX,
    Caps,
    Hold,
    LedgerTotals,
    cap_refusal,
    check_spend_group,
    counts_globally,
    dangling_amount,
    ledger_agent,
    order_spend,
    receipt_day,
    receipt_from_json,
    receipt_to_json,
    sql_spend_row,
)
from .group_commit import GroupCommit, Outcome
from .memory import DANGLING, EXPOSED, HELD

PgWrite = Callable[[Any], Any]
"""One money write (a function of the transaction's cursor), run inside a group commit's transaction."""
SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "llm402"
SCHEMES = ("postgresql", "postgres")
MAX_MONEY = 2**63 - 1
"""Amounts are ``bigint``."""
LOCK_TIMEOUT = "30s"
"""How long a write waits for the ledger's lock before failing (SQLite's ``busy_timeout``)."""
IDLE_IN_TRANSACTION_TIMEOUT = "60s"
"""The server ends a session of ours idle inside a transaction this long, releasing the ledger's lock."""
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_DDL = """
CREATE TABLE IF NOT EXISTS {s}.meta (
    id             integer PRIMARY KEY CHECK (id = 1),
    schema_version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.reservations (
    call_id    text PRIMARY KEY,
    agent      text NOT NULL,
    day        text NOT NULL,
    intent     text,
    amount     bigint NOT NULL,
    exposure   bigint NOT NULL DEFAULT 0,
    state      text NOT NULL,
    expires_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_expiry ON {s}.reservations (expires_at);
CREATE TABLE IF NOT EXISTS {s}.spent (
    scope  text NOT NULL,
    agent  text NOT NULL,
    day    text NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (scope, agent, day)
);
CREATE TABLE IF NOT EXISTS {s}.receipts (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    call_id           text NOT NULL,
    started_at        double precision NOT NULL,
    day               text NOT NULL,
    agent             text NOT NULL,
    intent            text,
    model             text,
    cost              bigint NOT NULL,
    saved             bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    data              json NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_by_started ON {s}.receipts (started_at, id);
CREATE INDEX IF NOT EXISTS receipts_by_agent_day ON {s}.receipts (agent, day);
CREATE INDEX IF NOT EXISTS receipts_by_call ON {s}.receipts (call_id)
"""
# ``data`` is ``json`` (the document as written), not ``jsonb``: jsonb refuses ``\\u0000``, which a gateway's error
# text may contain, and a paid call's receipt must never fail to store.

_TOPUP_GLOBAL = TOPUP_SUFFIX
"""The global row of top-ups (kept apart from the consumption row, whose agent key is empty)."""


def _queries(s: str) -> dict[str, str]:
    """Every statement, with the (validated, quoted) schema name in place; parameters are never interpolated."""
    sums = (
        "SELECT "
        f"(SELECT amount FROM {s}.spent WHERE scope = 'day' AND agent = %(agent)s AND day = %(day)s), "
        f"(SELECT amount FROM {s}.spent WHERE scope = 'agent' AND agent = %(agent)s AND day = ''), "
        f"(SELECT amount FROM {s}.spent WHERE scope = 'global' AND agent = '' AND day = ''), "
        "COALESCE(SUM(amount) FILTER (WHERE agent = %(agent)s AND day = %(day)s), 0), "
        "COALESCE(SUM(amount) FILTER (WHERE agent = %(agent)s), 0), "
        f"COALESCE(SUM(amount) FILTER (WHERE agent NOT LIKE '%%{TOPUP_SUFFIX}'), 0){{held}} "
        f"FROM {s}.reservations"
    )
    report = (
        "SELECT {col}, COUNT(*), COALESCE(SUM(cost), 0), COALESCE(SUM(saved), 0), COALESCE(SUM(prompt_tokens), 0), "
        f"COALESCE(SUM(completion_tokens), 0) FROM {s}.receipts WHERE started_at >= %s GROUP BY {{col}}"
    )
    return {
        # the six sums of `LedgerTotals` in one statement (one snapshot), plus whether a call id is open
        "sums": sums.format(held=""),
        "check": sums.format(held=", COALESCE(BOOL_OR(call_id = %(call_id)s), false)"),
        "add_spent": (
            f"INSERT INTO {s}.spent (scope, agent, day, amount) VALUES "
            "('day', %(agent)s, %(day)s, %(amount)s), ('agent', %(agent)s, '', %(amount)s), "
            "('global', %(global)s, '', %(amount)s) "
            "ON CONFLICT (scope, agent, day) DO UPDATE SET amount = spent.amount + excluded.amount"
        ),
        "sweep": f"DELETE FROM {s}.reservations WHERE expires_at <= %s RETURNING agent, day, state, exposure",
        "insert": (
            f"INSERT INTO {s}.reservations (call_id, agent, day, intent, amount, state, expires_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)"
        ),
        "lookup": f"SELECT agent, day, amount, state, exposure FROM {s}.reservations WHERE call_id = %s",
        "grow": f"UPDATE {s}.reservations SET amount = %s WHERE call_id = %s",
        "expose": (
            f"UPDATE {s}.reservations SET state = %s, exposure = GREATEST(exposure, %s), "
            "amount = GREATEST(amount, %s), expires_at = GREATEST(expires_at, %s) WHERE call_id = %s"
        ),
        "dangle": f"UPDATE {s}.reservations SET state = %s, amount = %s, exposure = 0 WHERE call_id = %s",
        "delete": f"DELETE FROM {s}.reservations WHERE call_id = %s",
        "receipt": (
            f"INSERT INTO {s}.receipts (call_id, started_at, day, agent, intent, model, cost, saved, prompt_tokens, "
            "completion_tokens, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ),
        "receipts": f"SELECT data::text FROM {s}.receipts WHERE started_at >= %s ORDER BY started_at, id",
        **{f"report:{col}": report.format(col=col) for col in ("agent", "intent", "model", "day")},
    }


def _money(amount: int) -> int:
    if not 0 <= amount <= MAX_MONEY:
        raise ConfigurationError(f"amount {amount} is outside what the PostgreSQL ledger stores (0..2**63-1)")
    return amount


def _check_schema(schema: str) -> str:
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            f"a PostgreSQL ledger schema is a plain identifier (letters, digits, underscores, up to 63), got {schema!r}"
        )
    return schema


def split_url(url: str) -> tuple[str, str]:
    """``(connection URL for libpq, schema)`` from a ledger URL: ``?schema=`` is the ledger's, every other query
    option (``sslmode``, ``host=/socket/dir``, ...) goes to libpq."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ConfigurationError(f"not a PostgreSQL ledger URL: {parts.scheme}://...")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = _check_schema(next((v for k, v in query if k == "schema"), DEFAULT_SCHEMA))
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, "")), schema


def _lock_key(schema: str) -> int:
    """The advisory lock of one ledger: a signed 64-bit key from its schema name (advisory locks are per database, so
    the same schema in another database is another lock; a hash collision would only serialize two ledgers)."""
    digest = hashlib.blake2b(f"llm402:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresLedger:
    """A ledger in a PostgreSQL schema. Safe across threads (one connection behind a lock, like SQLite) and across
    processes and machines (the advisory-locked transaction of each money write)."""

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        clock: Callable[[], float] = time.time,
        connect_timeout: float = 10.0,
    ) -> None:
        try:
            import psycopg
        except ImportError:  # pragma: no cover - depends on the environment
            raise ConfigurationError("the PostgreSQL ledger needs psycopg 3: pip install 'llm402[postgres]'") from None
        self._psycopg: Any = psycopg
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self.schema = _check_schema(schema)
        self._clock = clock
        self._lock = threading.Lock()
        self._q = _queries(f'"{self.schema}"')
        self._begin = f"BEGIN; SELECT pg_advisory_xact_lock({_lock_key(self.schema)})"
        self._conn: Any = None
        self._group: GroupCommit[PgWrite] = GroupCommit(self._run_batch)
        with self._lock:
            self._connect()
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> PostgresLedger:
        """Connect to ``postgresql://user:password@host:port/dbname`` (or ``postgres://``); ``?schema=name`` picks the
        schema (default ``llm402``, created when missing), other query options go to libpq."""
        conninfo, schema = split_url(url)
        return cls(conninfo, schema=schema, clock=clock)

    def __repr__(self) -> str:
        """Host, port, database and schema; never the user's password."""
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(self._conninfo)
        except Exception:  # a repr never fails
            params = {}
        where = f"{params.get('host', '')}:{params.get('port', '')}/{params.get('dbname', '')}"
        return f"PostgresLedger({where!r}, schema={self.schema!r})"

    # connection and transactions (all under self._lock)
    def _connect(self) -> Any:
        """The connection, opened again when the last one broke (server restart, network): the call that saw it break
        failed, the next one reconnects."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            conn.close()
        conn = self._psycopg.connect(
            self._conninfo,
            autocommit=True,  # transactions are explicit: BEGIN and the lock go in one round trip
            connect_timeout=max(1, round(self._connect_timeout)),
            application_name="llm402",
        )
        try:
            conn.execute(
                f"SET lock_timeout = '{LOCK_TIMEOUT}'; "
                f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'"
            )
            if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
                conn.execute("SET synchronous_commit = on")  # a reservation is durable before the request leaves
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One transaction holding the ledger's advisory lock from its first statement; rolled back on any error."""
        with self._lock:
            conn = self._connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(self._begin)
                    yield cur
                    cur.execute("COMMIT")
            except BaseException:
                self._abort(conn)
                raise

    def _abort(self, conn: Any) -> None:
        """Roll back what a failed write left open; a connection that cannot roll back is dropped (the server then
        ends the transaction and frees the lock)."""
        if conn.closed or conn.broken:
            return
        try:
            if conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        except self._psycopg.Error:
            conn.close()

    def _migrate(self) -> None:
        s = f'"{self.schema}"'
        meta = f"SELECT to_regclass('{s}.meta') IS NOT NULL"
        version_of = f"SELECT schema_version FROM {s}.meta WHERE id = 1"
        with self._lock:
            conn = self._connect()
            if conn.execute(meta).fetchone()[0]:
                row = conn.execute(version_of).fetchone()
                if row is not None and int(row[0]) == SCHEMA_VERSION:
                    return
        with self._write() as cur:  # first use or another layout: decided and done under the ledger's lock
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            row = cur.execute(version_of).fetchone() if cur.execute(meta).fetchone()[0] else None
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"ledger schema {self.schema} has schema version {version}, newer than this llm402 "
                    f"({SCHEMA_VERSION})"
                )
            if version == SCHEMA_VERSION:
                return
            for statement in _DDL.format(s=s).split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute(
                f"INSERT INTO {s}.meta (id, schema_version) VALUES (1, %s) "
                "ON CONFLICT (id) DO UPDATE SET schema_version = excluded.schema_version",
                (SCHEMA_VERSION,),
            )

    # helpers below run inside a write transaction
    def _commit(self, cur: Any, agent: str, day: str, amount: int) -> None:
        if amount:
            cur.execute(
                self._q["add_spent"],
                {
                    "agent": agent,
                    "day": day,
                    "amount": amount,
                    "global": "" if counts_globally(agent) else _TOPUP_GLOBAL,
                },
            )

    def _sweep(self, cur: Any, now: float) -> int:
        """Resolve expired reservations: a signed payment counts as spent (it may have settled), the rest go."""
        expired = cur.execute(self._q["sweep"], (now,)).fetchall()
        for agent, day, state, exposure in expired:
            if state == EXPOSED:
                self._commit(cur, agent, day, int(exposure))
        return len(expired)

    def _check(self, cur: Any, agent: str, day: str, extra: int, caps: Caps, call_id: str | None = None) -> None:
        """Raise `ReservationHeld` when ``call_id`` is open, `BudgetExceeded` when ``extra`` breaks a cap."""
        row = cur.execute(self._q["check"], {"agent": agent, "day": day, "call_id": call_id or ""}).fetchone()
        day_s, agent_s, global_s, day_r, agent_r, global_r, held = row
        if call_id is not None and held:
            raise ReservationHeld(f"call {call_id} already holds a reservation")
        checks = (
            ("daily", caps.daily, day_s, day_r),
            ("total", caps.total, agent_s, agent_r),
            ("global", caps.global_, global_s, global_r),
        )
        for name, cap, spent, reserved in checks:
            if cap is not None and int(spent or 0) + int(reserved) + extra > cap:
                raise cap_refusal(name, cap, int(spent or 0), int(reserved), extra)

    def _insert_receipt(self, cur: Any, receipt: Receipt) -> None:
        cur.execute(
            self._q["receipt"],
            (
                receipt.call_id,
                receipt.started_at,
                receipt_day(receipt.started_at),
                ledger_agent(receipt),
                receipt.intent,
                receipt.model,
                receipt.cost,
                receipt.saved or 0,
                receipt.prompt_tokens,
                receipt.completion_tokens,
                receipt_to_json(receipt),
            ),
        )

    def _run_batch(self, writes: Sequence[PgWrite]) -> list[Outcome]:
        """Run the writes of a group commit in one advisory-locked transaction, each under a savepoint (a write alone
        needs none: its failure rolls the transaction back)."""
        if len(writes) == 1:
            with self._write() as cur:
                return [Outcome(writes[0](cur))]
        outcomes = []
        with self._write() as cur:
            for write in writes:
                cur.execute("SAVEPOINT write")
                try:
                    outcomes.append(Outcome(write(cur)))
                except Exception as exc:  # a broken connection fails the ROLLBACK TO, hence the whole batch
                    cur.execute("ROLLBACK TO SAVEPOINT write")
                    outcomes.append(Outcome(error=exc))
                cur.execute("RELEASE SAVEPOINT write")
        return outcomes

    # the Ledger protocol: every money write goes through the group commit (one transaction, one WAL flush per batch)
    def reserve(self, hold: Hold, caps: Caps) -> None:
        """Sweep expired reservations, check every cap and reserve, in one advisory-locked transaction.

        A refusal writes no reservation, but the sweep is kept (committed), as in the other backends."""
        if hold.amount < 0:
            raise ConfigurationError("a reservation cannot be negative")
        _money(hold.amount)
        now = float(self._clock())
        refusal = self._group.run(lambda cur: self._reserve(cur, hold, caps, now))
        if refusal is not None:
            raise refusal

    def _reserve(self, cur: Any, hold: Hold, caps: Caps, now: float) -> Exception | None:
        self._sweep(cur, now)
        try:
            self._check(cur, hold.agent, hold.day, hold.amount, caps, hold.call_id)
        except (ConfigurationError, BudgetExceeded) as exc:
            return exc  # returned, not raised: the sweep above stays committed
        cur.execute(
            self._q["insert"], (hold.call_id, hold.agent, hold.day, hold.intent, hold.amount, HELD, hold.expires_at)
        )
        return None

    def grow(self, call_id: str, amount: int, caps: Caps) -> None:
        """Raise a reservation under the caps (same transaction shape as `reserve`)."""
        _money(amount)
        self._group.run(lambda cur: self._grow(cur, call_id, amount, caps))

    def _grow(self, cur: Any, call_id: str, amount: int, caps: Caps) -> None:
        row = cur.execute(self._q["lookup"], (call_id,)).fetchone()
        if row is None:
            raise KeyError(call_id)
        agent, day, current, _, _ = row
        if amount > current:
            self._check(cur, agent, day, amount - int(current), caps)
            cur.execute(self._q["grow"], (amount, call_id))

    def expose(self, call_id: str, amount: int, valid_before: float) -> None:
        """Mark a signed payment as outstanding until ``valid_before`` (no cap check: it is already signed)."""
        _money(amount)
        self._group.run(lambda cur: self._expose(cur, call_id, amount, valid_before))

    def _expose(self, cur: Any, call_id: str, amount: int, valid_before: float) -> None:
        cur.execute(self._q["expose"], (EXPOSED, amount, amount, valid_before, call_id))
        if cur.rowcount == 0:
            raise KeyError(call_id)

    def settle(self, call_id: str, actual: int, receipt: Receipt | None, outstanding: int | None = None) -> None:
        """Commit ``actual`` and store the receipt; an unsettled authorization's remainder dangles until it expires."""
        _money(actual)
        self._group.run(lambda cur: self._settle(cur, call_id, actual, receipt, outstanding))

    def _settle(self, cur: Any, call_id: str, actual: int, receipt: Receipt | None, outstanding: int | None) -> None:
        row = cur.execute(self._q["lookup"], (call_id,)).fetchone()
        if row is not None:
            agent, day, _, state, exposure = row
            self._commit(cur, agent, day, actual)
            left = dangling_amount(int(exposure), actual, outstanding)
            if state == EXPOSED and left > 0:
                cur.execute(self._q["dangle"], (DANGLING, left, call_id))
            else:
                cur.execute(self._q["delete"], (call_id,))
        elif receipt is not None:  # swept while the call ran: what it cost is still spent
            self._commit(cur, ledger_agent(receipt), receipt_day(receipt.started_at), actual)
        if receipt is not None:
            self._insert_receipt(cur, receipt)

    def record(self, receipt: Receipt) -> None:
        """Store a receipt of a call that reserved nothing (one statement: its own transaction, no lock needed)."""
        with self._lock, self._connect().cursor() as cur:
            self._insert_receipt(cur, receipt)

    def recover(self, now: float) -> int:
        """Resolve reservations expired at ``now`` (left by crashed processes)."""
        resolved: int = self._group.run(lambda cur: self._sweep(cur, now))
        return resolved

    def _read(self, query: str, params: Any) -> list[Any]:
        with self._lock:
            rows: list[Any] = self._connect().execute(query, params).fetchall()
        return rows

    def totals(self, agent: str, day: str) -> LedgerTotals:
        """Spent and reserved sums, read in one statement (one snapshot)."""
        ((day_s, agent_s, global_s, day_r, agent_r, global_r),) = self._read(
            self._q["sums"], {"agent": agent, "day": day}
        )
        return LedgerTotals(
            int(day_s or 0), int(day_r), int(agent_s or 0), int(agent_r), int(global_s or 0), int(global_r)
        )

    def receipts(self, since: float | None = None) -> Sequence[Receipt]:
        """Receipts started at or after ``since``, oldest first (by ``started_at``, then by insertion)."""
        rows = self._read(self._q["receipts"], (float("-inf") if since is None else since,))
        return [receipt_from_json(data) for (data,) in rows]

    def spend_report(self, by: str, since: float | None = None) -> list[dict[str, Any]]:
        """Receipts grouped by agent, intent, model or day, summed in SQL."""
        rows = self._read(self._q["report:" + check_spend_group(by)], (float("-inf") if since is None else since,))
        return order_spend(map(sql_spend_row, rows), by)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
