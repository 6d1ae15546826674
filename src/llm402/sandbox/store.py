"""The sandbox's durable state in SQLite (a file, or ``:memory:``): one connection guarded by one lock.

What survives a restart on the same file: the test-USDC ledger, used EIP-3009 nonces, settlements, payment attempts,
Token Kiosk credit (balance and locked), API keys (sha256 only), used SIWE nonces, top-ups and per-key usage rows.
No prompt or completion text is ever stored. Money is integer micro-USDC.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS usdc_balances (address TEXT PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS eip3009_nonces (payer TEXT NOT NULL, nonce TEXT NOT NULL, used_at TEXT NOT NULL,
    PRIMARY KEY (payer, nonce));
CREATE TABLE IF NOT EXISTS settlements (id INTEGER PRIMARY KEY, tx TEXT UNIQUE NOT NULL, payer TEXT NOT NULL,
    payee TEXT NOT NULL, amount INTEGER NOT NULL, path TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS payment_attempts (id INTEGER PRIMARY KEY, payer TEXT, nonce TEXT, outcome TEXT NOT NULL,
    reason TEXT, path TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credits (wallet TEXT PRIMARY KEY, balance INTEGER NOT NULL DEFAULT 0,
    locked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS api_keys (id INTEGER PRIMARY KEY, wallet TEXT NOT NULL, key_hash TEXT UNIQUE NOT NULL,
    label TEXT, created_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS siwe_nonces (nonce TEXT PRIMARY KEY, wallet TEXT NOT NULL, used_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS topups (id INTEGER PRIMARY KEY, wallet TEXT NOT NULL, amount INTEGER NOT NULL,
    tx_hash TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY, key_id INTEGER NOT NULL, wallet TEXT NOT NULL,
    model TEXT NOT NULL, endpoint TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    reserved INTEGER NOT NULL, charged INTEGER NOT NULL, platform_revenue INTEGER NOT NULL, streamed INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL, error TEXT, created_at TEXT NOT NULL);
"""


@functools.lru_cache(maxsize=2)
def _second_iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def now_iso() -> str:
    """The current UTC time as ``2026-04-07T12:00:00.000Z`` (milliseconds truncated; the date and time of day are
    formatted once a second)."""
    seconds, millis = divmod(time.time_ns() // 1_000_000, 1000)
    return f"{_second_iso(seconds)}.{millis:03d}Z"


class SettleError(Exception):
    """Settlement refused inside the ledger transaction (``nonce_already_used`` or ``insufficient_balance``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Settled:
    """A settled transfer: its transaction id and when."""

    transaction: str
    created_at: str
    credited_balance: int | None = None


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """A stored API key (its hash, never the key)."""

    id: int
    wallet: str
    label: str | None
    created_at: str
    revoked_at: str | None


class Store:
    """All sandbox state. Addresses are stored lowercased."""

    def __init__(self, path: str = ":memory:") -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
            return row

    def _all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # --- test USDC ledger --------------------------------------------------------------------------------------

    def usdc_balance(self, address: str) -> int:
        """The test-USDC balance of ``address`` (0 when unknown)."""
        row = self._one("SELECT balance FROM usdc_balances WHERE address = ?", address.lower())
        return int(row["balance"]) if row else 0

    def mint(self, address: str, amount: int) -> int:
        """Mint test USDC (the faucet); answers the new balance."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO usdc_balances (address, balance) VALUES (?, ?) "
                "ON CONFLICT(address) DO UPDATE SET balance = balance + excluded.balance",
                (address.lower(), amount),
            )
            row = db.execute("SELECT balance FROM usdc_balances WHERE address = ?", (address.lower(),)).fetchone()
            return int(row["balance"])

    def nonce_used(self, payer: str, nonce: str) -> bool:
        """Whether the EIP-3009 ``nonce`` of ``payer`` has been used."""
        return (
            self._one("SELECT 1 FROM eip3009_nonces WHERE payer = ? AND nonce = ?", payer.lower(), nonce.lower())
            is not None
        )

    def settle(
        self, payer: str, payee: str, amount: int, nonce: str, path: str, *, topup_wallet: str | None = None
    ) -> Settled:
        """Move ``amount`` from payer to payee and burn the nonce, atomically; optionally credit a top-up too."""
        payer, payee, nonce = payer.lower(), payee.lower(), nonce.lower()
        created = now_iso()
        tx_id = "0x" + hashlib.sha256(f"llm402-sandbox:{payer}:{nonce}".encode()).hexdigest()
        with self._tx() as db:
            try:  # burning the nonce first is the used-nonce check (its primary key), in the same transaction
                db.execute(
                    "INSERT INTO eip3009_nonces (payer, nonce, used_at) VALUES (?, ?, ?)", (payer, nonce, created)
                )
            except sqlite3.IntegrityError:
                raise SettleError("nonce_already_used", "this authorization nonce has already been used") from None
            debited = db.execute(
                "UPDATE usdc_balances SET balance = balance - ? WHERE address = ? AND balance >= ?",
                (amount, payer, amount),
            ).rowcount
            if debited != 1:
                row = db.execute("SELECT balance FROM usdc_balances WHERE address = ?", (payer,)).fetchone()
                balance = int(row["balance"]) if row else 0
                if balance < amount:
                    raise SettleError("insufficient_balance", f"payer holds {balance} test USDC, needs {amount}")
            db.execute(
                "INSERT INTO usdc_balances (address, balance) VALUES (?, ?) "
                "ON CONFLICT(address) DO UPDATE SET balance = balance + excluded.balance",
                (payee, amount),
            )
            db.execute(
                "INSERT INTO settlements (tx, payer, payee, amount, path, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (tx_id, payer, payee, amount, path, created),
            )
            credited: int | None = None
            if topup_wallet is not None:
                wallet = topup_wallet.lower()
                db.execute(
                    "INSERT INTO credits (wallet, balance) VALUES (?, ?) "
                    "ON CONFLICT(wallet) DO UPDATE SET balance = balance + excluded.balance",
                    (wallet, amount),
                )
                db.execute(
                    "INSERT INTO topups (wallet, amount, tx_hash, created_at) VALUES (?, ?, ?, ?)",
                    (wallet, amount, tx_id, created),
                )
                credited = int(db.execute("SELECT balance FROM credits WHERE wallet = ?", (wallet,)).fetchone()[0])
        return Settled(tx_id, created, credited)

    def record_attempt(self, payer: str | None, nonce: str | None, outcome: str, reason: str | None, path: str) -> None:
        """Remember one presented payment and what became of it (``settled``, ``refused``, ``unsettled``)."""
        with self._lock:  # one INSERT is its own (autocommit) transaction
            self._db.execute(
                "INSERT INTO payment_attempts (payer, nonce, outcome, reason, path, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (payer.lower() if payer else None, nonce.lower() if nonce else None, outcome, reason, path, now_iso()),
            )

    def stats(self, payer: str | None) -> dict[str, Any]:
        """Signatures seen, settlements and refusals by reason, for one payer or all."""
        where, args = ("WHERE payer = ?", (payer.lower(),)) if payer else ("", ())
        both = "AND" if payer else "WHERE"
        with self._lock:
            seen = self._db.execute(
                f"SELECT COUNT(*) FROM (SELECT DISTINCT payer, nonce FROM payment_attempts {where} {both} "  # noqa: S608
                "payer IS NOT NULL AND nonce IS NOT NULL)",
                args,
            ).fetchone()[0]
            settled = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM settlements {where}",  # noqa: S608
                args,
            ).fetchone()
            refused = self._db.execute(
                f"SELECT reason, COUNT(*) FROM payment_attempts {where} {both} outcome = 'refused' "  # noqa: S608
                "GROUP BY reason ORDER BY reason",
                args,
            ).fetchall()
        return {
            "signatures_seen": int(seen),
            "settled": int(settled[0]),
            "settled_amount": int(settled[1]),
            "refused": {str(r[0]): int(r[1]) for r in refused},
        }

    def settlements(self, payer: str | None) -> list[dict[str, Any]]:
        """Settlements, oldest first, for one payer or all."""
        sql = "SELECT tx, payer, payee, amount, path, created_at FROM settlements"
        rows = (
            self._all(sql + " WHERE payer = ? ORDER BY id", payer.lower()) if payer else self._all(sql + " ORDER BY id")
        )
        return [
            {
                "transaction": r["tx"],
                "payer": r["payer"],
                "payee": r["payee"],
                "amount": int(r["amount"]),
                "path": r["path"],
                "created_at": r["created_at"],
            }
            for r in rows
        ]

    # --- Token Kiosk credit --------------------------------------------------------------------------------------

    def credit(self, wallet: str) -> tuple[int, int]:
        """``(balance, locked)`` of a wallet's kiosk credit (zeros when unknown)."""
        row = self._one("SELECT balance, locked FROM credits WHERE wallet = ?", wallet.lower())
        return (int(row["balance"]), int(row["locked"])) if row else (0, 0)

    def grant_credit(self, wallet: str, amount: int) -> int:
        """Add prepaid credit without a payment (the AIsa mount's dashboard-issued keys); answers the balance."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO credits (wallet, balance, locked) VALUES (?, ?, 0) "
                "ON CONFLICT(wallet) DO UPDATE SET balance = balance + excluded.balance",
                (wallet.lower(), amount),
            )
            row = db.execute("SELECT balance FROM credits WHERE wallet = ?", (wallet.lower(),)).fetchone()
            return int(row["balance"])

    def reserve(self, wallet: str, amount: int) -> bool:
        """Lock ``amount`` of available credit atomically; False when the available credit is short."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE credits SET locked = locked + ? WHERE wallet = ? AND balance - locked >= ?",
                (amount, wallet.lower(), amount),
            )
            return cur.rowcount == 1 or amount == 0

    def reconcile(self, wallet: str, reserved: int, charged: int) -> None:
        """Unlock a reservation and deduct the actual charge (``charged <= reserved``)."""
        if charged > reserved:
            raise ValueError("a charge never exceeds its reservation")
        with self._tx() as db:
            db.execute(
                "UPDATE credits SET locked = locked - ?, balance = balance - ? WHERE wallet = ?",
                (reserved, charged, wallet.lower()),
            )

    def record_usage(
        self,
        *,
        key_id: int,
        wallet: str,
        model: str,
        endpoint: str,
        prompt_tokens: int,
        completion_tokens: int,
        reserved: int,
        charged: int,
        platform_revenue: int,
        streamed: bool,
        latency_ms: int,
        error: str | None,
    ) -> None:
        """One metadata row per credit call (never any prompt or completion text)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO usage (key_id, wallet, model, endpoint, prompt_tokens, completion_tokens, reserved, "
                "charged, platform_revenue, streamed, latency_ms, error, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    wallet.lower(),
                    model,
                    endpoint,
                    prompt_tokens,
                    completion_tokens,
                    reserved,
                    charged,
                    platform_revenue,
                    int(streamed),
                    latency_ms,
                    error,
                    now_iso(),
                ),
            )

    def usage_by_key(self, wallet: str) -> list[sqlite3.Row]:
        """Per-key totals of a wallet (every key, used or not)."""
        return self._all(
            "SELECT k.id AS id, k.label AS label, COUNT(u.id) AS request_count, "
            "COALESCE(SUM(u.prompt_tokens), 0) AS prompt_tokens, "
            "COALESCE(SUM(u.completion_tokens), 0) AS completion_tokens, "
            "COALESCE(SUM(u.charged), 0) AS charged, COALESCE(SUM(u.platform_revenue), 0) AS revenue "
            "FROM api_keys k LEFT JOIN usage u ON u.key_id = k.id WHERE k.wallet = ? GROUP BY k.id ORDER BY k.id",
            wallet.lower(),
        )

    def topups(self, wallet: str) -> list[sqlite3.Row]:
        """A wallet's top-ups, newest first."""
        return self._all(
            "SELECT id, amount, tx_hash, created_at FROM topups WHERE wallet = ? ORDER BY id DESC", wallet.lower()
        )

    # --- API keys and SIWE -------------------------------------------------------------------------------------

    def create_key(self, wallet: str, key_hash: str, label: str | None) -> ApiKeyRow:
        """Store a new key's hash."""
        created = now_iso()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO api_keys (wallet, key_hash, label, created_at) VALUES (?, ?, ?, ?)",
                (wallet.lower(), key_hash, label, created),
            )
            key_id = cur.lastrowid
        assert key_id is not None
        return ApiKeyRow(key_id, wallet.lower(), label, created, None)

    def key_by_hash(self, key_hash: str) -> ApiKeyRow | None:
        """The key with this hash (revoked or not)."""
        row = self._one("SELECT id, wallet, label, created_at, revoked_at FROM api_keys WHERE key_hash = ?", key_hash)
        return ApiKeyRow(row["id"], row["wallet"], row["label"], row["created_at"], row["revoked_at"]) if row else None

    def keys(self, wallet: str) -> list[ApiKeyRow]:
        """A wallet's keys, oldest first."""
        rows = self._all(
            "SELECT id, wallet, label, created_at, revoked_at FROM api_keys WHERE wallet = ? ORDER BY id",
            wallet.lower(),
        )
        return [ApiKeyRow(r["id"], r["wallet"], r["label"], r["created_at"], r["revoked_at"]) for r in rows]

    def revoke_key(self, wallet: str, key_id: int) -> bool:
        """Revoke a wallet's key; False when the wallet has no such key."""
        with self._tx() as db:
            row = db.execute(
                "SELECT revoked_at FROM api_keys WHERE id = ? AND wallet = ?", (key_id, wallet.lower())
            ).fetchone()
            if row is None:
                return False
            if row["revoked_at"] is None:
                db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (now_iso(), key_id))
            return True

    def use_siwe_nonce(self, nonce: str, wallet: str) -> bool:
        """Burn a SIWE nonce; False when it was already used."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM siwe_nonces WHERE nonce = ?", (nonce,)).fetchone():
                return False
            db.execute(
                "INSERT INTO siwe_nonces (nonce, wallet, used_at) VALUES (?, ?, ?)", (nonce, wallet.lower(), now_iso())
            )
            return True
