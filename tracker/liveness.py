"""Node liveness: heartbeats and leaves of node daemons, and the expiry of dead nodes and silent peers.

A node daemon announces with ``node=ID`` and sends one heartbeat per node (not per
torrent); when its heartbeat lapses, or it leaves, every entry of the node goes at once,
in every swarm (:class:`~tracker.swarm.SwarmRegistry` keeps the books).  Other clients
keep the plain per-peer TTL.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import time
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, NamedTuple
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from adapters.http_server import loads_json, read_body
from modelcast.config import TrackerConfig
from modelcast.errors import BadRequest, ModelcastError, error_body, retry_after
from modelcast.progress import MAX_HEARTBEAT_BODY, parse_report
from modelcast.errors import Unauthorized
from modelcast.wire import NODE_KEY_HEADER, announce_token

from .announce import ZONE_RE, validate_node_id
from .auth import check_auth, check_enrolment, has_write_token
from .metrics import HEARTBEAT_ROUTE, LEAVE_ROUTE, METRICS
from .nodekeys import check_key_shape, key_hash
from .state import CONFIG, NODE_KEYS, NODES, RELAYS, STORE, SWARMS
from .swarmstore import settle

log = logging.getLogger("modelcast.tracker")


def _relay_fields(relays, node_id: str, node_key: str | None, body: dict, remote: str | None,
                  forwarded_for: str | None) -> dict:
    """Register the relay URL a heartbeat names (``"relay"``); the answer's fields about it.

    Only a heartbeat that proves its node id with a node key registers a URL and learns the
    node's relay secret (tracker/relaytokens.py); the URL must be at the heartbeat's source
    address.  Shared by every path that answers heartbeats (through :func:`heartbeat_fields`).
    """
    if node_key is None:
        relays.forget(node_id)
        write = relays.pending(node_id)
        return {} if write is None else _written(write, {})
    url = relays.register(node_id, body.get("relay"), relays.source(remote, forwarded_for))
    secret = relays.node_secret(node_id)
    answer = {"relay": url, "relay_secret": secret} if secret is not None else {"relay": url}
    write = relays.pending(node_id)  # registrations in Redis (tracker/gate_redis.py): awaited
    return answer if write is None else _written(write, answer)


async def _written(write: Awaitable[None], answer: dict) -> dict:
    await write
    return answer


def _heartbeat_ttl(body: Any, cfg: TrackerConfig) -> float:
    """The ttl a heartbeat body asks for, defaulted and capped by ``cfg``."""
    if not isinstance(body, dict):
        raise BadRequest('heartbeat body must be a JSON object like {"zone": "z1", "ttl_s": 3.0}')
    zone = body.get("zone")
    if zone is not None and not (isinstance(zone, str) and ZONE_RE.fullmatch(zone)):
        raise BadRequest(f"heartbeat zone {str(zone)[:80]!r} is invalid: up to 64 letters, digits and . _ : -")
    ttl = body.get("ttl_s", cfg.heartbeat_ttl_default_s)
    # bool is an int; NaN and infinity compare in ways that would keep a node forever.
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf"):
        raise BadRequest(f"heartbeat ttl_s must be a positive number of seconds, got {ttl!r}")
    return min(float(ttl), cfg.heartbeat_ttl_max_s)


class _Call:
    """What the node scope's checks (tracker/auth.py, :func:`node_authorized`) read of a request the fast path answers."""

    __slots__ = ("app", "method", "path", "headers", "remote")

    def __init__(self, app: web.Application, method: str, path: str, headers: Mapping[bytes, bytes],
                 remote: str | None) -> None:
        self.app, self.method, self.path, self.remote = app, method, path, remote
        self.headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers.items())


class _Parts(NamedTuple):
    """What a heartbeat answer is made of, in process: the objects of the app it reads (looked up once per route)."""

    cfg: TrackerConfig
    swarms: Any
    relays: Any
    nodes: Any


def _parts(app: web.Application) -> _Parts:
    return _Parts(app[CONFIG], app[SWARMS], app[RELAYS], app[NODES])


def heartbeat(app: web.Application, node_id: str, node_key: str | None, raw: bytes, remote: str | None = None,
              forwarded_for: str | None = None) -> dict | Awaitable[dict]:
    """A heartbeat of ``node_id`` with body ``raw`` (read whole, within :data:`MAX_HEARTBEAT_BODY`): the answer.

    Shared by the aiohttp handler and the fast path (tracker/fastpath.py, through
    :func:`heartbeat_fields`), after the caller checked the node scope (:func:`node_authorized`).
    The swarm store is called once, through ``SWARMS.heartbeat``; a store whose calls are
    coroutines (one over the network) makes this return an awaitable of the answer.
    """
    fields = heartbeat_fields(_parts(app), node_id, node_key, raw, remote, forwarded_for)
    if type(fields) is not tuple:
        return _answer_dict_later(fields)
    return _answer_dict(fields)


async def _answer_dict_later(fields: Awaitable[tuple]) -> dict:
    return _answer_dict(await fields)


def _answer_dict(fields: tuple) -> dict:
    ttl, entries, reported, relay = fields
    # "reported": whether this registry holds a report of the node, so that a node which
    # sends its report only when it changes sends it again to a registry that lost it.
    return {"ok": True, "ttl_s": ttl, "entries": entries, "reported": reported, **relay}


def _heartbeat_body(raw: bytes) -> Any:
    """The heartbeat body ``raw`` as JSON (what :func:`adapters.http_server.loads_json` makes of it).

    A body that starts ``{"`` is UTF-8 to ``json.loads`` (no BOM, no NUL in its first two
    bytes), so it is decoded here at once, without ``json.loads``'s sniffing; anything else
    goes through ``loads_json``, which also words the errors.
    """
    if raw.startswith(b'{"'):
        try:
            return _JSON_DECODE(raw.decode("utf-8", "surrogatepass"))
        except (RecursionError, UnicodeDecodeError, ValueError):
            pass  # loads_json says what is wrong, as the aiohttp route does
    return loads_json(raw, "heartbeat body", '{"zone": "z1", "ttl_s": 3.0}')


_JSON_DECODE = json.JSONDecoder().decode


def heartbeat_fields(parts: _Parts, node_id: str, node_key: str | None, raw: bytes, remote: str | None = None,
                     forwarded_for: str | None = None) -> tuple | Awaitable[tuple]:
    """:func:`heartbeat`'s work: ``(ttl, entries, reported, relay fields)`` of the answer, or an awaitable of them."""
    node_id = validate_node_id(node_id)
    body = _heartbeat_body(raw) if raw else {}
    ttl = _heartbeat_ttl(body, parts.cfg)
    report = parse_report(body)  # checked whole before anything is recorded
    now = time.monotonic()
    zone = body.get("zone")
    entries = parts.swarms.heartbeat(node_id, now, ttl, zone)
    relay = _relay_fields(parts.relays, node_id, node_key, body, remote, forwarded_for)
    if type(entries) is not int or type(relay) is not dict:  # inspect.isawaitable, at a tenth of the cost
        return _heartbeat_done(parts, node_id, zone, report, now, ttl, entries, relay)
    node = parts.nodes.heartbeat(node_id, zone, report, now, time.time(), ttl)
    return ttl, entries, node is not None and node.reported, relay


async def _heartbeat_done(parts: _Parts, node_id, zone, report, now, ttl, entries: Awaitable[int] | int,
                          relay: Awaitable[dict] | dict) -> tuple:
    if inspect.isawaitable(entries) and inspect.isawaitable(relay):
        # Both in Redis: awaited together, and neither left unawaited when the other fails.
        entries, relay = await asyncio.gather(entries, relay, return_exceptions=True)
        for result in (entries, relay):
            if isinstance(result, BaseException):
                raise result
    entries, relay = await settle(entries), await settle(relay)
    node = parts.nodes.heartbeat(node_id, zone, report, now, time.time(), ttl)
    return ttl, entries, node is not None and node.reported, relay


def leave(app: web.Application, node_id: str, node_key: str | None) -> dict | Awaitable[dict]:
    """The node ``node_id`` stops: its entries leave every swarm at once (the node scope already checked)."""
    node_id = validate_node_id(node_id)
    app[RELAYS].forget(node_id)
    removed = app[SWARMS].leave(node_id)
    if inspect.isawaitable(removed):
        return _leave_done(app, node_id, removed)
    return _leave_answer(app, node_id, removed)


async def _leave_done(app: web.Application, node_id: str, removed: Awaitable[int]) -> dict:
    return _leave_answer(app, node_id, await removed)


def _leave_answer(app: web.Application, node_id: str, removed: int) -> dict:
    app[NODES].leave(node_id, time.time())
    log.info("node %s left %d swarm entries", node_id, removed)
    return {"ok": True, "removed": removed}


# Heartbeat answers kept (their JSON, per node): at most this many, all dropped at once past it.
MAX_ANSWERS = 200_000


class FastNodeRoutes:
    """The fast path's node routes (heartbeat and leave of a node): ``api`` of tracker/fastpath.py.

    Called with a request's method and path, it returns the route that answers it, or None
    for aiohttp's.  The app's objects are looked up once, here, not per request; the JSON of
    each node's last heartbeat answer is kept and sent again while what it says (ttl, entry
    count, whether a report is held, relay URL and secret) is unchanged.
    """

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.keys = app[NODE_KEYS]
        self.parts = _parts(app)
        metrics = app.get(METRICS)
        self.tally = None if metrics is None else metrics.requests
        self._answers: dict[str, tuple[tuple, bytes]] = {}  # node id -> (answer fields, their JSON)

    def __call__(self, method: bytes, path: bytes) -> "Callable | None":
        if not path.startswith(NODES_PREFIX):
            return None
        rest = path[len(NODES_PREFIX):]
        if method == b"POST" and rest.endswith(b"/heartbeat"):
            node_id, kind = rest[:-len(b"/heartbeat")], HEARTBEAT_ROUTE
        elif method == b"DELETE":
            node_id, kind = rest, LEAVE_ROUTE
        else:
            return None
        if not node_id or b"/" in node_id:
            return None
        return partial(self._route, method, path, node_id, kind)

    def _route(self, method: bytes, path: bytes, node_id: bytes, kind: tuple[str, str],
               headers: Mapping[bytes, bytes], body: bytes, remote: str | None = None,
               conn: Any = None) -> tuple[int, bytes, dict[str, str]] | Awaitable:
        what = "heartbeat" if kind is HEARTBEAT_ROUTE else "leave"
        try:
            node = validate_node_id(unquote(node_id.decode("ascii"), errors="strict"))
            raw_key = headers.get(NODE_KEY_HEADER_B)
            key = None if raw_key is None else raw_key.decode("latin-1")
            keys = self.keys
            if key is not None and keys.is_bound(node):
                # The common case, answered at once: a node known here speaks with its own key.
                check_key_shape(key)
                # A key this connection proved for this node, against the binding cached now,
                # is not hashed again; any other key, node or connection is checked.
                proven = None if conn is None else conn.proven
                if not (proven is not None and proven[0] == node and hmac.compare_digest(proven[1], raw_key)
                        and keys.still_bound(node, proven[2])):
                    keys.check(node, key, what)
                    if conn is not None:
                        conn.proven = (node, raw_key, keys.binding(node))
                if kind is HEARTBEAT_ROUTE:
                    fields = heartbeat_fields(self.parts, node, key, body, remote,
                                              _header(headers, b"x-forwarded-for"))
                    if type(fields) is not tuple:  # worked out elsewhere (a swarm store over the network)
                        return self._answer_later(node, fields)
                    return self._count(kind, (200, self._answer_json(node, fields), {}))
                answer = leave(self.app, node, key)
            else:
                # Enrolment, a binding made on another replica or before a restart (the store
                # is asked), or a key-less client: the same checks as aiohttp's, awaited.
                call = _Call(self.app, method.decode(), path.decode("ascii"), headers, remote)
                answer = _authorized(call, node, key, body, kind, what)
        except (ModelcastError, UnicodeDecodeError) as exc:
            return self._count(kind, _error(exc))
        if type(answer) is not dict:
            return _answer_later(self.app, kind, answer)
        return self._count(kind, (200, _json(answer), {}))

    def _answer_json(self, node: str, fields: tuple) -> bytes:
        """The JSON of a heartbeat answer: the node's last one again if it says the same (same ttl type too)."""
        kept = self._answers.get(node)
        if kept is not None and kept[0] == fields and kept[0][0].__class__ is fields[0].__class__:
            return kept[1]
        answer = _json(_answer_dict(fields))
        if len(self._answers) >= MAX_ANSWERS:
            self._answers.clear()
        self._answers[node] = (fields, answer)
        return answer

    async def _answer_later(self, node: str, fields: Awaitable[tuple]):
        try:
            return self._count(HEARTBEAT_ROUTE, (200, self._answer_json(node, await fields), {}))
        except ModelcastError as exc:
            return self._count(HEARTBEAT_ROUTE, _error(exc))

    def _count(self, kind: tuple[str, str], answer: tuple[int, bytes, dict[str, str]]):
        """Count the answer as aiohttp's metrics middleware counts the requests it answers (tracker/metrics.py)."""
        if self.tally is not None:
            status = answer[0]
            self.tally[_OK_KEYS[kind] if status == 200 else
                       (kind[1], kind[0], _STATUS_TEXT.get(status) or str(status))] += 1
        return answer


NODES_PREFIX = b"/v1/nodes/"
NODE_KEY_HEADER_B = NODE_KEY_HEADER.lower().encode("ascii")


def _header(headers: Mapping[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _no_default(o: Any) -> Any:
    raise TypeError(f"{o.__class__.__name__} is not JSON serializable")


# json.dumps builds a new C encoder on every call, a tenth of a fast-path heartbeat's CPU;
# this one is built once, with json.dumps's defaults (same bytes out).
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_ENCODER = None if _c_make_encoder is None else _c_make_encoder(
    None, _no_default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)


def _json(answer: dict) -> bytes:
    """``json.dumps(answer).encode()``, without making an encoder per answer."""
    if _ENCODER is None:
        return json.dumps(answer).encode()
    return "".join(_ENCODER(answer, 0)).encode()


def _error(exc: Exception) -> tuple[int, bytes, dict[str, str]]:
    if not isinstance(exc, ModelcastError):
        exc = BadRequest(f"the node id in the path is not valid UTF-8: {exc}")
    return exc.http_status, json.dumps(error_body(exc)).encode(), retry_after(exc)


async def _answer_later(app: web.Application, kind: tuple[str, str], answer: Awaitable[dict]):
    try:
        return _count(app, kind, (200, _json(await answer), {}))
    except ModelcastError as exc:
        return _count(app, kind, _error(exc))


_STATUS_TEXT = {code: str(code) for code in (200, 400, 401, 403, 404, 409, 413, 429, 500, 503)}
_OK_KEYS = {kind: (kind[1], kind[0], "200") for kind in (HEARTBEAT_ROUTE, LEAVE_ROUTE)}


def _count(app: web.Application, kind: tuple[str, str], answer: tuple[int, bytes, dict[str, str]]):
    """Count the answer as aiohttp's metrics middleware counts the requests it answers (tracker/metrics.py)."""
    metrics = app.get(METRICS)
    if metrics is not None:
        metrics.requests[(kind[1], kind[0], _STATUS_TEXT.get(answer[0]) or str(answer[0]))] += 1
    return answer


async def _authorized(call: _Call, node: str, key: str | None, body: bytes, kind: tuple[str, str], what: str) -> dict:
    await node_authorized(call, node, what)  # type: ignore[arg-type]
    answer = (heartbeat(call.app, node, key, body, call.remote, call.headers.get("X-Forwarded-For"))
              if kind == HEARTBEAT_ROUTE else leave(call.app, node, key))
    return await answer if inspect.isawaitable(answer) else answer


async def _lookup(request: web.Request, node_id: str) -> bool:
    """Whether ``node_id`` is bound, asking the store on a cache miss (another replica, or before a restart)."""
    keys = request.app[NODE_KEYS]
    if not keys.is_bound(node_id):
        found = await asyncio.to_thread(request.app[STORE].node_key_of, node_id)
        if found is not None:
            keys.remember(node_id, *found)
    return keys.is_bound(node_id)


def _keyless(request: web.Request, what: str, node_id: str) -> None:
    """A heartbeat or leave without a node key (an older client): it proves no node, so it is
    allowed only to whoever could enrol a node (tracker/auth.py) and read, or with the write token."""
    if request.app[CONFIG].token and has_write_token(request):
        return
    try:
        check_enrolment(request, node_id)
    except Unauthorized:
        raise Unauthorized(f"{what} of node {node_id} needs its node key ({NODE_KEY_HEADER}) or the node token; "
                           "the read token does not speak for nodes") from None
    check_auth(request, read=True)


async def node_authorized(request: web.Request, node_id: str, what: str) -> None:
    """The node scope: the node's own key if its id is bound; else enrolment (binding it), or the keyless rule."""
    key = request.headers.get(NODE_KEY_HEADER)
    check_key_shape(key)
    keys = request.app[NODE_KEYS]
    if await _lookup(request, node_id):
        keys.check(node_id, key, what)
    elif key is None:
        _keyless(request, what, node_id)
    else:
        check_enrolment(request, node_id)
        if what == "heartbeat":
            bound = await asyncio.to_thread(request.app[STORE].bind_node_key, node_id, key_hash(key),
                                            announce_token(key))
            keys.remember(node_id, *bound)
            keys.check(node_id, key, what)  # another key won a race for this id (another replica)


async def node_heartbeat(request: web.Request) -> web.Response:
    """``POST /v1/nodes/{node_id}/heartbeat``: keep every swarm entry of the node alive for ``ttl_s``.

    The node scope, not the read token: a bound node id needs its key
    (``X-Modelcast-Node-Key``); a new one is enrolled (bound to the key it sends) with the
    registry's node token (tracker/auth.py); one without a key, only with the write token.
    Most heartbeats are answered by the fast path (tracker/fastpath.py) through the same
    :func:`heartbeat`.
    """
    node_id = validate_node_id(request.match_info["node_id"])
    await node_authorized(request, node_id, "heartbeat")
    # Bounded however it is framed (a chunked body has no Content-Length to check first).
    raw = await read_body(request, MAX_HEARTBEAT_BODY, "heartbeat body")
    answer = heartbeat(request.app, node_id, request.headers.get(NODE_KEY_HEADER), raw, request.remote,
                       request.headers.get("X-Forwarded-For"))
    if inspect.isawaitable(answer):
        answer = await answer
    return web.json_response(answer)


async def node_leave(request: web.Request) -> web.Response:
    """``DELETE /v1/nodes/{node_id}``: the node stops; its entries leave every swarm at once."""
    node_id = validate_node_id(request.match_info["node_id"])
    await node_authorized(request, node_id, "leave")
    answer = leave(request.app, node_id, request.headers.get(NODE_KEY_HEADER))
    if inspect.isawaitable(answer):
        answer = await answer
    return web.json_response(answer)


async def _expire_peers(app: web.Application) -> None:
    """Drop dead nodes and silent peers; off the announce path, on a timer.

    Each tick costs only what is due (see :meth:`SwarmRegistry.expire`), so it can run
    often enough that a dead node leaves the peer lists within its ttl plus one period.
    """
    cfg = app[CONFIG]
    period = max(0.05, min(cfg.expiry_interval_s, cfg.peer_ttl_s / 4))
    while True:
        await asyncio.sleep(period)
        try:
            now = time.monotonic()
            app[NODES].expire(now, time.time())
            gone = await settle(app[SWARMS].expire(now, cfg.peer_ttl_s))
            if gone:
                log.debug("expired %d swarm entries of dead nodes and silent peers", gone)
        except ModelcastError:
            pass  # the swarm store is down: it logs the outage once; expiry resumes when it is back
        except Exception:  # A bug here must not stop expiry for the life of the server.
            log.exception("peer expiry failed")



async def peer_expiry_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run peer expiry for the life of the application (a ``cleanup_ctx``, after the registry's)."""
    expiry = asyncio.create_task(_expire_peers(app), name="modelcast-peer-expiry")
    try:
        yield
    finally:
        expiry.cancel()
        try:
            await expiry
        except asyncio.CancelledError:
            pass
