"""Who may read the console: the same tokens as the registry's reads, carried by a cookie.

With no ``--read-token`` the registry's reads are open, and so is the console.  With one,
a request is let in when it carries, in order:

* ``Authorization: Bearer TOKEN`` (the read or the write token), as every API read;
* the console cookie: an HMAC of an accepted token, never the token itself, so a browser
  that holds it holds nothing the API would take; it is ``HttpOnly`` (no script reads it),
  ``SameSite=Lax`` and ``Secure`` when the registry serves TLS.

The cookie is set by ``POST /ui/login`` (a form with the token) or by opening any page
once with ``?token=TOKEN``, which answers with a redirect to the same page without the
token, so it does not stay in the address bar.  Changing a token ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from modelcast.config import TrackerConfig

from ..state import CONFIG

COOKIE = "modelcast_console"
MAX_LOGIN_BODY = 4096
_SESSION_LABEL = b"modelcast console session v1"


def required(cfg: TrackerConfig) -> bool:
    """Whether the console needs a token (the registry has a read token)."""
    return bool(cfg.read_token)


def _tokens(cfg: TrackerConfig) -> list[str]:
    """The tokens that may read; none needed (an empty list) when reads are open."""
    if not cfg.read_token:
        return []
    return [t for t in (cfg.read_token, cfg.token) if t]


def session_value(token: str) -> str:
    return hmac.new(token.encode("utf-8", "surrogateescape"), _SESSION_LABEL, hashlib.sha256).hexdigest()


def token_ok(cfg: TrackerConfig, given: str) -> bool:
    # Constant-time, and every token compared: timing tells neither the token nor which one.
    given_b = given.strip().encode("utf-8", "surrogateescape")
    return any([hmac.compare_digest(given_b, t.encode()) for t in _tokens(cfg)])


def allowed(request: web.Request) -> bool:
    """Whether ``request`` may read the console."""
    cfg = request.app[CONFIG]
    tokens = _tokens(cfg)
    if not tokens:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and given and token_ok(cfg, given):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and any([hmac.compare_digest(cookie.encode("ascii", "replace"), session_value(t).encode())
                                 for t in tokens])


def set_session(request: web.Request, response: web.StreamResponse, token: str) -> None:
    response.set_cookie(COOKIE, session_value(token.strip()), path="/ui", httponly=True, samesite="Lax",
                        secure=request.secure or None)


def clear_session(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/ui")


def without_token(request: web.Request) -> str:
    """The request's path and query with ``token=`` taken out."""
    query = [(k, v) for k, v in request.query.items() if k != "token"]
    return request.path + (f"?{urlencode(query)}" if query else "")


def safe_next(path: str | None) -> str:
    """Where a sign-in goes next: a console path only (no open redirect to another site)."""
    if not path or not path.startswith("/ui") or path.startswith("//") or "\\" in path or any(
            ord(c) < 0x20 for c in path):
        return "/ui"
    return path


def parse_login(raw: bytes) -> tuple[str, str]:
    """``(token, next)`` of a sign-in form body."""
    fields = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=8))
    return fields.get("token", ""), safe_next(fields.get("next"))
