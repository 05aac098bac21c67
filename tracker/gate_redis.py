"""The first-copy gate and relay registrations in Redis, shared by every replica (``--swarm-store redis://``).

Same decisions as the in-process :class:`tracker.firstcopy.FirstCopyGate` (every rule of that
module's docstring: the window, :data:`~tracker.firstcopy.MAX_REFUSALS` per served range, zones,
relay-from to the first requester of another zone, relay-to push targets in turn, only proven
nodes counted), but a node that asks one replica is refused by another: the gate's books are
one Lua script's, run with ``EVALSHA`` (one round trip per admit, auto-pipelined with the
replica's announces and heartbeats), on the connection and with the outage handling of
:class:`tracker.swarm_redis.RedisSwarmStore` (Redis down: 503 + Retry-After, one log line per
outage).  A request that names no zone (or comes from no proven node) is answered at once,
without Redis: it is served and forgotten, as in process.

Key schema (prefix ``mc:``; one hash tag per artifact, so a Redis Cluster keeps each
artifact's gate on one shard)::

    mc:{g:<digest>}:r:<path>   ZSET  served ranges of one file, by first byte:
                                     "<start>\t<seq>\t<end>\t<at ms>\t<zone>\t<holder URL>\t<holder node>"
    mc:{g:<digest>}:L          HASH  path -> the longest range remembered (bounds the covering search)
    mc:{g:<digest>}:o          ZSET  "<range member>\t<path>" by time served: expiry and the size cap
    mc:{g:<digest>}:n          STRING sequence of range members
    mc:{g:<digest>}:f          HASH  "<path>\t<start>\t<end>" -> refusals of that range in the window
    mc:{g:<digest>}:fo         ZSET  the same fields by first refusal: their expiry
    mc:{g:<digest>}:zs         ZSET  zones with pulling nodes (first seen): at most MAX_ZONES
    mc:{g:<digest>}:z:<zone>   ZSET  "<relay URL>\t<node id>" of the zone's nodes that asked, by last ask:
                                     at most MAX_NODES_PER_ZONE, the least recent dropped first
    mc:{g:<digest>}:t          HASH  zone -> the push-target turn (round robin)

Every key expires (``PEXPIRE``) two windows after the artifact's last admit, which bounds
the number of artifacts remembered (in process: MAX_ARTIFACTS); an artifact's served ranges
and refusals are capped at ``max_ranges`` each (the oldest dropped first).

Relay registrations (tracker/relaytokens.py) live in Redis too, so a relay URL a node
registered with its heartbeat on one replica is believed, and handed out with a token, by
every replica::

    mc:{ru:<relay URL>}        STRING the node id that registered the URL (newest wins)
    mc:{rn:<node id>}          STRING the node's URL

Both expire :data:`REG_TTL_S` after the last write; a replica re-writes a node's
registration when it changes, or at most every :data:`REG_REFRESH_S` seconds as the node
heartbeats (not on every heartbeat).  A replica believes a URL it read from Redis for
:data:`BELIEVE_CACHE_S` seconds without asking again, so the web seed costs one round trip per
admit: registrations, moves and forgets reach the other replicas within those seconds.
The gate stores each relay URL with the node id it was registered by, so a replica makes
tokens for relay targets that registered on another replica without a lookup.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from redis.exceptions import NoScriptError

from .firstcopy import CROWDED, ELSEWHERE, MAX_NODES_PER_ZONE, MAX_REFUSALS, MAX_ZONES, SERVE, Admission
from .relaytokens import RelayRegistry, plain_relay_url, url_host_is
from .swarm_redis import PREFIX, _raise_errors

if TYPE_CHECKING:
    from .swarm_redis import RedisSwarmStore


REG_TTL_S = 120.0
REG_REFRESH_S = 20.0
BELIEVE_CACHE_S = 5.0
MAX_BELIEVED = 100_000

# KEYS[1]: "mc:{g:<digest>}"
# ARGV: path, start, end, first_copy (0/1), zone, relay URL ('' none), relay node, now ms, window ms,
#       max ranges, max refusals, max nodes per zone, max zones, key ttl ms, solo (0/1), node id ('' none)
# Answers {'elsewhere'}, {'from', url, node}, {'crowded'} (solo, others pulling), or
# {'serve', url1, node1, url2, node2, ...} (push targets).
_ADMIT = r"""
local P = KEYS[1]
local path, s, e, fc, zone, relay, rnode = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local now, win, maxr, maxf, maxn, maxz, kttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local old = now - win
local O, F, FO, L, ZS, T = P .. ':o', P .. ':f', P .. ':fo', P .. ':L', P .. ':zs', P .. ':t'
local function opath(v)
  local i = 0
  for _ = 1, 7 do i = string.find(v, "\t", i + 1, true) end
  return string.sub(v, i + 1), string.sub(v, 1, i - 1)
end
local function tab(v)
  local i = string.find(v, "\t", 1, true)
  return string.sub(v, 1, i - 1), string.sub(v, i + 1)
end
local function fields(v)
  local f = {}
  for x in string.gmatch(v, "([^\t]*)\t?") do f[#f + 1] = x end
  return f
end
-- Expiry (older than the window) and the size caps, oldest first.
local gone = redis.call('ZRANGEBYSCORE', O, '-inf', '(' .. old)
local over = redis.call('ZCARD', O) - #gone - maxr
if over > 0 then gone = redis.call('ZRANGE', O, 0, #gone + over - 1) end
for _, v in ipairs(gone) do
  local p, m = opath(v)
  redis.call('ZREM', P .. ':r:' .. p, m)
  redis.call('ZREM', O, v)
end
local fgone = redis.call('ZRANGEBYSCORE', FO, '-inf', '(' .. old)
local fover = redis.call('ZCARD', FO) - #fgone - maxr
if fover > 0 then fgone = redis.call('ZRANGE', FO, 0, #fgone + fover - 1) end
for _, v in ipairs(fgone) do
  redis.call('HDEL', F, v)
  redis.call('ZREM', FO, v)
end
local touched = {O, F, FO, L, ZS, T, P .. ':n', P .. ':r:' .. path}
local function remember(z, url, node)
  local seq = redis.call('INCR', P .. ':n')
  local m = string.format('%d\t%012d\t%d\t%d\t%s\t%s\t%s', s, seq, e, now, z, url, node)
  redis.call('ZADD', P .. ':r:' .. path, s, m)
  redis.call('ZADD', O, now, m .. "\t" .. path)
  local len = e - s + 1
  local had = tonumber(redis.call('HGET', L, path) or '0')
  if len > had then redis.call('HSET', L, path, len) end
end
-- The requester's zone is pulling this artifact: remember its relay URL (the newest last).
if relay ~= '' then
  local zk = P .. ':z:' .. zone
  local known = redis.call('ZSCORE', ZS, zone)
  if known or redis.call('ZCARD', ZS) < maxz then
    if not known then redis.call('ZADD', ZS, now, zone) end
    redis.call('ZADD', zk, now, relay .. "\t" .. rnode)
    local n = redis.call('ZCARD', zk)
    if n > maxn then redis.call('ZREMRANGEBYRANK', zk, 0, n - maxn - 1) end
    touched[#touched + 1] = zk
  end
end
-- Every proven node that asks is noted; a solo requester (a node's URL seed) is served
-- only while no other node asked within the window.
if ARGV[16] ~= '' then
  local A = P .. ':a'
  redis.call('ZADD', A, now, ARGV[16])
  redis.call('ZREMRANGEBYSCORE', A, '-inf', '(' .. old)
  local n = redis.call('ZCARD', A)
  if n > maxn then redis.call('ZREMRANGEBYRANK', A, 0, n - maxn - 1) end
  touched[#touched + 1] = A
  if ARGV[15] == '1' and n > 1 then
    for _, k in ipairs(touched) do redis.call('PEXPIRE', k, kttl) end
    return {'crowded'}
  end
end
local decision = 'serve'
local from, fromnode
if fc == '1' then
  local longest = tonumber(redis.call('HGET', L, path) or '0')
  local covering = {}
  if longest > 0 then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. ':r:' .. path, e - longest + 1, s)) do
      local f = fields(m)
      if tonumber(f[3]) >= e and tonumber(f[4]) >= old then covering[#covering + 1] = f end
    end
  end
  local field = path .. "\t" .. s .. "\t" .. e
  local refused = tonumber(redis.call('HGET', F, field) or '0')
  if #covering > 0 and refused < maxf then
    local same = false
    for _, f in ipairs(covering) do if f[5] == zone then same = true break end end
    if same then
      decision = 'elsewhere'
    else
      for _, f in ipairs(covering) do
        if f[6] ~= '' then from, fromnode = f[6], f[7] break end
      end
      if from then decision = 'from' end
    end
    if decision ~= 'serve' then
      if refused == 0 then redis.call('ZADD', FO, now, field) end
      redis.call('HINCRBY', F, field, 1)
    end
  end
end
local out
if decision == 'elsewhere' then
  out = {'elsewhere'}
else
  remember(zone, relay, rnode)
  if decision == 'from' then
    out = {'from', from, fromnode}
  else
    out = {'serve'}
    if relay ~= '' then
      for _, other in ipairs(redis.call('ZRANGE', ZS, 0, -1)) do
        if other ~= zone then
          local zk = P .. ':z:' .. other
          redis.call('ZREMRANGEBYSCORE', zk, '-inf', '(' .. old)
          local n = redis.call('ZCARD', zk)
          if n == 0 then
            redis.call('ZREM', ZS, other)
            redis.call('HDEL', T, other)
          else
            local turn = redis.call('HINCRBY', T, other, 1) - 1
            local url, node = tab(redis.call('ZRANGE', zk, turn % n, turn % n)[1])
            remember(other, url, node)
            out[#out + 1] = url
            out[#out + 1] = node
          end
        end
      end
    end
  end
end
for _, k in ipairs(touched) do redis.call('PEXPIRE', k, kttl) end
return out
"""


def _gate_key(artifact: str) -> str:
    return f"{PREFIX}{{g:{artifact}}}"


class RedisGateStore:
    """The first-copy gate over Redis: :meth:`admit` answers an :class:`Admission`, awaitable when it asks Redis."""

    def __init__(self, swarms: "RedisSwarmStore", relays: "RedisRelayRegistry | None" = None,
                 window_s: float = 30.0, max_ranges: int = 20_000, caller_clock: bool = False) -> None:
        self.window_s = window_s
        self.max_ranges = max_ranges
        self._swarms = swarms
        self._relays = relays
        self._caller_clock = caller_clock  # tests drive time through ``now``
        self._sha = swarms._r.register_script(_ADMIT).sha
        self.refused = 0
        self.relayed = 0
        self.pushed = 0

    def admit(self, artifact: str, path: str, start: int, end: int, first_copy: bool,
              now: float | None = None, *, zone: str | None = None, relay: str | None = None,
              node: str | None = None, solo: bool = False):
        if zone is None:
            return SERVE  # served and forgotten, without a round trip
        return self._admit(artifact, path, start, end, first_copy, now, zone, relay, node, solo)

    async def _admit(self, artifact: str, path: str, start: int, end: int, first_copy: bool,
                     now: float | None, zone: str, relay: str | None, asker: str | None = None,
                     solo: bool = False) -> Admission:
        node = (self._relays.node_of(relay) if self._relays is not None and relay else None) or ""
        now_ms = int((now if self._caller_clock and now is not None else time.time()) * 1000)
        win_ms = int(self.window_s * 1000)
        args = (path, start, end, 1 if first_copy else 0, zone, relay or "", node, now_ms, win_ms,
                self.max_ranges, MAX_REFUSALS, MAX_NODES_PER_ZONE, MAX_ZONES, 2 * win_ms + 1000, 1 if solo else 0,
                asker or "")
        key = _gate_key(artifact)
        sha = self._sha

        def build(pipe) -> None:
            pipe.evalsha(sha, 1, key, *args)

        loaded = False
        while True:
            replies = await self._swarms._batch.submit(build)
            if isinstance(replies[0], NoScriptError) and not loaded:
                loaded = True  # Redis restarted (scripts gone): load it once, send again
                await self._swarms._run(self._swarms._r.script_load(_ADMIT))
                continue
            out = _raise_errors(replies)[0]
            break
        kind = out[0]
        if kind == b"crowded":
            return CROWDED
        if kind == b"elsewhere":
            self.refused += 1
            return ELSEWHERE
        if kind == b"from":
            self.relayed += 1
            url = out[1].decode()
            self._learn(url, out[2].decode())
            return Admission(False, url)
        targets = []
        for i in range(1, len(out), 2):
            url = out[i].decode()
            self._learn(url, out[i + 1].decode())
            targets.append(url)
        if targets:
            self.pushed += len(targets)
            return Admission(True, relay_to=tuple(targets))
        return SERVE

    def _learn(self, url: str, node: str) -> None:
        if self._relays is not None and node:
            self._relays.learn(url, node)


class RedisRelayRegistry(RelayRegistry):
    """Relay registrations in Redis (see the module docstring); tokens as in process."""

    def __init__(self, swarms: "RedisSwarmStore", trusted_proxies=(), max_nodes: int = MAX_BELIEVED) -> None:
        super().__init__(trusted_proxies, max_nodes)
        self._swarms = swarms
        self._written: dict[str, tuple[str | None, float]] = {}  # node id -> (URL, when written), this replica
        self._known: dict[str, tuple[str, float]] = {}  # URL -> (node id, until): read from Redis or the gate
        self._tasks: set[asyncio.Task] = set()
        self._pending: dict = {}

    # ---- registration (heartbeats) ----------------------------------------------------
    def register(self, node_id: str, value: object, source: str | None) -> str | None:
        """As in process; the write to Redis is left for :meth:`pending` to hand out."""
        url = super().register(node_id, value, source)
        if url is None:
            return None
        written = self._written.get(node_id)
        now = time.monotonic()
        self._known[url] = (node_id, now + BELIEVE_CACHE_S)
        if written is not None and written[0] == url and now - written[1] < REG_REFRESH_S:
            return url
        self._written[node_id] = (url, now)
        self._bound()
        ttl_ms = int(REG_TTL_S * 1000)

        def build(pipe) -> None:
            pipe.set(f"{PREFIX}{{ru:{url}}}", node_id, px=ttl_ms)
            pipe.set(f"{PREFIX}{{rn:{node_id}}}", url, px=ttl_ms, get=True)

        fut = self._swarms._batch.submit(build)
        fut.add_done_callback(lambda f: self._registered(node_id, url, f))
        self._pending[node_id] = fut
        return url

    def pending(self, node_id: str):
        """The write of ``node_id``'s registration to Redis, to await (None: nothing to write)."""
        return self._pending.pop(node_id, None)

    def _registered(self, node_id: str, url: str, fut: "asyncio.Future[list]") -> None:
        """After the write: the node's previous URL, if another, is no longer its."""
        replies = None if fut.cancelled() or fut.exception() is not None else fut.result()
        if replies is None or any(isinstance(r, Exception) for r in replies):
            self._written.pop(node_id, None)  # not written: the next heartbeat tries again
            return
        old = replies[1]
        if old is not None and old.decode() != url:
            self._background(self._drop_url(old.decode(), node_id))

    def _background(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._quietly(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _quietly(coro) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - Redis down: logged once by the store; the keys expire
            pass

    async def _drop_url(self, url: str, node_id: str) -> None:
        """Delete ``url``'s registration if ``node_id`` still holds it."""
        await self._swarms._run(self._swarms._r.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1, f"{PREFIX}{{ru:{url}}}", node_id))

    def forget(self, node_id: str) -> None:
        local = self._url.get(node_id)
        super().forget(node_id)
        if local is not None:
            self._known.pop(local, None)
        written = self._written.get(node_id)
        now = time.monotonic()
        if written is not None and written[0] is None and now - written[1] < REG_REFRESH_S:
            return  # forgotten in Redis lately (a node whose heartbeats carry no key)
        self._written[node_id] = (None, now)
        self._bound()
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous caller): the keys expire
            return
        # A heartbeat's answer waits for it (:meth:`pending`), so the node's next heartbeat,
        # through any replica, comes after it.
        task = self._pending[node_id] = self._background(self._forget(node_id))
        task.add_done_callback(lambda t: self._pending.pop(node_id, None) if self._pending.get(node_id) is t else None)

    async def _forget(self, node_id: str) -> None:
        try:
            old = await self._swarms._run(self._swarms._r.getdel(f"{PREFIX}{{rn:{node_id}}}"))
        except Exception:
            self._written.pop(node_id, None)
            raise
        if old is not None:
            await self._drop_url(old.decode(), node_id)

    def _bound(self) -> None:
        while len(self._written) > self.max_nodes:
            del self._written[next(iter(self._written))]

    # ---- the web seed -----------------------------------------------------------------
    def node_of(self, url: str) -> str | None:
        known = self._known.get(url)
        return known[0] if known is not None else None

    def learn(self, url: str, node_id: str) -> None:
        """``url`` is ``node_id``'s, as the gate remembers it: tokens for it go to that node."""
        if url not in self._known:
            self._known[url] = (node_id, time.monotonic() + BELIEVE_CACHE_S)
            self._bound_known()

    def _bound_known(self) -> None:
        while len(self._known) > self.max_nodes:
            del self._known[next(iter(self._known))]

    def believed(self, value: str | None, remote: str | None):
        """The request's relay URL if registered (by any replica) at the requester's address: str, None, or awaitable."""
        url = plain_relay_url(value)
        if url is None or not url_host_is(url, remote):
            return super().believed(value, remote) if value else None  # refused, counted and logged
        known = self._known.get(url)
        if known is not None and known[1] > time.monotonic():
            return url
        return self._believed(url, value, remote)

    async def _believed(self, url: str, value: str, remote: str | None) -> str | None:
        node = await self._swarms._run(self._swarms._r.get(f"{PREFIX}{{ru:{url}}}"))
        if node is None:
            self._known.pop(url, None)
            mine = self._node.get(url)
            if mine is not None:  # registered here, gone from Redis (restarted empty): written again next heartbeat
                self._written.pop(mine, None)
            return super().believed(value, remote)  # refused as in process (unless registered here)
        self._known.pop(url, None)
        self._known[url] = (node.decode(), time.monotonic() + BELIEVE_CACHE_S)
        self._bound_known()
        return url

    def token(self, url: str, method: str, digest: str, path: str, first: int, last: int) -> str | None:
        known = self._known.get(url)
        node_id = known[0] if known is not None else self._node.get(url)
        if node_id is None or self.secret is None:
            return None
        from modelcast.relay_auth import make_token
        return make_token(self.node_secret(node_id), method, node_id, digest, path, first, last, time.time())
