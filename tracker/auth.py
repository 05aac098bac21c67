"""Bearer tokens of the registry API: who may write, and who may read."""

from __future__ import annotations

import hmac

from aiohttp import web

from modelcast.errors import Unauthorized

from .state import CONFIG


def check_auth(request: web.Request, *, read: bool = False) -> None:
    """Raise Unauthorized unless the request's bearer token may write (or, with ``read``, read).

    Writes need ``TrackerConfig.token``.  Reads are open unless ``read_token`` is set;
    then they need it or the write token.  Announce and scrape never call this: BitTorrent
    clients cannot send headers, and the private torrents' info-hash allow-list guards them.
    """
    cfg = request.app[CONFIG]
    if read:
        if not cfg.read_token:
            return
        tokens = [t for t in (cfg.read_token, cfg.token) if t]
    else:
        if not cfg.token:
            return
        tokens = [cfg.token]
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized(f"{request.method} {request.path} needs 'Authorization: Bearer TOKEN' "
                           "(set MODELCAST_TOKEN or pass --token)")
    # Constant-time comparison so the token cannot be guessed byte by byte from timings;
    # every token is compared, so timing does not tell which one nearly matched either.
    given_b = given.strip().encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(given_b, t.encode()) for t in tokens]
    if not any(matches):
        raise Unauthorized(f"{request.method} {request.path}: the bearer token is wrong"
                           + (" (reads need the registry's read token or write token)" if read else ""))
