"""The console's routes under ``/ui``: pages, the JSON the live views poll, sign-in, static files.

Handlers are thin: they check access (tracker/console/access.py), read the same views
as the API (:mod:`tracker.fleet`, the registry store) and render them with
:mod:`tracker.console.pages`.  Errors on pages are HTML pages with the error's status; on
the JSON routes they are the API's JSON errors.
"""

from __future__ import annotations

import asyncio
import functools
from importlib import resources
from typing import Awaitable, Callable

from aiohttp import web

from modelcast.errors import ArtifactNotFound, BadRequest, ModelcastError, Unauthorized, retry_after
from modelcast.manifest import Manifest
from modelcast.reference import validate_name

from ..fleet import nodes_query, nodes_view, rollout_view, stored_manifest
from ..registry_api import digest_param
from ..state import CONFIG, NODES, STORE
from ..store import MAX_LIST_LIMIT
from . import access, pages

# Only scripts and styles of our own; no frames, no forms to other sites, no referrer to leak a URL.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
PAGE_SIZE = 100
MAX_QUERY = 128

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers=SECURITY_HEADERS)


def page(handler: Handler) -> Handler:
    """A console page: access checked first, errors shown as HTML pages."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if "token" in request.query:
            return _sign_in_by_query(request)
        if not access.allowed(request):
            return html(pages.login_page(access.safe_next(request.path_qs)), status=401)
        try:
            return await handler(request)
        except ModelcastError as exc:
            response = html(pages.error_page(exc.http_status, str(exc)), status=exc.http_status)
            response.headers.update(retry_after(exc))
            return response

    return wrapped


def feed(handler: Handler) -> Handler:
    """A JSON route of the console: the console's access (cookie or bearer), the API's errors."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if not access.allowed(request):
            raise Unauthorized(f"GET {request.path} needs the console cookie (sign in at /ui) or "
                               "'Authorization: Bearer TOKEN'")
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    return wrapped


def _sign_in_by_query(request: web.Request) -> web.StreamResponse:
    """``?token=``: check it, keep a session cookie, and send the browser on without the token in its URL."""
    return _sign_in(request, request.query.get("token", ""), access.safe_next(access.without_token(request)))


def _sign_in(request: web.Request, token: str, target: str) -> web.Response:
    cfg = request.app[CONFIG]
    if access.required(cfg) and not access.token_ok(cfg, token):
        return html(pages.login_page(target, "That token is wrong: the console takes the registry's read token "
                                             "or its write token."), status=401)
    response = web.Response(status=303, headers={**SECURITY_HEADERS, "Location": target})
    if access.required(cfg):
        access.set_session(request, response, token)
    return response


def _live(request: web.Request) -> int:
    return len(request.app[NODES].live)


# ---- pages ------------------------------------------------------------------------------


@page
async def artifacts(request: web.Request) -> web.Response:
    """``/ui?q=&after=``: artifacts and their tags, by name; ``q`` finds names containing it."""
    query = request.query.get("q", "").strip()
    if len(query) > MAX_QUERY:
        raise BadRequest(f"search text is {len(query)} characters; at most {MAX_QUERY}")
    after = request.query.get("after") or None
    if after is not None:
        name, sep, digest = after.partition("@")
        if not sep:
            raise BadRequest("?after= must be a cursor from a 'Next page' link")
        validate_name(name)
    items, nxt = await asyncio.to_thread(request.app[STORE].list, limit=min(PAGE_SIZE, MAX_LIST_LIMIT), after=after,
                                         name_contains=query or None)
    book = request.app[NODES]
    counts = {a["digest"]: book.counts(a["digest"]) for a in items}
    return html(pages.artifacts_page(items, counts, query, nxt, _live(request)))


@page
async def artifact(request: web.Request) -> web.Response:
    """``/ui/artifacts/{digest}``: one artifact, its files and its swarm, with the live rollout."""
    digest = digest_param(request)
    store = request.app[STORE]
    record = await asyncio.to_thread(store.get, digest)
    if record is None:
        raise _not_here(digest)
    manifest = Manifest.from_bytes(record.manifest)
    tags = await asyncio.to_thread(store.tags_of, digest)
    view = await rollout_view(request.app, digest, manifest)
    return html(pages.artifact_page(digest, manifest, tags, record.origin_url, record.s3_endpoint, view,
                                    _live(request)))


@page
async def rollout(request: web.Request) -> web.Response:
    """``/ui/rollout/{digest}``: the live rollout alone."""
    digest = digest_param(request)
    view = await rollout_view(request.app, digest)
    return html(pages.rollout_page(digest, view, _live(request)))


@page
async def nodes(request: web.Request) -> web.Response:
    """``/ui/nodes?zone=&limit=``: each node, its zone, liveness, and what it holds and pulls."""
    zone, limit = nodes_query(request)
    return html(pages.nodes_page(await nodes_view(request.app, zone, limit), zone))


def _not_here(digest: str) -> ModelcastError:
    return ArtifactNotFound(f"artifact {digest} is not in this registry")


# ---- what the live views poll ---------------------------------------------------------------


@feed
async def rollout_feed(request: web.Request) -> web.Response:
    """``/ui/api/rollout/{digest}``: :func:`tracker.fleet.rollout_view` for the page's script."""
    digest = digest_param(request)
    manifest = await stored_manifest(request.app, digest)
    return web.json_response(await rollout_view(request.app, digest, manifest))


@feed
async def nodes_feed(request: web.Request) -> web.Response:
    return web.json_response(await nodes_view(request.app, *nodes_query(request)))


# ---- sign-in and static files -----------------------------------------------------------------


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /ui/login``: the form of the sign-in page."""
    cap = access.MAX_LOGIN_BODY
    raw = b""
    if (request.content_length or 0) <= cap:
        while len(raw) <= cap and (chunk := await request.content.read(cap + 1 - len(raw))):
            raw += chunk
    if (request.content_length or 0) > cap or len(raw) > cap:
        return html(pages.login_page("/ui", "The sign-in form was too large."), status=400)
    try:
        token, target = access.parse_login(raw)
    except ValueError:
        return html(pages.login_page("/ui", "The sign-in form was malformed."), status=400)
    return _sign_in(request, token, target)


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.Response(status=303, headers={**SECURITY_HEADERS, "Location": "/ui"})
    access.clear_session(response)
    return response


@functools.cache
def _static_bytes(name: str) -> bytes:
    return resources.files("tracker.console").joinpath("static", name).read_bytes()


async def static(request: web.Request) -> web.Response:
    """``/ui/static/{name}``: the console's script and stylesheet (open: they hold no data)."""
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=_static_bytes(name), content_type=STATIC[name], charset="utf-8",
                        headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=300"})


def add_console_routes(app: web.Application) -> None:
    """The console's routes under ``/ui``."""
    app.router.add_get("/ui", artifacts)
    app.router.add_get("/ui/", artifacts)
    app.router.add_get("/ui/artifacts/{digest}", artifact)
    app.router.add_get("/ui/rollout/{digest}", rollout)
    app.router.add_get("/ui/nodes", nodes)
    app.router.add_get("/ui/api/rollout/{digest}", rollout_feed)
    app.router.add_get("/ui/api/nodes", nodes_feed)
    app.router.add_post("/ui/login", login)
    app.router.add_get("/ui/logout", logout)
    app.router.add_get("/ui/static/{name}", static)
