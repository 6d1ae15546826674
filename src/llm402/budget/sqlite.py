"""`SqliteLedger`: the default ledger, one file shared by every process and thread on a machine.

Each write runs in a ``BEGIN IMMEDIATE`` transaction: SQLite takes the database's write lock at ``BEGIN``, so the
sums read, the caps compared and the row written form one atomic check-and-reserve across processes, and a refused
reservation writes nothing. Writes of this process's threads that arrive together share one transaction and one
fsync, each under its own savepoint (`group_commit`); none returns before that transaction has committed. WAL mode
lets readers (``totals``, ``receipts``, the CLI) run beside a writer; ``busy_timeout`` makes a writer wait for the
lock instead of failing. ``synchronous=FULL`` by default, so a reservation survives a power cut, not only a crash,
before the request leaves (invariant 3).

Spent money lives in running totals (one row per agent-day, per agent and globally) and open reservations in their
own small table, so a reserve reads a handful of rows whatever the number of receipts; receipts are an append-only
table with the columns the spend report groups by.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

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
from .urls import DEFAULT_LEDGER_DIR, default_ledger_dir

SqlWrite = Callable[[sqlite3.Connection], Any]
"""One money write, run inside a group commit's transaction."""
SCHEMA_VERSION = 1
MEMORY = ":memory:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    call_id    TEXT PRIMARY KEY,
    agent      TEXT NOT NULL,
    day        TEXT NOT NULL,
    intent     TEXT,
    amount     INTEGER NOT NULL,
    exposure   INTEGER NOT NULL DEFAULT 0,
    state      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_expiry ON reservations (expires_at);
CREATE TABLE IF NOT EXISTS spent (
    scope  TEXT NOT NULL,
    agent  TEXT NOT NULL,
    day    TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (scope, agent, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts (
    id                INTEGER PRIMARY KEY,
    call_id           TEXT NOT NULL,
    started_at        REAL NOT NULL,
    day               TEXT NOT NULL,
    agent             TEXT NOT NULL,
    intent            TEXT,
    model             TEXT,
    cost              INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    data              TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_by_started ON receipts (started_at);
CREATE INDEX IF NOT EXISTS receipts_by_agent_day ON receipts (agent, day);
CREATE INDEX IF NOT EXISTS receipts_by_call ON receipts (call_id);
"""

# Spent totals: scope 'day' keys (agent, day), 'agent' keys (agent, ''), 'global' keys ('', '').
_ADD_SPENT = (
    "INSERT INTO spent (scope, agent, day, amount) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (scope, agent, day) DO UPDATE SET amount = amount + excluded.amount"
)
_SPENT = "SELECT amount FROM spent WHERE scope = ? AND agent = ? AND day = ?"
_RESERVED = (
    "SELECT COALESCE(SUM(CASE WHEN agent = ? AND day = ? THEN amount END), 0), "
    "COALESCE(SUM(CASE WHEN agent = ? THEN amount END), 0), "
    "COALESCE(SUM(CASE WHEN agent NOT LIKE ? THEN amount END), 0) FROM reservations"
)
_TOPUP_GLOBAL = TOPUP_SUFFIX
"""The global row of top-ups (kept apart from the consumption row, whose agent key is empty)."""
# One constant query per grouping: the column name is never interpolated from input.
_REPORT_SELECT = (
    "SELECT {col}, COUNT(*), COALESCE(SUM(cost), 0), COALESCE(SUM(json_extract(data, '$.saved')), 0), "
    "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) FROM receipts WHERE started_at >= ? "
    "GROUP BY {col}"
)
_REPORTS = {col: _REPORT_SELECT.format(col=col) for col in ("agent", "intent", "model", "day")}


def path_from_url(url: str) -> str:
    """The file a ``sqlite:///`` URL names: ``sqlite:////abs/path``, ``sqlite:///abs/path``, ``sqlite:///~/path``
    or ``sqlite:///:memory:``."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite ledger URL: {parts.scheme}://...")
    if parts.netloc not in ("", "localhost"):
        raise ConfigurationError("a sqlite ledger URL has no host: use sqlite:///absolute/path or sqlite:///~/path")
    path = unquote(parts.path)
    if path in ("", "/"):
        raise ConfigurationError("the sqlite ledger URL names no file: use sqlite:///absolute/path")
    if path == "/" + MEMORY:
        return MEMORY
    if path.startswith("/~"):
        return str(Path(path[1:]).expanduser())
    return "/" + path.lstrip("/")


class SqliteLedger:
    """A ledger in one SQLite file (``sqlite:///path``). Safe across threads (one connection behind a lock) and
    processes (``BEGIN IMMEDIATE`` transactions)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
        synchronous: str = "FULL",
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"unknown SQLite synchronous mode {synchronous!r}")
        self.path = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        if self.path != MEMORY:
            _prepare_file(Path(self.path))
        # One connection behind a lock: threads of one process queue on the lock (cheap) rather than on SQLite's
        # busy handler (sleeps); processes queue on the busy handler.
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if self.path != MEMORY:
                _use_wal(self._conn, busy_timeout)
            self._conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise
        self._group: GroupCommit[SqlWrite] = GroupCommit(self._run_batch)

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> SqliteLedger:
        """Open the file a ``sqlite:///`` URL names. Its folder must exist, except the default ``~/.llm402``,
        which is created private to the user. ``?synchronous=NORMAL`` trades the power-cut durability of
        ``FULL`` (the default) for speed: a commit then survives a crash of the process, not of the machine."""
        query = dict(parse_qsl(urlsplit(url).query))
        unknown = set(query) - {"synchronous"}
        if unknown:
            raise ConfigurationError(f"unknown sqlite ledger URL option(s): {', '.join(sorted(unknown))}")
        return cls(path_from_url(url), clock=clock, synchronous=query.get("synchronous", "FULL"))

    def __repr__(self) -> str:
        return f"SqliteLedger({self.path!r})"

    def _migrate(self) -> None:
        with self._write() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"ledger {self.path} has schema version {version}, newer than this llm402 ({SCHEMA_VERSION})"
                )
            for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT this transaction
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from the start; rolled back on any error."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _run_batch(self, writes: Sequence[SqlWrite]) -> list[Outcome]:
        """Run the writes of a group commit in one ``BEGIN IMMEDIATE`` transaction, each under a savepoint (a write
        alone needs none: its failure rolls the transaction back)."""
        if len(writes) == 1:
            with self._write() as conn:
                return [Outcome(writes[0](conn))]
        outcomes = []
        with self._write() as conn:
            for write in writes:
                conn.execute("SAVEPOINT write")
                try:
                    outcomes.append(Outcome(write(conn)))
                except Exception as exc:
                    if not conn.in_transaction:  # SQLite rolled the whole transaction back (I/O error, disk full)
                        raise
                    conn.execute("ROLLBACK TO write")
                    outcomes.append(Outcome(error=exc))
                conn.execute("RELEASE write")
        return outcomes

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot across several SELECTs."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    # helpers below run inside a transaction
    @staticmethod
    def _commit(conn: sqlite3.Connection, agent: str, day: str, amount: int) -> None:
        if amount:
            conn.executemany(
                _ADD_SPENT,
                (
                    ("day", agent, day, amount),
                    ("agent", agent, "", amount),
                    ("global", "" if counts_globally(agent) else _TOPUP_GLOBAL, "", amount),
                ),
            )

    @staticmethod
    def _spent(conn: sqlite3.Connection, agent: str, day: str) -> tuple[int, int, int]:
        def one(scope: str, a: str, d: str) -> int:
            row = conn.execute(_SPENT, (scope, a, d)).fetchone()
            return int(row[0]) if row else 0

        return one("day", agent, day), one("agent", agent, ""), one("global", "", "")

    @staticmethod
    def _reserved(conn: sqlite3.Connection, agent: str, day: str) -> tuple[int, int, int]:
        day_r, agent_r, global_r = conn.execute(_RESERVED, (agent, day, agent, "%" + TOPUP_SUFFIX)).fetchone()
        return int(day_r), int(agent_r), int(global_r)

    def _check(self, conn: sqlite3.Connection, agent: str, day: str, extra: int, caps: Caps) -> None:
        if caps.daily is None and caps.total is None and caps.global_ is None:
            return
        day_s, agent_s, global_s = self._spent(conn, agent, day)
        day_r, agent_r, global_r = self._reserved(conn, agent, day)
        checks = (
            ("daily", caps.daily, day_s, day_r),
            ("total", caps.total, agent_s, agent_r),
            ("global", caps.global_, global_s, global_r),
        )
        for name, cap, spent, reserved in checks:
            if cap is not None and spent + reserved + extra > cap:
                raise cap_refusal(name, cap, spent, reserved, extra)

    def _sweep(self, conn: sqlite3.Connection, now: float) -> int:
        """Resolve expired reservations: a signed payment counts as spent (it may have settled), the rest go."""
        expired = conn.execute(
            "SELECT agent, day, state, exposure FROM reservations WHERE expires_at <= ?", (now,)
        ).fetchall()
        if not expired:
            return 0
        for agent, day, state, exposure in expired:
            if state == EXPOSED:
                self._commit(conn, agent, day, int(exposure))
        conn.execute("DELETE FROM reservations WHERE expires_at <= ?", (now,))
        return len(expired)

    @staticmethod
    def _insert_receipt(conn: sqlite3.Connection, receipt: Receipt) -> None:
        conn.execute(
            "INSERT INTO receipts (call_id, started_at, day, agent, intent, model, cost, prompt_tokens, "
            "completion_tokens, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                receipt.call_id,
                receipt.started_at,
                receipt_day(receipt.started_at),
                ledger_agent(receipt),
                receipt.intent,
                receipt.model,
                receipt.cost,
                receipt.prompt_tokens,
                receipt.completion_tokens,
                receipt_to_json(receipt),
            ),
        )

    # the Ledger protocol: every write goes through the group commit (one transaction and one fsync per batch)
    def reserve(self, hold: Hold, caps: Caps) -> None:
        """Sweep expired reservations, check every cap and reserve, in one ``BEGIN IMMEDIATE`` transaction.

        A refusal writes no reservation, but the sweep is kept (committed), as in the other backends."""
        if hold.amount < 0:
            raise ConfigurationError("a reservation cannot be negative")
        now = float(self._clock())
        refusal = self._group.run(lambda conn: self._reserve(conn, hold, caps, now))
        if refusal is not None:
            raise refusal

    def _reserve(self, conn: sqlite3.Connection, hold: Hold, caps: Caps, now: float) -> Exception | None:
        self._sweep(conn, now)
        try:
            if conn.execute("SELECT 1 FROM reservations WHERE call_id = ?", (hold.call_id,)).fetchone():
                raise ReservationHeld(f"call {hold.call_id} already holds a reservation")
            self._check(conn, hold.agent, hold.day, hold.amount, caps)
        except (ConfigurationError, BudgetExceeded) as exc:
            return exc  # returned, not raised: the sweep above stays committed
        conn.execute(
            "INSERT INTO reservations (call_id, agent, day, intent, amount, state, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (hold.call_id, hold.agent, hold.day, hold.intent, hold.amount, HELD, hold.expires_at),
        )
        return None

    def grow(self, call_id: str, amount: int, caps: Caps) -> None:
        """Raise a reservation under the caps (same transaction shape as `reserve`)."""
        self._group.run(lambda conn: self._grow(conn, call_id, amount, caps))

    def _grow(self, conn: sqlite3.Connection, call_id: str, amount: int, caps: Caps) -> None:
        row = conn.execute("SELECT agent, day, amount FROM reservations WHERE call_id = ?", (call_id,)).fetchone()
        if row is None:
            raise KeyError(call_id)
        agent, day, current = row
        if amount > current:
            self._check(conn, agent, day, amount - int(current), caps)
            conn.execute("UPDATE reservations SET amount = ? WHERE call_id = ?", (amount, call_id))

    def expose(self, call_id: str, amount: int, valid_before: float) -> None:
        """Mark a signed payment as outstanding until ``valid_before`` (no cap check: it is already signed)."""
        self._group.run(lambda conn: self._expose(conn, call_id, amount, valid_before))

    @staticmethod
    def _expose(conn: sqlite3.Connection, call_id: str, amount: int, valid_before: float) -> None:
        cursor = conn.execute(
            "UPDATE reservations SET state = ?, exposure = MAX(exposure, ?), amount = MAX(amount, ?), "
            "expires_at = MAX(expires_at, ?) WHERE call_id = ?",
            (EXPOSED, amount, amount, valid_before, call_id),
        )
        if cursor.rowcount == 0:
            raise KeyError(call_id)

    def settle(self, call_id: str, actual: int, receipt: Receipt | None, outstanding: int | None = None) -> None:
        """Commit ``actual`` and store the receipt; an unsettled authorization's remainder dangles until it expires."""
        self._group.run(lambda conn: self._settle(conn, call_id, actual, receipt, outstanding))

    def _settle(
        self, conn: sqlite3.Connection, call_id: str, actual: int, receipt: Receipt | None, outstanding: int | None
    ) -> None:
        row = conn.execute(
            "SELECT agent, day, state, exposure FROM reservations WHERE call_id = ?", (call_id,)
        ).fetchone()
        if row is not None:
            agent, day, state, exposure = row
            self._commit(conn, agent, day, actual)
            left = dangling_amount(int(exposure), actual, outstanding)
            if state == EXPOSED and left > 0:
                conn.execute(
                    "UPDATE reservations SET state = ?, amount = ?, exposure = 0 WHERE call_id = ?",
                    (DANGLING, left, call_id),
                )
            else:
                conn.execute("DELETE FROM reservations WHERE call_id = ?", (call_id,))
        elif receipt is not None:  # swept while the call ran: what it cost is still spent
            self._commit(conn, ledger_agent(receipt), receipt_day(receipt.started_at), actual)
        if receipt is not None:
            self._insert_receipt(conn, receipt)

    def record(self, receipt: Receipt) -> None:
        """Store a receipt of a call that reserved nothing."""
        self._group.run(lambda conn: self._insert_receipt(conn, receipt))

    def recover(self, now: float) -> int:
        """Resolve reservations expired at ``now`` (left by crashed processes)."""
        resolved: int = self._group.run(lambda conn: self._sweep(conn, now))
        return resolved

    def totals(self, agent: str, day: str) -> LedgerTotals:
        """Spent and reserved sums, read in one snapshot."""
        with self._read() as conn:
            day_s, agent_s, global_s = self._spent(conn, agent, day)
            day_r, agent_r, global_r = self._reserved(conn, agent, day)
        return LedgerTotals(day_s, day_r, agent_s, agent_r, global_s, global_r)

    def receipts(self, since: float | None = None) -> Sequence[Receipt]:
        """Receipts started at or after ``since``, oldest first (by ``started_at``, then by insertion)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT data FROM receipts WHERE started_at >= ? ORDER BY started_at, id",
                (float("-inf") if since is None else since,),
            ).fetchall()
        return [receipt_from_json(data) for (data,) in rows]

    def spend_report(self, by: str, since: float | None = None) -> list[dict[str, Any]]:
        """Receipts grouped by agent, intent, model or day, summed in SQL."""
        query = _REPORTS[check_spend_group(by)]
        with self._lock:
            rows = self._conn.execute(query, (float("-inf") if since is None else since,)).fetchall()
        return order_spend(map(sql_spend_row, rows), by)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()


def _use_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Put the file in WAL mode (persistent: once, by whoever creates it). Switching takes the file's exclusive lock
    without waiting on the busy handler, so two processes opening a new ledger at once retry instead of failing."""
    deadline = time.monotonic() + timeout
    while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _prepare_file(path: Path) -> None:
    """Create the file readable by the user only (0600) in a folder that exists. The one folder created here is the
    default ledger's ``~/.llm402`` (private to the user, 0700, and only when HOME exists): any other missing folder
    is a mistyped URL (``sqlite:///relative/x.db`` names ``/relative/x.db``), so it is refused, not created."""
    folder = path.parent
    if not folder.is_dir():
        if folder.exists():
            raise ConfigurationError(f"the sqlite ledger's folder {folder} is not a folder")
        if os.path.abspath(folder) != os.path.abspath(default_ledger_dir()):
            raise ConfigurationError(
                f"the sqlite ledger's folder {folder} does not exist: create it first (llm402 creates only "
                f"{DEFAULT_LEDGER_DIR}, the default ledger's folder; sqlite:///a/b.db names /a/b.db)"
            )
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except FileNotFoundError as exc:
            raise ConfigurationError(
                f"cannot create the default ledger folder {folder}: its parent {folder.parent} does not exist "
                "(is HOME set?); set LLM402_LEDGER or pass ledger= to put the ledger elsewhere"
            ) from exc
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
