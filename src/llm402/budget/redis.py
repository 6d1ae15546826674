"""`RedisLedger`: one ledger shared by many machines (``redis://host:port/db``, ``rediss://``, ``redis+cluster://``).

Every operation that changes money is one Lua script (registered once, run by ``EVALSHA``), so the sums read, the caps
compared and the counters written form one atomic step on the server, whatever the number of clients. The scripts of
this process's threads that arrive together go in one pipelined round trip (`group_commit`; each script still atomic
on its own); a cluster client sends each on its own.

Keys. Everything of one ledger lives under ONE hash tag, ``{llm402}`` by default (``?namespace=name`` or
``namespace=`` picks another)::

    {llm402}:spent            hash  committed micro-USDC: field g (global), a:<agent>, d:<len>:<agent>:<day>
    {llm402}:reserved         hash  open reservations, same fields (kept equal to the sum of the reservations)
    {llm402}:expiry           zset  call_id scored by expires_at, to sweep expired reservations
    {llm402}:res:<call_id>    hash  agent, day, intent, amount, state (held|exposed|dangling), exposure, expires_at
    {llm402}:receipts         zset  <20-digit sequence><receipt JSON>, scored by started_at
    {llm402}:receipt-seq      string the sequence

Why one tag rather than a tag per agent: a reserve must compare the agent-day, agent and global sums and write the
reservation in one atomic step, and Redis Cluster runs a script atomically only over keys of one hash slot. With a
tag per agent the global cap would need a second slot and the check would stop being atomic (or need a distributed
lock). One slot keeps invariant 4 exact in Cluster as well; the price is that one namespace's budget traffic goes to
one shard, which is far more than a fleet of agents paying per LLM call needs. Independent budgets can use
separate namespaces, which do spread over the cluster. The sweep touches reservation keys not listed in ``KEYS``;
that is safe only because they share the tag, hence the slot.

Money is integers (``HINCRBY``); Lua numbers are doubles, exact up to 2**53 micro-USDC (about 9 billion USD).
Expiry uses the client's clock (passed in), like the other backends: keep the machines' clocks in sync.

A store that goes back in time. Redis acknowledges a write before it is on disk: a server restarted from an older
snapshot (or one that lost its data, or a replica promoted before it had the last writes) has forgotten spend that
really happened, and a ledger that trusted it would admit that money again. So every script that writes counts its
write in ``{llm402}:writes`` (a counter that only grows while the data is intact) and answers the new count; each
ledger keeps the highest count it has seen (its *floor*), and the scripts that admit new spend (``reserve``, ``grow``)
refuse atomically, writing nothing, when the store's count is below the floor: `LedgerRolledBack`. Recording what was
already spent (``expose``, ``settle``, ``record``, ``recover``) is never refused. With ``?watermark=/path/file.db`` the
floor is also kept in a SQLite file, read before each reserve and written before it returns, so processes started
after the rollback (on every machine sharing that file) refuse too. `RedisLedger.reconcile` is the operator's way back:
it puts back the committed sums this process saw and raises the counter to the floor. docs/ledgers.md says what each
backend survives.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError, PolicyRefusal, ReservationHeld
from ..receipts import Receipt
from .base import (
    TOPUP_SUFFIX,
    Caps,
    Hold,
    LedgerTotals,
    cap_refusal,
    check_spend_group,
    ledger_agent,
    receipt_day,
    receipt_from_json,
    receipt_to_json,
    spend_rows,
)
from .group_commit import GroupCommit, Outcome

DEFAULT_NAMESPACE = "llm402"
SWEEP_BATCH = 1000
LOG_KEEP = 20_000
"""Writes whose token the store keeps (by count): a floor older than that is checked by its count alone."""
"""Expired reservations resolved per script run (bounds a script's run time; `recover` loops)."""
_SEQ_DIGITS = 20

_LIB = (
    f"""
local TOPUP = '{TOPUP_SUFFIX}'
local LOG_KEEP = {LOG_KEEP}
"""
    + """
local function num(x) return tonumber(x) or 0 end
local function int(x) return string.format('%d', x) end
local function fields(agent, day)
  local g = 'g'
  if string.sub(agent, -#TOPUP) == TOPUP then g = 'gt' end  -- top-ups stay out of the global (consumption) sum
  return 'd:' .. #agent .. ':' .. agent .. ':' .. day, 'a:' .. agent, g
end
local function add(hash, agent, day, amount)
  if amount == 0 then return end
  local fd, fa, fg = fields(agent, day)
  for _, f in ipairs({fd, fa, fg}) do
    if redis.call('HINCRBY', hash, f, int(amount)) == 0 then redis.call('HDEL', hash, f) end
  end
end
local function sweep(spent, reserved, expiry, prefix, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local key = prefix .. id
    local r = redis.call('HMGET', key, 'agent', 'day', 'amount', 'state', 'exposure')
    if r[1] then
      if r[4] == 'exposed' then add(spent, r[1], r[2], num(r[5])) end
      add(reserved, r[1], r[2], -num(r[3]))
      redis.call('DEL', key)
    end
    redis.call('ZREM', expiry, id)
  end
  return #ids
end
-- The store's history. {ns}:writes counts every write; {ns}:writes-log keeps the token (the server's TIME) of the
-- last LOG_KEEP writes by count; {ns}:writes-stale, once set, refuses new spend until `reconcile`. A client's floor is
-- the highest (count, token) it has seen: a store whose count is below it, or whose write of that count has another
-- token (the lost writes were replaced by others, which a count alone cannot tell), has gone back in time.
local function guard(writes, floor, token)
  local stale = redis.call('GET', writes .. '-stale')
  if stale then return redis.error_reply('LLM402_ROLLED_BACK ' .. stale) end
  local count = tonumber(redis.call('GET', writes) or '0')
  local gone = count < tonumber(floor)
  if not gone and token ~= '' then
    local logged = redis.call('HGET', writes .. '-log', floor)
    gone = logged and logged ~= token
  end
  if gone then
    redis.call('SET', writes .. '-stale', int(count))  -- every client refuses from now on, not only this one
    return redis.error_reply('LLM402_ROLLED_BACK ' .. int(count))
  end
  return nil
end
-- Count this write and answer {..., count, token[, field, committed]*3}: the caller's floor and what it saw committed.
local function seen(out, writes, spent, agent, day)
  local count = redis.call('INCR', writes)
  local now = redis.call('TIME')
  local token = now[1] .. '.' .. now[2]
  redis.call('HSET', writes .. '-log', count, token)
  if count > LOG_KEEP then redis.call('HDEL', writes .. '-log', count - LOG_KEEP) end
  table.insert(out, count)
  table.insert(out, token)
  if agent then
    local fd, fa, fg = fields(agent, day)
    local s = redis.call('HMGET', spent, fd, fa, fg)
    for i, f in ipairs({fd, fa, fg}) do
      table.insert(out, f)
      table.insert(out, s[i] or '0')
    end
  end
  return out
end
local function check(spent, reserved, agent, day, extra, caps)
  local fd, fa, fg = fields(agent, day)
  local s = redis.call('HMGET', spent, fd, fa, fg)
  local r = redis.call('HMGET', reserved, fd, fa, fg)
  local names = {'daily', 'total', 'global'}
  for i = 1, 3 do
    if caps[i] ~= '' and num(s[i]) + num(r[i]) + extra > tonumber(caps[i]) then
      return {1, names[i], caps[i], s[i] or '0', r[i] or '0', int(extra)}
    end
  end
  return nil
end
"""
)

# KEYS: spent, reserved, expiry, res:<call_id>, writes
# ARGV: res prefix, now, sweep limit, call_id, agent, day, amount, expires_at, intent, daily, total, global caps,
#       floor count, floor token
_RESERVE = (
    _LIB
    + """
local stale = guard(KEYS[5], ARGV[13], ARGV[14])
if stale then return stale end
sweep(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
if redis.call('EXISTS', KEYS[4]) == 1 then return redis.error_reply('LLM402_DUPLICATE') end
local amount = tonumber(ARGV[7])
local refusal = check(KEYS[1], KEYS[2], ARGV[5], ARGV[6], amount, {ARGV[10], ARGV[11], ARGV[12]})
if refusal then return seen(refusal, KEYS[5], KEYS[1], ARGV[5], ARGV[6]) end
redis.call('HSET', KEYS[4], 'agent', ARGV[5], 'day', ARGV[6], 'intent', ARGV[9], 'amount', ARGV[7],
  'state', 'held', 'exposure', '0', 'expires_at', ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[4])
add(KEYS[2], ARGV[5], ARGV[6], amount)
return seen({0}, KEYS[5], KEYS[1], ARGV[5], ARGV[6])
"""
)

# KEYS: spent, reserved, res:<call_id>, writes; ARGV: amount, daily, total, global caps, floor count, floor token
_GROW = (
    _LIB
    + """
local stale = guard(KEYS[4], ARGV[5], ARGV[6])
if stale then return stale end
local r = redis.call('HMGET', KEYS[3], 'agent', 'day', 'amount')
if not r[1] then return redis.error_reply('LLM402_MISSING') end
local amount = tonumber(ARGV[1])
local extra = amount - num(r[3])
if extra <= 0 then return seen({0}, KEYS[4], KEYS[1], r[1], r[2]) end
local refusal = check(KEYS[1], KEYS[2], r[1], r[2], extra, {ARGV[2], ARGV[3], ARGV[4]})
if refusal then return seen(refusal, KEYS[4], KEYS[1], r[1], r[2]) end
redis.call('HSET', KEYS[3], 'amount', ARGV[1])
add(KEYS[2], r[1], r[2], extra)
return seen({0}, KEYS[4], KEYS[1], r[1], r[2])
"""
)

# KEYS: reserved, expiry, res:<call_id>, writes, spent; ARGV: call_id, amount, valid_before
_EXPOSE = (
    _LIB
    + """
local r = redis.call('HMGET', KEYS[3], 'agent', 'day', 'amount', 'exposure', 'expires_at')
if not r[1] then return redis.error_reply('LLM402_MISSING') end
local amount = tonumber(ARGV[2])
local held = num(r[3])
local new_amount = math.max(held, amount)
local expires_at = r[5]
if tonumber(ARGV[3]) > tonumber(r[5]) then expires_at = ARGV[3] end
redis.call('HSET', KEYS[3], 'state', 'exposed', 'exposure', int(math.max(num(r[4]), amount)),
  'amount', int(new_amount), 'expires_at', expires_at)
redis.call('ZADD', KEYS[2], expires_at, ARGV[1])
add(KEYS[1], r[1], r[2], new_amount - held)
return seen({0}, KEYS[4], KEYS[5], r[1], r[2])
"""
)

# KEYS: spent, reserved, expiry, res:<call_id>, receipts, receipt-seq, writes
# ARGV: call_id, actual, receipt JSON ('' = none), started_at, outstanding ('' = all of exposure - actual),
#       the receipt's account and day (to commit a settlement whose reservation was swept while the call ran)
_SETTLE = (
    _LIB
    + """
local r = redis.call('HMGET', KEYS[4], 'agent', 'day', 'amount', 'state', 'exposure')
local account, day = nil, nil
if r[1] then
  account, day = r[1], r[2]
  local actual = tonumber(ARGV[2])
  local exposure = num(r[5])
  local left = exposure - actual
  if ARGV[5] ~= '' then left = math.min(left, tonumber(ARGV[5])) end
  add(KEYS[1], r[1], r[2], actual)
  add(KEYS[2], r[1], r[2], -num(r[3]))
  if r[4] == 'exposed' and left > 0 then
    redis.call('HSET', KEYS[4], 'state', 'dangling', 'amount', int(left), 'exposure', '0')
    add(KEYS[2], r[1], r[2], left)
  else
    redis.call('DEL', KEYS[4])
    redis.call('ZREM', KEYS[3], ARGV[1])
  end
elseif ARGV[6] ~= '' then
  account, day = ARGV[6], ARGV[7]
  add(KEYS[1], ARGV[6], ARGV[7], tonumber(ARGV[2]))
end
if ARGV[3] ~= '' then
  local seq = redis.call('INCR', KEYS[6])
  redis.call('ZADD', KEYS[5], ARGV[4], string.format('%020d', seq) .. ARGV[3])
end
return seen({0}, KEYS[7], KEYS[1], account, day)
"""
)

# KEYS: receipts, receipt-seq, writes; ARGV: receipt JSON, started_at
_RECORD = (
    _LIB
    + """
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], ARGV[2], string.format('%020d', seq) .. ARGV[1])
return seen({0}, KEYS[3])
"""
)

# KEYS: spent, reserved, expiry, writes; ARGV: res prefix, now, limit
_RECOVER = _LIB + "\nreturn seen({sweep(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])}, KEYS[4])\n"

# KEYS: spent, writes; ARGV: floor count, then (field, committed) pairs. Committed sums only go up; the count rises to
# the floor, the history starts again from there and the store admits spend again.
_RECONCILE = (
    _LIB
    + """
for i = 2, #ARGV, 2 do
  local have = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if have < tonumber(ARGV[i + 1]) then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[1]) then redis.call('SET', KEYS[2], ARGV[1]) end
redis.call('DEL', KEYS[2] .. '-log', KEYS[2] .. '-stale')
return seen({}, KEYS[2])
"""
)

# KEYS: spent, reserved; ARGV: agent, day. A script so the six sums are one snapshot.
_TOTALS = (
    _LIB
    + """
local fd, fa, fg = fields(ARGV[1], ARGV[2])
local s = redis.call('HMGET', KEYS[1], fd, fa, fg)
local r = redis.call('HMGET', KEYS[2], fd, fa, fg)
return {s[1] or '0', r[1] or '0', s[2] or '0', r[2] or '0', s[3] or '0', r[3] or '0'}
"""
)


MAX_LUA_MONEY = 2**53
"""Lua numbers are doubles: every amount and cap a script compares must stay below this to stay exact."""


def _money(amount: int) -> str:
    if not 0 <= amount < MAX_LUA_MONEY:
        raise ConfigurationError(f"amount {amount} is outside what the Redis ledger compares exactly (0..2**53)")
    return str(amount)


def _cap_arg(cap: int | None) -> str:
    return "" if cap is None else _money(cap)


def _check_namespace(namespace: str) -> str:
    """The namespace becomes the hash tag, so it cannot contain braces (they would change the slot)."""
    if not namespace or any(c in namespace for c in "{}"):
        raise ConfigurationError(f"a Redis ledger namespace must be non-empty without braces, got {namespace!r}")
    return namespace


def _score(value: float) -> str:
    return repr(float(value))


_NO_FLOOR = (0, "")


@dataclass(frozen=True, slots=True)
class _Command:
    """One script run, queued for the shared pipeline."""

    sha: str
    keys: list[str]
    args: list[str]


class LedgerRolledBack(PolicyRefusal):
    """The ledger's store holds fewer writes than this process (or the watermark file) has seen: it restarted from an
    older snapshot or lost writes, so spend that happened is missing from it. No new spend is admitted until the data
    is restored or `RedisLedger.reconcile` is called."""

    code = "ledger_rolled_back"


class Watermark:
    """The highest write count seen of each Redis ledger, kept in a SQLite file that outlives the processes (share the
    file between the processes of a machine, or put it on a volume every machine mounts)."""

    def __init__(self, path: str, key: str) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ConfigurationError(f"the Redis ledger's watermark folder {folder} does not exist: create it first")
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        import sqlite3

        self.path, self.key = path, key
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        if self._conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a count written survives any process crash (a power cut may lose the last few: the file then shows
        # an older floor, which only weakens detection of a rollback that went back less than those writes).
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS watermarks "
            "(ledger TEXT PRIMARY KEY, writes INTEGER NOT NULL, token TEXT NOT NULL)"
        )

    def read(self) -> tuple[int, str]:
        """The highest (write count, its token) any process sharing the file has seen."""
        with self._lock:
            row = self._conn.execute("SELECT writes, token FROM watermarks WHERE ledger = ?", (self.key,)).fetchone()
        return (int(row[0]), str(row[1])) if row else _NO_FLOOR

    def raise_to(self, floor: tuple[int, str]) -> None:
        """Record ``floor`` unless the file already holds a higher count."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO watermarks (ledger, writes, token) VALUES (?, ?, ?) ON CONFLICT (ledger) DO UPDATE "
                "SET writes = excluded.writes, token = excluded.token WHERE excluded.writes > watermarks.writes",
                (self.key, *floor),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class RedisLedger:
    """A ledger on a Redis server or cluster, shared by every process and machine that uses the same namespace."""

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        clock: Callable[[], float] = time.time,
        watermark: Watermark | None = None,
    ) -> None:
        import redis

        self.namespace = _check_namespace(namespace)
        self._response_error: type[Exception] = redis.ResponseError
        self._no_script: type[Exception] = redis.exceptions.NoScriptError
        self._client = client
        self._clock = clock
        tag = f"{{{namespace}}}"
        self._spent = f"{tag}:spent"
        self._reserved = f"{tag}:reserved"
        self._expiry = f"{tag}:expiry"
        self._res_prefix = f"{tag}:res:"
        self._receipts = f"{tag}:receipts"
        self._seq = f"{tag}:receipt-seq"
        self._writes = f"{tag}:writes"
        self._watermark = watermark
        self._floor_lock = threading.Lock()
        self._floor = _NO_FLOOR if watermark is None else watermark.read()
        """The highest (write count, token) seen: a store below it, or with another write at that count, has gone
        back in time."""
        self._committed_seen: dict[str, int] = {}
        """The highest committed sum seen per spent field (what `reconcile` puts back)."""
        self._reconcile_script = client.register_script(_RECONCILE)
        self._reserve_script = client.register_script(_RESERVE)
        self._grow_script = client.register_script(_GROW)
        self._expose_script = client.register_script(_EXPOSE)
        self._settle_script = client.register_script(_SETTLE)
        self._record_script = client.register_script(_RECORD)
        self._recover_script = client.register_script(_RECOVER)
        self._totals_script = client.register_script(_TOTALS)
        self._group: GroupCommit[_Command] | None = None
        if isinstance(client, redis.Redis):  # a cluster client routes each command itself: no shared round trips
            self._group = GroupCommit(self._send_batch)

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> RedisLedger:
        """Connect to ``redis://host:port/db`` (``rediss://`` for TLS, ``redis+cluster://`` for a cluster);
        ``?namespace=name`` selects the key namespace, ``?watermark=/path/file.db`` keeps the highest write count seen
        in that SQLite file (see the module's docstring), other query options go to redis-py."""
        try:
            import redis
            import redis.cluster
        except ImportError:  # pragma: no cover - depends on the environment
            raise ConfigurationError("the Redis ledger needs the redis package: pip install 'llm402[redis]'") from None
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        namespace = _check_namespace(next((v for k, v in query if k == "namespace"), DEFAULT_NAMESPACE))
        watermark_path = next((v for k, v in query if k == "watermark"), "")
        rest = urlencode([(k, v) for k, v in query if k not in ("namespace", "watermark")])
        client: Any
        if parts.scheme == "redis+cluster":
            plain = urlunsplit(("redis", parts.netloc, parts.path, rest, ""))
            client = redis.cluster.RedisCluster.from_url(plain, decode_responses=True)
        elif parts.scheme in ("redis", "rediss"):
            plain = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, ""))
            client = redis.Redis.from_url(plain, decode_responses=True)
        else:
            raise ConfigurationError(f"not a Redis ledger URL: {parts.scheme}://...")
        watermark = None
        if watermark_path:
            host = parts.netloc.rpartition("@")[2]  # never the password
            watermark = Watermark(watermark_path, f"{parts.scheme}://{host}{parts.path or '/0'}#{namespace}")
        return cls(client, namespace=namespace, clock=clock, watermark=watermark)

    def __repr__(self) -> str:
        return f"RedisLedger(namespace={self.namespace!r})"

    def _run(self, script: Any, keys: list[str], args: list[str], call_id: str | None = None) -> Any:
        try:
            return self._evalsha(script, keys, args)
        except self._response_error as exc:
            message = str(exc)
            if "LLM402_DUPLICATE" in message:
                raise ReservationHeld(f"call {call_id} already holds a reservation") from None
            if "LLM402_MISSING" in message:
                raise KeyError(call_id) from None
            if "LLM402_ROLLED_BACK" in message:
                store = int(message.rsplit(" ", 1)[-1])
                raise LedgerRolledBack(
                    f"the Redis ledger {self.namespace!r} has gone back in time: it holds {store} writes, this process "
                    f"has seen {self._floor[0]} (the server restarted from an older snapshot or lost writes), so spend "
                    "that happened is missing from it; nothing new is admitted until the data is restored or "
                    "RedisLedger.reconcile() is called",
                    namespace=self.namespace,
                    store_writes=store,
                    seen_writes=self._floor[0],
                ) from None
            raise

    def _evalsha(self, script: Any, keys: list[str], args: list[str]) -> Any:
        """Run a script: through the shared pipeline (the scripts of concurrent threads go in one round trip), or
        on its own where there is none. A script the server does not know (restarted, flushed) did not run: it is
        loaded and run on its own."""
        if self._group is not None:
            try:
                return self._group.run(_Command(script.sha, keys, args))
            except self._no_script:
                pass
        return script(keys=keys, args=args, client=self._client)

    def _send_batch(self, commands: Sequence[_Command]) -> list[Outcome]:
        """One round trip: every queued script written at once, each answer read in order. Each script is atomic on
        the server on its own; a script's error is its own outcome. A connection that fails is dropped and every
        script of the batch gets the error (as a lone script would: whether it ran is unknown), never re-sent."""
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(
                conn.pack_commands([("EVALSHA", c.sha, len(c.keys), *c.keys, *c.args) for c in commands])
            )
            outcomes = []
            for _ in commands:
                try:
                    outcomes.append(Outcome(conn.read_response()))
                except self._response_error as exc:
                    outcomes.append(Outcome(error=exc))
            return outcomes
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _current_floor(self) -> list[str]:
        """The floor to hold the store to, as script arguments: this process's, raised to the watermark file's."""
        stored = _NO_FLOOR if self._watermark is None else self._watermark.read()
        with self._floor_lock:
            self._floor = max(self._floor, stored, key=lambda floor: floor[0])
            return [str(self._floor[0]), self._floor[1]]

    def _observe(self, seen: Sequence[Any]) -> None:
        """Take note of a script's ``[write count, token, (field, committed sum)*]``: raise the floor (and the
        watermark file, before the caller goes on) and remember the committed sums."""
        floor = (int(seen[0]), str(seen[1]))
        with self._floor_lock:
            raised = floor[0] > self._floor[0]
            if raised:
                self._floor = floor
            for field, value in zip(seen[2::2], seen[3::2], strict=True):
                if int(value) > self._committed_seen.get(field, 0):
                    self._committed_seen[field] = int(value)
        if raised and self._watermark is not None:
            self._watermark.raise_to(floor)

    def _checked(self, result: Any) -> None:
        """A reserve or grow answers ``[0, seen...]`` when it reserved, ``[1, cap name, cap, spent, reserved,
        requested, seen...]`` when a cap refused it."""
        head = 1 if int(result[0]) == 0 else 6
        self._observe(result[head:])
        if head == 6:
            _, name, cap, spent, reserved, requested = result[:6]
            raise cap_refusal(str(name), int(cap), int(spent), int(reserved), int(requested))

    def reserve(self, hold: Hold, caps: Caps) -> None:
        """Sweep expired reservations, check every cap and reserve: one script, atomic on the server."""
        if hold.amount < 0:
            raise ConfigurationError("a reservation cannot be negative")
        result = self._run(
            self._reserve_script,
            [self._spent, self._reserved, self._expiry, self._res_prefix + hold.call_id, self._writes],
            [
                self._res_prefix,
                _score(self._clock()),
                str(SWEEP_BATCH),
                hold.call_id,
                hold.agent,
                hold.day,
                _money(hold.amount),
                _score(hold.expires_at),
                hold.intent or "",
                _cap_arg(caps.daily),
                _cap_arg(caps.total),
                _cap_arg(caps.global_),
                *self._current_floor(),
            ],
            hold.call_id,
        )
        self._checked(result)

    def grow(self, call_id: str, amount: int, caps: Caps) -> None:
        """Raise a reservation under the caps (one script)."""
        result = self._run(
            self._grow_script,
            [self._spent, self._reserved, self._res_prefix + call_id, self._writes],
            [
                _money(amount),
                _cap_arg(caps.daily),
                _cap_arg(caps.total),
                _cap_arg(caps.global_),
                *self._current_floor(),
            ],
            call_id,
        )
        self._checked(result)

    def expose(self, call_id: str, amount: int, valid_before: float) -> None:
        """Mark a signed payment as outstanding until ``valid_before``."""
        result = self._run(
            self._expose_script,
            [self._reserved, self._expiry, self._res_prefix + call_id, self._writes, self._spent],
            [call_id, _money(amount), _score(valid_before)],
            call_id,
        )
        self._observe(result[1:])

    def settle(self, call_id: str, actual: int, receipt: Receipt | None, outstanding: int | None = None) -> None:
        """Commit ``actual`` and append the receipt in one script; an unsettled remainder dangles until it expires."""
        result = self._run(
            self._settle_script,
            [
                self._spent,
                self._reserved,
                self._expiry,
                self._res_prefix + call_id,
                self._receipts,
                self._seq,
                self._writes,
            ],
            [
                call_id,
                _money(actual),
                "" if receipt is None else receipt_to_json(receipt),
                _score(0.0 if receipt is None else receipt.started_at),
                "" if outstanding is None else _money(outstanding),
                "" if receipt is None else ledger_agent(receipt),
                "" if receipt is None else receipt_day(receipt.started_at),
            ],
            call_id,
        )
        self._observe(result[1:])

    def record(self, receipt: Receipt) -> None:
        """Append a receipt of a call that reserved nothing."""
        result = self._run(
            self._record_script,
            [self._receipts, self._seq, self._writes],
            [receipt_to_json(receipt), _score(receipt.started_at)],
        )
        self._observe(result[1:])

    def recover(self, now: float) -> int:
        """Resolve reservations expired at ``now``, in batches of `SWEEP_BATCH` per script run."""
        resolved = 0
        while True:
            result = self._run(
                self._recover_script,
                [self._spent, self._reserved, self._expiry, self._writes],
                [self._res_prefix, _score(now), str(SWEEP_BATCH)],
            )
            self._observe(result[1:])
            count = int(result[0])
            resolved += count
            if count < SWEEP_BATCH:
                return resolved

    def reconcile(self) -> int:
        """The way back after `LedgerRolledBack`, once an operator has decided the store's data is what it will be:
        put back every committed sum this process saw that the store has lost (sums only go up), and raise the
        store's write count to the floor, so reservations are admitted again. Spend this process never saw (other
        processes' since the snapshot) is not put back: restore the data for that, or reconcile from each process.
        Returns the store's new write count."""
        floor = self._current_floor()[0]
        with self._floor_lock:
            pairs = [str(x) for item in self._committed_seen.items() for x in item]
        seen = self._run(self._reconcile_script, [self._spent, self._writes], [floor, *pairs])
        self._observe(seen)
        return int(seen[0])

    def totals(self, agent: str, day: str) -> LedgerTotals:
        """Spent and reserved sums, read in one script (one snapshot)."""
        values = self._run(self._totals_script, [self._spent, self._reserved], [agent, day])
        return LedgerTotals(*(int(v) for v in values))

    def receipts(self, since: float | None = None) -> Sequence[Receipt]:
        """Receipts started at or after ``since``, oldest first (by ``started_at``, then by insertion)."""
        return [receipt_from_json(member[_SEQ_DIGITS:]) for member in self._receipt_members(since)]

    def _receipt_members(self, since: float | None) -> list[str]:
        members: list[str] = self._client.zrangebyscore(
            self._receipts, "-inf" if since is None else _score(since), "+inf"
        )
        return members

    def spend_report(self, by: str, since: float | None = None) -> list[dict[str, Any]]:
        """Receipts grouped by agent, intent, model or day, grouped client-side from the stored JSON documents."""
        check_spend_group(by)
        return spend_rows((json.loads(member[_SEQ_DIGITS:]) for member in self._receipt_members(since)), by)

    def close(self) -> None:
        """Close the connection pool (and the watermark file)."""
        self._client.close()
        if self._watermark is not None:
            self._watermark.close()
