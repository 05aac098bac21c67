"""Bearer tokens of the registry API, by scope (issue #15).

* write (admin): ``TrackerConfig.token`` -- publish, tag moves, deletes; it reads and enrols too.
* read: ``read_token`` -- resolve, manifest, torrent, list, web seed, stats, fleet.
* node: ``node_token`` -- enrols a node (its first heartbeat binds its node id to its own
  key, tracker/liveness.py); after that the node's key alone proves it.  It reads too (a
  node pulls), and it never writes.  The read token neither enrols, nor heartbeats, nor
  makes a node leave.
"""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from modelcast.errors import Unauthorized

from .state import CONFIG


def _bearer(request: web.Request) -> bytes | None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" and given else None


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def has_write_token(request: web.Request) -> bool:
    """Whether the request's bearer is the write token (True on a registry without one)."""
    cfg = request.app[CONFIG]
    if not cfg.token:
        return True
    given = _bearer(request)
    return given is not None and hmac.compare_digest(given, cfg.token.encode())


def check_enrolment(request: web.Request, node_id: str) -> None:
    """Raise Unauthorized unless the request may bind ``node_id`` to a key: the node scope.

    It needs the node token (or the write token) as its bearer; a registry whose node token
    no operator set (it made one itself) lets nodes on its own machine enrol without it.
    """
    cfg = request.app[CONFIG]
    if not cfg.node_token:
        return
    if cfg.node_token_loopback_free and _is_loopback(request.remote):
        return
    given = _bearer(request)
    tokens = [t for t in (cfg.node_token, cfg.token) if t]
    if given is None or not _any_matches(given, tokens):
        raise Unauthorized(f"node {node_id} is not enrolled here: its first heartbeat needs the registry's node "
                           "token as 'Authorization: Bearer TOKEN' (set MODELCAST_NODE_TOKEN on the node; "
                           "`modelcast node-token --data DIR` prints it on the registry's machine)")


def _scope_tokens(cfg, read: bool) -> list[str]:
    """The tokens that grant writes (or, with ``read``, reads); none when the scope is open."""
    if read:
        return [t for t in (cfg.read_token, cfg.token, cfg.node_token) if t] if cfg.read_token else []
    return [cfg.token] if cfg.token else []


def _any_matches(given: bytes, tokens: list[str]) -> bool:
    # Constant-time comparison so the token cannot be guessed byte by byte from timings;
    # every token is compared, so timing does not tell which one nearly matched either.
    return any([hmac.compare_digest(given, t.encode()) for t in tokens])


def may_read(cfg, authorization: str) -> bool:
    """Whether an ``Authorization`` header value grants reads: :func:`check_auth`'s rule, for
    the fast path's web seed (tracker/webseed.py), which has no aiohttp request."""
    tokens = _scope_tokens(cfg, True)
    if not tokens:
        return True
    scheme, _, given = authorization.partition(" ")
    return (scheme.lower() == "bearer" and bool(given)
            and _any_matches(given.strip().encode("utf-8", "surrogateescape"), tokens))


def check_auth(request: web.Request, *, read: bool = False) -> None:
    """Raise Unauthorized unless the request's bearer token may write (or, with ``read``, read).

    Writes need ``TrackerConfig.token``.  Reads are open unless ``read_token`` is set;
    then they need it or the write token.  Announce and scrape never call this: BitTorrent
    clients cannot send headers, and the private torrents' info-hash allow-list guards them.
    """
    tokens = _scope_tokens(request.app[CONFIG], read)
    if not tokens:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized(f"{request.method} {request.path} needs 'Authorization: Bearer TOKEN' "
                           "(set MODELCAST_TOKEN or pass --token)")
    if not _any_matches(given.strip().encode("utf-8", "surrogateescape"), tokens):
        raise Unauthorized(f"{request.method} {request.path}: the bearer token is wrong"
                           + (" (reads need the registry's read token or write token)" if read else ""))
