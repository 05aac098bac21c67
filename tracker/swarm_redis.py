"""Swarm state in Redis, shared by every replica of the tracker (``--swarm-store redis://host:port/db``).

Same answers as the in-process :class:`tracker.swarm.SwarmRegistry` (the handout is the
same :func:`tracker.handout.sample_peers` over the same buckets), but every call that
touches Redis is a coroutine: one round trip per announce (one ``EVALSHA`` of the
announce script, pipelined with the node's bookkeeping).  Heartbeats are written behind:
see *Liveness*.  Callers await what :mod:`tracker.swarmstore` says may be awaitable.

Key schema (prefix ``mc:``; designed for Redis Cluster: everything one script touches
shares one hash tag)::

    mc:{<ih hex>}:a          STRING  allowed: the swarm's canonical key (hex); a hybrid torrent's
                                     second info-hash points at its first one
    mc:{<ih hex>}:x          STRING  tombstone for 30 s after a delete (a replica that has not seen
                                     the delete yet does not re-allow the swarm)
    mc:{<c>}:p               HASH    peer address (compact bytes) -> "left\tzone\torigin\tnode\tkeyhex\tpeer_id"
    mc:{<c>}:t               ZSET    peer address -> per-peer deadline (ms since epoch): plain clients'
                                     TTL, swept a few at a time by each announce of the swarm
    mc:{<c>}:c               HASH    complete / incomplete / downloaded (BEP 48 counters)
    mc:{<c>}:k               SET     bucket names "<zone>\t<complete><origin_seed>" that have peers
    mc:{<c>}:b:<bucket>      SET     the peer addresses of one bucket (the handout samples these)
    mc:{<c>}:g:<zone>        LIST    the zone's gateway peers (--zone-gateways N > 0), join order
    mc:{<c>}:gz              SET     zones with a gateway list
    mc:{live:<0..15>}        ZSET    node id -> heartbeat deadline (ms since epoch); 16 buckets by crc32
    mc:{live:<0..15>}:z      HASH    node id -> zone (live nodes per zone)
    mc:{live:<0..15>}:e:<node id>
                             SET     "<c>:<address hex>": the swarm entries a node daemon announced (in its
                                     liveness bucket's hash tag, so one script per bucket writes the
                                     bucket's heartbeats and reads their nodes' entry counts)

``<c>`` is the swarm's canonical key: the first info-hash it was allowed under.

Liveness: a heartbeat moves the node's deadline in its liveness bucket (a TTL by score);
every replica's expiry loop (each ``expiry_interval_s``) claims the nodes that are due
with an atomic conditional ``ZREM`` (one replica wins) and removes their entries from
every swarm they were in.  A clean leave does the same at once.  Every key but the
allow-list also carries a Redis TTL (``PEXPIRE``), so nothing is left behind forever.

Heartbeats are written behind: a heartbeat records (node, deadline, zone) in this
replica's memory and is answered at once, with the node's entry count as of its previous
heartbeat here; every ``flush_interval_s`` (50 ms) the heartbeats held are written in one
pipeline, one ``EVALSHA`` per liveness bucket that sets every deadline and zone and answers
each node's entry count (``SCARD``), which the next answers use.  The deadline is the
heartbeat's own time plus its ttl, so writing it 50 ms later moves no eviction; a replica
that dies loses at most the heartbeats of its last 50 ms (the node's next heartbeat, to any
replica, writes its deadline again; the ttl is several heartbeats long).  A node this
replica has no count for (its first heartbeat here), and every heartbeat while Redis is
unreachable, waits for the write instead (the batch goes out at once): its answer is exact,
or a 503.  Expiry and leaves write what is held first.

Redis unreachable: every call raises :class:`SwarmStoreUnavailable` (503 + Retry-After;
announces a bencoded failure with ``retry in``), logged once per outage.  Redis restarted
with its data gone: announces of swarms this replica knows re-create the swarm's allow
key and go on; a heartbeat answers ``entries: 0`` (at the latest the node's second
heartbeat after the loss: the first one's write reads the count), and node daemons then
re-announce at once, so the swarm is rebuilt within a heartbeat or two.

Time is the wall clock (``time.time()``) of the replica, not the monotonic ``now``
callers pass, since deadlines are compared across processes: replicas' clocks must
agree to well within the heartbeat ttl (NTP).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from socket import AF_INET6, inet_ntoa, inet_ntop
from typing import Iterable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError
from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError

from modelcast.errors import Unavailable

from .announce import DEFAULT_ZONE, Announce, Peer, SwarmCounts
from .handout import sample_peers
from .swarm import NO_GATEWAYS, AnnounceResult, UnknownInfoHash

log = logging.getLogger("modelcast.tracker.swarm")

PREFIX = "mc:"
LIVE_BUCKETS = 16
TOMBSTONE_MS = 30_000
RETRY_IN_S = 2


class SwarmStoreUnavailable(Unavailable):
    """Redis cannot be reached: answered 503 with ``Retry-After`` (announces: a failure with ``retry in``)."""

    code = "unavailable"
    retry_after_s = float(RETRY_IN_S)


_OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)

# Shared Lua: drop one entry (its hash value ``old``) from swarm ``c`` and every index of it.
_DROP = r"""
local function split(v)
  local f = {}
  local i = 1
  for _ = 1, 5 do
    local j = string.find(v, "\t", i, true)
    f[#f + 1] = string.sub(v, i, j - 1)
    i = j + 1
  end
  f[#f + 1] = string.sub(v, i)
  return f
end
local function bname(f) return f[2] .. "\t" .. ((f[1] == "0") and "1" or "0") .. f[3] end
local function drop(c, addr, f, replacing, gateways)
  redis.call('HDEL', c .. ':p', addr)
  redis.call('ZREM', c .. ':t', addr)
  local b = bname(f)
  redis.call('SREM', c .. ':b:' .. b, addr)
  if redis.call('SCARD', c .. ':b:' .. b) == 0 then redis.call('SREM', c .. ':k', b) end
  redis.call('HINCRBY', c .. ':c', (f[1] == "0") and 'complete' or 'incomplete', -1)
  if gateways > 0 and not replacing and f[3] == "0" then
    local g = c .. ':g:' .. f[2]
    if redis.call('LREM', g, 0, addr) > 0 then
      for _, cb in ipairs({f[2] .. "\t10", f[2] .. "\t00"}) do
        for _, m in ipairs(redis.call('SRANDMEMBER', c .. ':b:' .. cb, gateways + 1)) do
          if redis.call('LLEN', g) >= gateways then break end
          if not redis.call('LPOS', g, m) then redis.call('RPUSH', g, m) end
        end
      end
      if redis.call('LLEN', g) == 0 then redis.call('SREM', c .. ':gz', f[2]) end
    end
  end
end
"""

# KEYS[1]: allow key of the swarm's canonical info-hash, KEYS[2]: its tombstone, KEYS[3]: "mc:{c}"
# ARGV: addr, left, zone, origin(0/1), node, keyhex, peer_id, event, now_ms, ttl_ms, numwant,
#       zone_gateways, sample_cap, key_ttl_ms
_ANNOUNCE = _DROP + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then return {'unknown'} end
  return {'missing'}
end
local c = KEYS[3]
local addr, left, zone, origin, node, keyhex, pid, event = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local now, ttl, numwant, gateways, cap, kttl = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local oldv = redis.call('HGET', c .. ':p', addr)
local old = oldv and split(oldv)
if event == 'stopped' then
  if old and (old[5] == '' or old[5] == keyhex) then drop(c, addr, old, false, gateways) end
else
  if event == 'completed' and (not old or old[1] ~= '0') then redis.call('HINCRBY', c .. ':c', 'downloaded', 1) end
  local f = {left, zone, origin, node, keyhex, pid}
  local same = old and bname(old) == bname(f)
  if same and not (old[5] ~= keyhex and old[6] ~= pid) then
    f[5] = old[5]  -- only a client restarted at the same address (new peer id) takes a new key
  end
  local value = table.concat(f, "\t")
  if same then
    redis.call('HSET', c .. ':p', addr, value)
  else
    if old then drop(c, addr, old, old[2] == zone and old[3] == origin, gateways) end
    redis.call('HSET', c .. ':p', addr, value)
    local b = bname(f)
    redis.call('SADD', c .. ':b:' .. b, addr)
    redis.call('SADD', c .. ':k', b)
    redis.call('HINCRBY', c .. ':c', (left == "0") and 'complete' or 'incomplete', 1)
    if gateways > 0 and origin == "0" then
      local g = c .. ':g:' .. zone
      if redis.call('LLEN', g) < gateways and not redis.call('LPOS', g, addr) then
        redis.call('RPUSH', g, addr)
        redis.call('SADD', c .. ':gz', zone)
      end
    end
  end
  redis.call('ZADD', c .. ':t', now, addr)
end
-- the per-peer TTL of plain clients, a few due entries per announce (node entries: the expiry loop)
local due = redis.call('ZRANGEBYSCORE', c .. ':t', '-inf', now - ttl, 'LIMIT', 0, 8)
for _, d in ipairs(due) do
  local v = redis.call('HGET', c .. ':p', d)
  if not v then redis.call('ZREM', c .. ':t', d)
  else
    local f = split(v)
    if f[4] == '' then drop(c, d, f, false, gateways) end
  end
end
local counts = redis.call('HMGET', c .. ':c', 'complete', 'incomplete', 'downloaded')
-- The peers as one string of records (kind, address, entry; lengths before each), so that the
-- answer is a handful of values to parse whatever numwant is.
local recs = {}
local function add(kind, members)
  if #members == 0 then return end
  local vals = redis.call('HMGET', c .. ':p', unpack(members))
  for i, m in ipairs(members) do
    local v = vals[i]
    if v then recs[#recs + 1] = kind .. string.char(#m) .. m .. string.char(math.floor(#v / 256), #v % 256) .. v end
  end
end
if event ~= 'stopped' and numwant > 0 then
  for _, b in ipairs(redis.call('SMEMBERS', c .. ':k')) do
    local n = redis.call('SCARD', c .. ':b:' .. b)
    if n <= cap then add('b', redis.call('SMEMBERS', c .. ':b:' .. b))
    else add('b', redis.call('SRANDMEMBER', c .. ':b:' .. b, cap)) end
  end
  if gateways > 0 then
    for _, z in ipairs(redis.call('SMEMBERS', c .. ':gz')) do add('g', redis.call('LRANGE', c .. ':g:' .. z, 0, -1)) end
  end
end
local out = {'ok', counts[1] or '0', counts[2] or '0', counts[3] or '0', table.concat(recs)}
for _, k in ipairs({':p', ':t', ':c', ':k', ':gz', ':b:' .. bname({left, zone, origin}), ':g:' .. zone}) do
  redis.call('PEXPIRE', c .. k, kttl)  -- a swarm nobody announces to goes by itself
end
return out
"""

# KEYS[1]: "mc:{c}"; ARGV: node id ("" : any owner), zone_gateways, last seen at most (ms, or "+inf"), addresses...
_REMOVE = _DROP + r"""
local c = KEYS[1]
local gateways = tonumber(ARGV[2])
local removed = 0
for i = 4, #ARGV do
  local v = redis.call('HGET', c .. ':p', ARGV[i])
  local seen = tonumber(redis.call('ZSCORE', c .. ':t', ARGV[i]) or '0')
  if v and (ARGV[3] == '+inf' or seen <= tonumber(ARGV[3])) then
    local f = split(v)
    if ARGV[1] == '' or f[4] == ARGV[1] then
      drop(c, ARGV[i], f, false, gateways)
      removed = removed + 1
    end
  end
end
return removed
"""

# KEYS[1]: "mc:{c}"; ARGV: cutoff (ms), zone_gateways: drop plain clients last seen before the cutoff;
# answer the stale node entries (address, node id), which go only if their node has no live heartbeat
_SWEEP = _DROP + r"""
local c = KEYS[1]
local gateways = tonumber(ARGV[2])
local out = {0}
for _, d in ipairs(redis.call('ZRANGEBYSCORE', c .. ':t', '-inf', '(' .. ARGV[1], 'LIMIT', 0, 512)) do
  local v = redis.call('HGET', c .. ':p', d)
  if not v then redis.call('ZREM', c .. ':t', d)
  else
    local f = split(v)
    if f[4] == '' then drop(c, d, f, false, gateways); out[1] = out[1] + 1
    else out[#out + 1] = d; out[#out + 1] = f[4] end
  end
end
return out
"""

# KEYS[1]: a liveness bucket, KEYS[2]: its zone hash; ARGV: now_ms, node ids...: those still due, removed
_CLAIM = r"""
local won = {}
for i = 2, #ARGV do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) <= tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    won[#won + 1] = ARGV[i]
  end
end
return won
"""


# KEYS[1]: a liveness bucket, KEYS[2]: its zone hash; ARGV[1]: "node id\tdeadline ms\tzone" records, one
# per line (one argument: redis-py packs each argument in Python), zone "" keeping the node's zone (the
# default one for a node without any): every deadline and zone written; answers each node's entry
# count, in order, joined by ","
_HEARTBEATS = r"""
local out = {}
for node, deadline, zone in string.gmatch(ARGV[1], '([^\t\n]+)\t(%%d+)\t([^\n]*)') do
  redis.call('ZADD', KEYS[1], deadline, node)
  if zone == '' then redis.call('HSETNX', KEYS[2], node, '%s')
  else redis.call('HSET', KEYS[2], node, zone) end
  out[#out + 1] = redis.call('SCARD', KEYS[1] .. ':e:' .. node)
end
return table.concat(out, ',')
""" % DEFAULT_ZONE

# A node's entry count is kept this long after its last heartbeat here (then its next heartbeat waits
# for its write); two generations of counts, swapped each period, so forgetting costs nothing per request.
COUNTS_KEPT_S = 60.0
FLUSH_INTERVAL_S = 0.05


def _swarm_key(canon: bytes) -> str:
    return f"{PREFIX}{{{canon.hex()}}}"


def _allow_key(ih: bytes) -> str:
    return f"{PREFIX}{{{ih.hex()}}}:a"


def _tomb_key(ih: bytes) -> str:
    return f"{PREFIX}{{{ih.hex()}}}:x"


def _node_key(node_id: str) -> str:
    return f"{_live_key(node_id)}:e:{node_id}"


def _live_key(node_id: str) -> str:
    return f"{PREFIX}{{live:{zlib.crc32(node_id.encode()) % LIVE_BUCKETS}}}"


def _peer(addr: bytes, value: bytes) -> Peer:
    """The :class:`Peer` of an entry: its compact address and its hash value."""
    left, zone, origin, _node, _key, pid = value.split(b"\t", 5)
    if len(addr) == 6:
        ip, port = inet_ntoa(addr[:4]), addr[4] << 8 | addr[5]
    else:
        ip, port = inet_ntop(AF_INET6, addr[:16]), addr[16] << 8 | addr[17]
    # The address is already compact: made as Peer() would make it, without packing it again.
    return tuple.__new__(Peer, (pid, ip, port, int(left), zone.decode(), origin == b"1", addr))


class _Batcher:
    """Auto-pipelining: the commands of the requests that arrive in one turn of the event loop go out
    as one pipeline (one write, one read), each request's replies handed back to it.

    A request still costs one round trip of its own time, but the client's per-call cost (a
    connection from the pool, a pipeline object, a socket write and read) is paid once per turn
    of the loop instead of once per request: with many connections in flight that cost, not
    Redis, was the limit.  A reply that is an error is handed back as the exception object
    (``raise_on_error=False``); Redis unreachable fails every request of the batch.
    """

    def __init__(self, store: "RedisSwarmStore") -> None:
        self._store = store
        self._pending: list[tuple] = []
        self._tasks: set[asyncio.Task] = set()

    def submit(self, build) -> "asyncio.Future[list]":
        """``build(pipe)`` queues this request's commands; the future answers their replies, in order."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((build, fut))
        return fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple]) -> None:
        pipe = self._store._r.pipeline(transaction=False)
        spans: list[tuple[int, int] | None] = []
        try:
            for build, fut in batch:
                start = len(pipe.command_stack)
                try:
                    build(pipe)
                except Exception as exc:  # noqa: BLE001 - handed to its request
                    del pipe.command_stack[start:]
                    fut.set_exception(exc)
                    spans.append(None)
                    continue
                spans.append((start, len(pipe.command_stack)))
            try:
                results = await self._store._run(pipe.execute(raise_on_error=False))
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(SwarmStoreUnavailable(str(exc)) if isinstance(exc, SwarmStoreUnavailable)
                                          else exc)
                if not isinstance(exc, Exception):
                    raise
                return
        finally:
            await pipe.reset()
        for span, (_, fut) in zip(spans, batch):
            if span is not None and not fut.done():
                fut.set_result(results[span[0]:span[1]])


def _raise_errors(replies: list) -> list:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


class RedisSwarmStore:
    """Every swarm, node liveness and the allow-list in Redis; see the module docstring for the keys."""

    def __init__(self, url: str, *, zone_gateways: int = -1, peer_ttl_s: float = 90.0,
                 rng: random.Random | None = None, client: aioredis.Redis | None = None,
                 caller_clock: bool = False, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        # caller_clock: take time from the ``now`` callers pass (tests drive expiry with it);
        # else the wall clock, which every replica shares (``now`` is a monotonic clock).
        self._caller_clock = caller_clock
        self.url = url
        self.zone_gateways = zone_gateways
        self.peer_ttl_s = peer_ttl_s
        self._rng = rng or random.Random()
        self._r = client or aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2.0,
                                                     retry_on_timeout=False, health_check_interval=0)
        self._announce_sha = self._r.register_script(_ANNOUNCE).sha  # EVALSHA'd in batches (_Batcher)
        self._batch = _Batcher(self)
        self._remove = self._r.register_script(_REMOVE)
        self._claim = self._r.register_script(_CLAIM)
        self._sweep = self._r.register_script(_SWEEP)
        self._heartbeats_sha = self._r.register_script(_HEARTBEATS).sha
        self._swept_at = 0.0
        # Heartbeats written behind (see the module docstring): node id -> (deadline ms, zone or "").
        self.flush_interval_s = flush_interval_s
        self._held: dict[str, tuple[int, str]] = {}
        self._waiters: dict[str, list[asyncio.Future]] = {}  # heartbeats answered once written
        self._flush_handle: asyncio.Handle | None = None
        self._flushing: asyncio.Task | None = None
        # Each node's entry count, from the last write of its heartbeat (and this replica's
        # announces and leaves since); two generations, the older forgotten each COUNTS_KEPT_S.
        self._counts: dict[str, int] = {}
        self._counts_old: dict[str, int] = {}
        self._counts_swapped = time.monotonic()
        self._changed: set[str] = set()  # counts changed here while a write was in flight
        # This replica's view of the allow-list (info-hash -> canonical key), from its database
        # and from Redis; Redis's copy is re-made from it after Redis lost its data.
        self._canon: dict[bytes, bytes] = {}
        self.announces = 0
        self._down_since: float | None = None
        # Figures for metrics and /v1/stats, refreshed by the expiry loop (never on a request).
        self._zones: dict[str, int] = {}
        self._active = 0
        self._peer_counts: dict[tuple[str, bool, bool], int] = {}
        self._stats_at = 0.0

    # ---- outages -----------------------------------------------------------------------
    def _outage(self, exc: BaseException) -> SwarmStoreUnavailable:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("swarm store %s is unreachable (%s: %s); answering 503 with Retry-After (announces: "
                        "retry in %d s) until it is back", self.url, exc.__class__.__name__, exc, RETRY_IN_S)
        return SwarmStoreUnavailable(f"swarm store is unreachable; retry in {RETRY_IN_S} s")

    def _up(self) -> None:
        if self._down_since is not None:
            log.info("swarm store %s is reachable again after %.1f s", self.url, time.monotonic() - self._down_since)
            self._down_since = None

    async def _run(self, coro):
        try:
            result = await coro
        except _OUTAGE_ERRORS as exc:
            raise self._outage(exc) from None
        self._up()
        return result

    async def ping(self) -> None:
        await self._run(self._r.ping())

    async def close(self) -> None:
        try:
            await self.flush()  # the heartbeats held go out before the connection does
        except Exception:  # noqa: BLE001 - closing anyway; the outage is logged
            pass
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        await self._r.aclose()

    # ---- allow-list --------------------------------------------------------------------
    def is_allowed(self, info_hash: bytes) -> bool:
        return info_hash in self._canon

    async def allow(self, keys: Iterable[bytes]) -> None:
        """Accept announces for ``keys`` (one torrent's info-hashes) here and in Redis."""
        keys = list(keys)
        for k in keys:
            if len(k) != 20:
                raise ValueError(f"tracker key must be 20 bytes, got {len(k)}")
        canon = next((self._canon[k] for k in keys if k in self._canon), keys[0] if keys else None)
        if canon is None:
            return
        for k in keys:
            self._canon.setdefault(k, canon)
        await self._write_allow(keys, canon)

    async def _write_allow(self, keys: list[bytes], canon: bytes) -> None:
        async with self._r.pipeline(transaction=False) as pipe:
            for k in dict.fromkeys([canon, *keys]):
                pipe.set(_allow_key(k), canon.hex())
                pipe.delete(_tomb_key(k))
            await self._run(pipe.execute())

    async def allow_many(self, torrents: Iterable[Iterable[bytes]]) -> None:
        """:meth:`allow` for many torrents in one pipeline (start-up)."""
        writes: list[tuple[bytes, bytes]] = []
        for keys in torrents:
            keys = list(keys)
            if not keys:
                continue
            canon = next((self._canon[k] for k in keys if k in self._canon), keys[0])
            for k in keys:
                self._canon.setdefault(k, canon)
                writes.append((k, canon))
        for i in range(0, len(writes), 1000):
            async with self._r.pipeline(transaction=False) as pipe:
                for k, canon in writes[i:i + 1000]:
                    pipe.set(_allow_key(k), canon.hex())
            await self._run(pipe.execute())

    async def disallow(self, keys: Iterable[bytes]) -> int:
        """Stop accepting ``keys`` (their artifact was deleted) on every replica; empty the swarm."""
        keys = set(keys)
        known = [k for k in keys if k in self._canon]
        canons = {self._canon.pop(k) for k in known}
        async with self._r.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.delete(_allow_key(k))
                pipe.set(_tomb_key(k), b"1", px=TOMBSTONE_MS)
            await self._run(pipe.execute())
        for canon in canons:
            if canon in self._canon.values():
                continue  # another key of it (a hybrid's other hash) is still allowed
            addrs = await self._run(self._r.hkeys(_swarm_key(canon) + ":p"))
            if addrs:
                await self._run(self._remove(keys=[_swarm_key(canon)], args=["", self.zone_gateways, "+inf", *addrs]))
        return len(known)

    async def _canonical(self, info_hash: bytes) -> bytes:
        canon = self._canon.get(info_hash)
        if canon is not None:
            return canon
        # Published through another replica, not yet in this one's database view.
        found = await self._run(self._r.get(_allow_key(info_hash)))
        if found is None:
            raise UnknownInfoHash(f"unknown info_hash {info_hash.hex()}: no artifact published to this registry has it")
        canon = bytes.fromhex(found.decode())
        self._canon[info_hash] = canon
        return canon

    # ---- announces ---------------------------------------------------------------------
    async def announce(self, a: Announce, ip: str, now: float) -> AnnounceResult:
        canon = await self._canonical(a.info_hash)
        peer = Peer(a.peer_id, ip, a.port, a.left, a.zone, a.origin_seed)
        cap = a.numwant + 1  # the requester may be among them
        ttl_ms = int(self.peer_ttl_s * 1000)
        args = [peer.packed, a.left, a.zone, 1 if a.origin_seed else 0, a.node or "",
                (a.key or "").encode().hex(), a.peer_id, a.event or "", 0, ttl_ms, a.numwant,
                self.zone_gateways, cap, 2 * ttl_ms]
        # Every key the script touches carries the swarm's tag (the canonical key's allow key
        # too: the alias was resolved above), so a Redis Cluster finds them on one shard.
        keys = [_allow_key(canon), _tomb_key(canon), _swarm_key(canon)]
        node_entry = None
        if a.node is not None and a.event != "stopped":
            node_entry = (_node_key(a.node), canon.hex() + ":" + peer.packed.hex())
        sha = self._announce_sha

        def build(pipe) -> None:
            pipe.evalsha(sha, 3, *keys, *args)
            if node_entry is not None:
                pipe.sadd(node_entry[0], node_entry[1])
                pipe.pexpire(node_entry[0], 2 * ttl_ms)

        remade = loaded = added = False
        while True:
            args[8] = self._ms(now)
            replies = await self._batch.submit(build)
            out = replies[0]
            if node_entry is not None and replies[1] == 1:
                added = True
            if isinstance(out, NoScriptError) and not loaded:
                # Redis restarted (scripts gone): load it once, send again.
                loaded = True
                await self._run(self._r.script_load(_ANNOUNCE))
                continue
            _raise_errors(replies)
            status = out[0]
            if status == b"ok":
                break
            if status == b"missing" and not remade and a.info_hash in self._canon:
                # Redis lost its data (restarted empty): this replica knows the swarm; re-make it.
                remade = True
                await self._write_allow([k for k, c in self._canon.items() if c == canon], canon)
                continue
            self._canon.pop(a.info_hash, None)
            raise UnknownInfoHash(f"unknown info_hash {a.info_hash.hex()}: no artifact published to this "
                                  "registry has it")
        self.announces += 1
        if added:
            self._count_changed(a.node, 1)
        counts = SwarmCounts(int(out[1]), int(out[2]), int(out[3]))
        buckets: dict[tuple[str, bool, bool], list[Peer]] = {}
        gateways: dict[str, list[Peer]] = {}
        blob = out[4]
        i, end = 0, len(blob)
        while i < end:
            kind, n = blob[i], blob[i + 1]
            addr = blob[i + 2:i + 2 + n]
            i += 2 + n
            m = blob[i] << 8 | blob[i + 1]
            p = _peer(addr, blob[i + 2:i + 2 + m])
            i += 2 + m
            if kind == 98:  # b"b": a bucket's peers (all of it, or numwant + 1 drawn at random)
                key = (p.zone, p.complete, p.origin_seed)
                bucket = buckets.get(key)
                if bucket is None:
                    buckets[key] = [p]
                else:
                    bucket.append(p)
            else:  # b"g": a zone's gateway
                gateways.setdefault(p.zone, []).append(p)
        if self.zone_gateways == 0:
            gw: dict[str, list[Peer]] | None = NO_GATEWAYS if a.node is not None else None
        elif self.zone_gateways < 0 or len(gateways) < 2:
            gw = None
        else:
            gw = gateways
        chosen = (sample_peers(buckets, peer, a.numwant, self._rng, gw) if a.numwant > 0 and a.event != "stopped"
                  else [])
        return AnnounceResult(chosen, counts)

    async def scrape(self, info_hashes: Iterable[bytes]) -> dict[bytes, SwarmCounts]:
        hashes = [ih for ih in info_hashes if ih in self._canon]
        if not hashes:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for ih in hashes:
                pipe.hmget(_swarm_key(self._canon[ih]) + ":c", "complete", "incomplete", "downloaded")
            rows = await self._run(pipe.execute())
        return {ih: SwarmCounts(*(int(v or 0) for v in row)) for ih, row in zip(hashes, rows)}

    async def peers_of(self, info_hash: bytes) -> list[Peer]:
        canon = await self._canonical(info_hash)
        entries = await self._run(self._r.hgetall(_swarm_key(canon) + ":p"))
        return [_peer(addr, value) for addr, value in entries.items()]

    # ---- node liveness -------------------------------------------------------------------
    def heartbeat(self, node_id: str, now: float, ttl: float, zone: str | None = None) -> "int | asyncio.Future[int]":
        """Keep every entry of ``node_id`` alive for ``ttl`` s; the number of entries it has (0 after a data loss).

        Written behind (see the module docstring): answered at once with the count as of the
        node's previous heartbeat here; a future of the exact count for a node this replica has
        no count for, and while Redis is unreachable (then it fails with a 503's error).
        """
        if ttl <= 0:
            raise ValueError(f"heartbeat ttl must be positive, got {ttl}")
        self._held[node_id] = (self._ms(now, ttl), zone or "")
        if self._down_since is None:
            count = self._counts.get(node_id)
            if count is None:
                count = self._counts_old.get(node_id)
            if count is not None:
                if self._flush_handle is None and self._flushing is None:
                    self._schedule_flush(False)
                return count
        fut = asyncio.get_running_loop().create_future()
        waiters = self._waiters.get(node_id)
        if waiters is None:
            self._waiters[node_id] = [fut]
        else:
            waiters.append(fut)
        if self._flushing is None:
            self._schedule_flush(True)
        return fut

    def _count_changed(self, node_id: str, delta: int | None) -> None:
        """This replica changed the entries of ``node_id``: ``delta`` more, or None for none left."""
        count = self._counts.get(node_id)
        if count is None:
            count = self._counts_old.pop(node_id, None)
            if count is None:
                return  # no count here: the node's next heartbeat waits for one
        self._counts[node_id] = 0 if delta is None else max(0, count + delta)
        if self._flushing is not None:
            self._changed.add(node_id)

    def _schedule_flush(self, soon: bool) -> None:
        """The next write: at once (someone waits for it), or after ``flush_interval_s``."""
        if self._flush_handle is not None:
            if not soon or self._flush_soon:
                return
            self._flush_handle.cancel()
        loop = asyncio.get_running_loop()
        self._flush_soon = soon
        self._flush_handle = (loop.call_soon(self._start_flush) if soon
                              else loop.call_later(self.flush_interval_s, self._start_flush))

    _flush_soon = False
    _write_failing = False

    def _start_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._flushing is not None or not (self._held or self._waiters):
            return
        self._flushing = asyncio.get_running_loop().create_task(self._flush())
        self._flushing.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task) -> None:
        if task.cancelled():
            if self._flushing is task:  # cancelled before it ran (the loop is closing)
                self._flushing = None
        else:
            task.exception()  # handed to its waiters (and an outage logged): not an unretrieved error
        if self._flushing is None and (self._waiters or self._held):
            self._schedule_flush(bool(self._waiters))

    async def _wait_flushed(self) -> None:
        """Until no write is in flight; what it raised is its waiters' concern."""
        while self._flushing is not None:  # cleared by the write itself when it ends
            try:
                await asyncio.shield(self._flushing)
            except Exception:  # noqa: BLE001
                pass

    async def flush(self) -> None:
        """Write the heartbeats held here now (after a write in flight); raises what the write raised."""
        await self._wait_flushed()
        self._start_flush()
        if self._flushing is not None:
            await asyncio.shield(self._flushing)

    async def _flush(self) -> None:
        try:
            await self._write_held()
        finally:
            self._flushing = None

    async def _write_held(self) -> None:
        held, self._held = self._held, {}
        waiters, self._waiters = self._waiters, {}
        self._changed.clear()
        args: dict[int, list[str]] = {}
        for node, (deadline, zone) in held.items():
            record = f"{node}\t{deadline}\t{zone}"
            bucket = args.get(b := zlib.crc32(node.encode()) % LIVE_BUCKETS)
            if bucket is None:
                args[b] = [record]
            else:
                bucket.append(record)
        try:
            counts = await self._write_heartbeats(args) if args else {}
        except BaseException as exc:
            if isinstance(exc, SwarmStoreUnavailable):
                for node, value in held.items():  # kept for the next write (newer heartbeats win)
                    self._held.setdefault(node, value)
            elif not self._write_failing and isinstance(exc, Exception):
                self._write_failing = True  # one line until a write succeeds again
                log.error("writing %d heartbeats to the swarm store failed: %s: %s", len(held),
                          exc.__class__.__name__, exc)
            for futs in waiters.values():
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else SwarmStoreUnavailable(str(exc)))
            raise
        self._write_failing = False
        now = time.monotonic()
        if now - self._counts_swapped >= COUNTS_KEPT_S:
            self._counts_old, self._counts, self._counts_swapped = self._counts, {}, now
        known, changed = self._counts, self._changed
        for node, n in counts.items():
            if node in changed:  # an announce or leave here since the count was read: that one is newer
                n = known.get(node, self._counts_old.pop(node, n))
            known[node] = n
        self._changed = set()
        for node, futs in waiters.items():
            n = known.get(node)
            if n is None:
                n = self._counts_old.get(node, 0)
            for fut in futs:
                if not fut.done():
                    fut.set_result(n)

    async def _write_heartbeats(self, args: dict[int, list[str]]) -> dict[str, int]:
        """One pipeline: per liveness bucket one ``EVALSHA`` of the heartbeats script; node id -> entry count."""
        for attempt in (0, 1):
            async with self._r.pipeline(transaction=False) as pipe:
                for b, bucket in args.items():
                    live = f"{PREFIX}{{live:{b}}}"
                    pipe.evalsha(self._heartbeats_sha, 2, live, live + ":z", "\n".join(bucket))
                replies = await self._run(pipe.execute(raise_on_error=False))
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                # Redis restarted (scripts gone): load it once, send again.
                await self._run(self._r.script_load(_HEARTBEATS))
                continue
            break
        counts: dict[str, int] = {}
        for bucket, reply in zip(args.values(), _raise_errors(replies)):
            for record, n in zip(bucket, reply.split(b",")):
                counts[record.partition("\t")[0]] = int(n)
        return counts

    async def leave(self, node_id: str) -> int:
        """Remove every entry of ``node_id`` from every swarm at once; how many went."""
        self._held.pop(node_id, None)
        await self._wait_flushed()  # a heartbeat in flight must not land after the leave
        self._held.pop(node_id, None)
        live = _live_key(node_id)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zrem(live, node_id)
            pipe.hdel(live + ":z", node_id)
            await self._run(pipe.execute())
        return await self._remove_entries(node_id)

    async def _remove_entries(self, node_id: str) -> int:
        nk = _node_key(node_id)
        members = await self._run(self._r.smembers(nk))
        by_swarm: dict[str, list[bytes]] = {}
        for m in members:
            canon, _, addr = m.decode().partition(":")
            by_swarm.setdefault(canon, []).append(bytes.fromhex(addr))
        async with self._r.pipeline(transaction=False) as pipe:
            for canon, addrs in by_swarm.items():
                await self._remove(keys=[_swarm_key(bytes.fromhex(canon))], args=[node_id, self.zone_gateways, "+inf", *addrs],
                             client=pipe)
            pipe.delete(nk)
            result = await self._run(pipe.execute())
        self._count_changed(node_id, None)
        return sum(int(n) for n in result[:-1])

    async def _sweep_silent(self, now_ms: int, ttl_s: float) -> int:
        """The per-peer TTL: plain clients silent for ``ttl_s``, and node entries as silent whose node has no
        live heartbeat (a live node's heartbeat keeps its entries; its lapse takes them all)."""
        canons = sorted(set(self._canon.values()))
        if not canons:
            return 0
        cutoff = now_ms - int(ttl_s * 1000)
        async with self._r.pipeline(transaction=False) as pipe:
            for canon in canons:
                await self._sweep(keys=[_swarm_key(canon)], args=[cutoff, self.zone_gateways], client=pipe)
            rows = await self._run(pipe.execute())
        removed = sum(int(row[0]) for row in rows)
        stale = [(canon, row[i], row[i + 1].decode()) for canon, row in zip(canons, rows) for i in range(1, len(row), 2)]
        if stale:
            async with self._r.pipeline(transaction=False) as pipe:
                for _, _, node in stale:
                    pipe.zscore(_live_key(node), node)
                scores = await self._run(pipe.execute())
            dead = [(canon, addr, node) for (canon, addr, node), s in zip(stale, scores) if s is None or s <= now_ms]
            if dead:
                async with self._r.pipeline(transaction=False) as pipe:
                    for canon, addr, node in dead:
                        await self._remove(keys=[_swarm_key(canon)], args=[node, self.zone_gateways, cutoff - 1, addr],
                                           client=pipe)
                    removed += sum(int(n) for n in await self._run(pipe.execute()))
        return removed

    async def is_live(self, node_id: str, now: float | None = None) -> bool:
        await self.flush()
        score = await self._run(self._r.zscore(_live_key(node_id), node_id))
        return score is not None and score > self._ms(time.monotonic() if now is None else now)

    def _ms(self, now: float, plus: float = 0.0) -> int:
        return int(((now if self._caller_clock else time.time()) + plus) * 1000)

    # ---- expiry ------------------------------------------------------------------------
    async def expire(self, now: float, ttl_s: float) -> int:
        """Claim the nodes whose heartbeat lapsed (one replica wins each) and drop their entries."""
        await self.flush()  # a heartbeat held here is not due
        now_ms = self._ms(now)
        buckets = [f"{PREFIX}{{live:{b}}}" for b in range(LIVE_BUCKETS)]
        async with self._r.pipeline(transaction=False) as pipe:
            for key in buckets:
                pipe.zrangebyscore(key, "-inf", now_ms, start=0, num=256)
            due = await self._run(pipe.execute())
        removed = 0
        claims = [(key, nodes) for key, nodes in zip(buckets, due) if nodes]
        if claims:
            async with self._r.pipeline(transaction=False) as pipe:
                for key, nodes in claims:
                    await self._claim(keys=[key, key + ":z"], args=[now_ms, *nodes], client=pipe)
                won = await self._run(pipe.execute())
            for nodes in won:
                for node in nodes:
                    removed += await self._remove_entries(node.decode())
        # The per-peer TTL is minutes long: a sweep of every swarm each second is plenty.
        if self._caller_clock or time.monotonic() - self._swept_at >= 1.0:
            self._swept_at = time.monotonic()
            removed += await self._sweep_silent(now_ms, ttl_s)
        if self._caller_clock or time.monotonic() - self._stats_at >= 2.0:
            await self._refresh_stats()
        return removed

    async def _refresh_stats(self) -> None:
        self._stats_at = time.monotonic()
        async with self._r.pipeline(transaction=False) as pipe:
            for b in range(LIVE_BUCKETS):
                pipe.hvals(f"{PREFIX}{{live:{b}}}:z")
            canons = sorted(set(self._canon.values()))
            for canon in canons:
                pipe.smembers(_swarm_key(canon) + ":k")
            rows = await self._run(pipe.execute())
        zones: dict[str, int] = {}
        for vals in rows[:LIVE_BUCKETS]:
            for z in vals:
                zones[z.decode()] = zones.get(z.decode(), 0) + 1
        bucket_names = [(canon, b) for canon, names in zip(canons, rows[LIVE_BUCKETS:]) for b in names]
        counts: dict[tuple[str, bool, bool], int] = {}
        active: set[bytes] = set()
        if bucket_names:
            async with self._r.pipeline(transaction=False) as pipe:
                for canon, b in bucket_names:
                    pipe.scard(_swarm_key(canon).encode() + b":b:" + b)
                sizes = await self._run(pipe.execute())
            for (canon, b), n in zip(bucket_names, sizes):
                if not n:
                    continue
                zone, flags = b.decode().split("\t")
                key = (zone, flags[0] == "1", flags[1] == "1")
                counts[key] = counts.get(key, 0) + int(n)
                active.add(canon)
        self._zones, self._peer_counts, self._active = zones, counts, len(active)

    # ---- figures (as of the last refresh, at most a few seconds old) -------------------
    def live_nodes_by_zone(self) -> dict[str, int]:
        return dict(self._zones)

    def live_nodes(self) -> int:
        return sum(self._zones.values())

    def peer_counts(self) -> dict[tuple[str, bool, bool], int]:
        return dict(self._peer_counts)

    def swarm_totals(self) -> tuple[int, int]:
        """(published swarms, swarms with at least one peer)."""
        return len(set(self._canon.values())), self._active

    def active_swarms(self) -> int:
        return self._active
