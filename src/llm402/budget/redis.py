"""`RedisLedger`: one ledger shared by many machines (``redis://host:port/db``, ``rediss://``, ``redis+cluster://``).

Every operation that changes money is one Lua script (registered once, run by ``EVALSHA``), so the sums read, the caps
compared and the counters written form one atomic step on the server, whatever the number of clients.

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
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError, ReservationHeld
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

DEFAULT_NAMESPACE = "llm402"
SWEEP_BATCH = 1000
"""Expired reservations resolved per script run (bounds a script's run time; `recover` loops)."""
_SEQ_DIGITS = 20

_LIB = (
    f"""
local TOPUP = '{TOPUP_SUFFIX}'
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

# KEYS: spent, reserved, expiry, res:<call_id>
# ARGV: res prefix, now, sweep limit, call_id, agent, day, amount, expires_at, intent, daily, total, global caps
_RESERVE = (
    _LIB
    + """
sweep(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
if redis.call('EXISTS', KEYS[4]) == 1 then return redis.error_reply('LLM402_DUPLICATE') end
local amount = tonumber(ARGV[7])
local refusal = check(KEYS[1], KEYS[2], ARGV[5], ARGV[6], amount, {ARGV[10], ARGV[11], ARGV[12]})
if refusal then return refusal end
redis.call('HSET', KEYS[4], 'agent', ARGV[5], 'day', ARGV[6], 'intent', ARGV[9], 'amount', ARGV[7],
  'state', 'held', 'exposure', '0', 'expires_at', ARGV[8])
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[4])
add(KEYS[2], ARGV[5], ARGV[6], amount)
return {0}
"""
)

# KEYS: spent, reserved, res:<call_id>; ARGV: amount, daily, total, global caps
_GROW = (
    _LIB
    + """
local r = redis.call('HMGET', KEYS[3], 'agent', 'day', 'amount')
if not r[1] then return redis.error_reply('LLM402_MISSING') end
local amount = tonumber(ARGV[1])
local extra = amount - num(r[3])
if extra <= 0 then return {0} end
local refusal = check(KEYS[1], KEYS[2], r[1], r[2], extra, {ARGV[2], ARGV[3], ARGV[4]})
if refusal then return refusal end
redis.call('HSET', KEYS[3], 'amount', ARGV[1])
add(KEYS[2], r[1], r[2], extra)
return {0}
"""
)

# KEYS: reserved, expiry, res:<call_id>; ARGV: call_id, amount, valid_before
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
return {0}
"""
)

# KEYS: spent, reserved, expiry, res:<call_id>, receipts, receipt-seq
# ARGV: call_id, actual, receipt JSON ('' = none), started_at, outstanding ('' = all of exposure - actual),
#       the receipt's account and day (to commit a settlement whose reservation was swept while the call ran)
_SETTLE = (
    _LIB
    + """
local r = redis.call('HMGET', KEYS[4], 'agent', 'day', 'amount', 'state', 'exposure')
if r[1] then
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
  add(KEYS[1], ARGV[6], ARGV[7], tonumber(ARGV[2]))
end
if ARGV[3] ~= '' then
  local seq = redis.call('INCR', KEYS[6])
  redis.call('ZADD', KEYS[5], ARGV[4], string.format('%020d', seq) .. ARGV[3])
end
return {0}
"""
)

# KEYS: receipts, receipt-seq; ARGV: receipt JSON, started_at
_RECORD = """
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], ARGV[2], string.format('%020d', seq) .. ARGV[1])
return seq
"""

# KEYS: spent, reserved, expiry; ARGV: res prefix, now, limit
_RECOVER = _LIB + "\nreturn sweep(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])\n"

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


class RedisLedger:
    """A ledger on a Redis server or cluster, shared by every process and machine that uses the same namespace."""

    def __init__(
        self, client: Any, *, namespace: str = DEFAULT_NAMESPACE, clock: Callable[[], float] = time.time
    ) -> None:
        import redis

        self.namespace = _check_namespace(namespace)
        self._response_error: type[Exception] = redis.ResponseError
        self._client = client
        self._clock = clock
        tag = f"{{{namespace}}}"
        self._spent = f"{tag}:spent"
        self._reserved = f"{tag}:reserved"
        self._expiry = f"{tag}:expiry"
        self._res_prefix = f"{tag}:res:"
        self._receipts = f"{tag}:receipts"
        self._seq = f"{tag}:receipt-seq"
        self._reserve_script = client.register_script(_RESERVE)
        self._grow_script = client.register_script(_GROW)
        self._expose_script = client.register_script(_EXPOSE)
        self._settle_script = client.register_script(_SETTLE)
        self._record_script = client.register_script(_RECORD)
        self._recover_script = client.register_script(_RECOVER)
        self._totals_script = client.register_script(_TOTALS)

    @classmethod
    def from_url(cls, url: str, *, clock: Callable[[], float] = time.time) -> RedisLedger:
        """Connect to ``redis://host:port/db`` (``rediss://`` for TLS, ``redis+cluster://`` for a cluster);
        ``?namespace=name`` selects the key namespace, other query options go to redis-py."""
        try:
            import redis
            import redis.cluster
        except ImportError:  # pragma: no cover - depends on the environment
            raise ConfigurationError("the Redis ledger needs the redis package: pip install 'llm402[redis]'") from None
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        namespace = _check_namespace(next((v for k, v in query if k == "namespace"), DEFAULT_NAMESPACE))
        rest = urlencode([(k, v) for k, v in query if k != "namespace"])
        client: Any
        if parts.scheme == "redis+cluster":
            plain = urlunsplit(("redis", parts.netloc, parts.path, rest, ""))
            client = redis.cluster.RedisCluster.from_url(plain, decode_responses=True)
        elif parts.scheme in ("redis", "rediss"):
            plain = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, ""))
            client = redis.Redis.from_url(plain, decode_responses=True)
        else:
            raise ConfigurationError(f"not a Redis ledger URL: {parts.scheme}://...")
        return cls(client, namespace=namespace, clock=clock)

    def __repr__(self) -> str:
        return f"RedisLedger(namespace={self.namespace!r})"

    def _run(self, script: Any, keys: list[str], args: list[str], call_id: str | None = None) -> Any:
        try:
            return script(keys=keys, args=args, client=self._client)
        except self._response_error as exc:
            message = str(exc)
            if "LLM402_DUPLICATE" in message:
                raise ReservationHeld(f"call {call_id} already holds a reservation") from None
            if "LLM402_MISSING" in message:
                raise KeyError(call_id) from None
            raise

    @staticmethod
    def _raise_refusal(result: Any) -> None:
        """A script answers ``[0]`` when it reserved, ``[1, cap name, cap, spent, reserved, requested]`` when not."""
        if int(result[0]) == 1:
            _, name, cap, spent, reserved, requested = result
            raise cap_refusal(str(name), int(cap), int(spent), int(reserved), int(requested))

    def reserve(self, hold: Hold, caps: Caps) -> None:
        """Sweep expired reservations, check every cap and reserve: one script, atomic on the server."""
        if hold.amount < 0:
            raise ConfigurationError("a reservation cannot be negative")
        result = self._run(
            self._reserve_script,
            [self._spent, self._reserved, self._expiry, self._res_prefix + hold.call_id],
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
            ],
            hold.call_id,
        )
        self._raise_refusal(result)

    def grow(self, call_id: str, amount: int, caps: Caps) -> None:
        """Raise a reservation under the caps (one script)."""
        result = self._run(
            self._grow_script,
            [self._spent, self._reserved, self._res_prefix + call_id],
            [_money(amount), _cap_arg(caps.daily), _cap_arg(caps.total), _cap_arg(caps.global_)],
            call_id,
        )
        self._raise_refusal(result)

    def expose(self, call_id: str, amount: int, valid_before: float) -> None:
        """Mark a signed payment as outstanding until ``valid_before``."""
        self._run(
            self._expose_script,
            [self._reserved, self._expiry, self._res_prefix + call_id],
            [call_id, _money(amount), _score(valid_before)],
            call_id,
        )

    def settle(self, call_id: str, actual: int, receipt: Receipt | None, outstanding: int | None = None) -> None:
        """Commit ``actual`` and append the receipt in one script; an unsettled remainder dangles until it expires."""
        self._run(
            self._settle_script,
            [self._spent, self._reserved, self._expiry, self._res_prefix + call_id, self._receipts, self._seq],
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

    def record(self, receipt: Receipt) -> None:
        """Append a receipt of a call that reserved nothing."""
        self._run(
            self._record_script, [self._receipts, self._seq], [receipt_to_json(receipt), _score(receipt.started_at)]
        )

    def recover(self, now: float) -> int:
        """Resolve reservations expired at ``now``, in batches of `SWEEP_BATCH` per script run."""
        resolved = 0
        while True:
            count = int(
                self._run(
                    self._recover_script,
                    [self._spent, self._reserved, self._expiry],
                    [self._res_prefix, _score(now), str(SWEEP_BATCH)],
                )
            )
            resolved += count
            if count < SWEEP_BATCH:
                return resolved

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
        """Close the connection pool."""
        self._client.close()
