"""aiohttp's server side, bounded: what one client can hold of a modelcast server (DESIGN.md, security model).

Every modelcast HTTP listener (the registry behind its announce fast path, the node's
local API, the node's relay listener) runs through here, so the limits are set once:

* **request head**: whole within :attr:`ServerLimits.header_timeout_s` of its first byte,
  else a 408 and the connection closes (a half-sent request holds nothing for long);
* **request body**: a pause of :attr:`ServerLimits.body_timeout_s` without a byte while a
  body is incomplete (and not because we stopped reading) gets a 408 and the connection
  closes (a PUT that promised 256 KiB and sent 1 byte); bodies are read with
  :func:`read_body`, bounded however they are framed (``Content-Length`` or chunked);
* **keep-alive**: an idle connection closes after :attr:`ServerLimits.keepalive_timeout_s`
  (aiohttp's own default is 3,630 s);
* **connections**: at most :attr:`ServerLimits.max_connections` in all and
  :attr:`ServerLimits.max_per_ip` from one address (:class:`ConnectionLimiter`); one more
  is answered 503 and closed at once, before anything is read;
* **logs**: a malformed request is a 400 and at most one short line per cause per minute
  (aiohttp's own logging is a traceback of ~11 lines per bad request).

The timers are event-driven: one ``call_at`` per connection, re-armed only when it fires.
This is the one module that knows aiohttp's request handler from the inside
(:class:`BoundedRequestHandler`); the rest of the code calls :func:`start_bounded`,
:func:`read_body` and :func:`read_json`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import resource
import socket
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from modelcast.errors import BadRequest, TooLarge

__all__ = ["MAX_JSON_BODY", "NODE_API_LIMITS", "REGISTRY_LIMITS", "RELAY_LIMITS", "BoundedRequestHandler",
           "BoundedServer", "BoundedSite", "ConnectionLimiter", "ServerLimits", "loads_json", "read_body",
           "read_json", "start_bounded"]

# A small JSON body of an API (a reference and a few flags): the node's routes read no more.
MAX_JSON_BODY = 64 * 1024
LOG_EVERY_S = 60.0  # one line per cause per this many seconds
# File descriptors left to everything else in the process (databases, libtorrent, logs,
# outgoing connections) when the connection caps are fitted under `ulimit -n`.
FD_RESERVE = 256


@dataclass(frozen=True)
class ServerLimits:
    """What one listener lets its clients hold (the README's "Limits" table)."""

    header_timeout_s: float = 10.0  # a request head, from its first byte
    body_timeout_s: float = 15.0  # the longest pause between body bytes while a handler reads
    keepalive_timeout_s: float = 75.0  # an idle connection between requests
    max_connections: int = 1024  # open connections in all (also kept under `ulimit -n`)
    max_per_ip: int = 256  # open connections from one address


# The registry serves every node of its zone (each keeps a connection or two) behind one
# listener; a trusted proxy (--trusted-proxy) is exempt from the per-address cap.
REGISTRY_LIMITS = ServerLimits(max_connections=8192, max_per_ip=256)
# The node's local API: the runtime glue and the CLI on the same host.
NODE_API_LIMITS = ServerLimits(max_connections=512, max_per_ip=256)
# Nodes of other zones: each pushes and fetches at most 8 + 8 pieces at a time.
RELAY_LIMITS = ServerLimits(max_connections=512, max_per_ip=64)


# ---- logging ---------------------------------------------------------------------------
class RateLimitedLog:
    """Log lines of one listener, at most one per cause per :data:`LOG_EVERY_S`.

    Given to aiohttp's request handler as its ``logger``: aiohttp calls ``exception`` for
    a malformed request (with the parser's error) and for a handler that failed.
    """

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def once(self, cause: str) -> bool:
        """Whether a line for ``cause`` may be logged now (and, if so, count it as logged)."""
        now = time.monotonic()
        if now - self._last.get(cause, -1e18) < LOG_EVERY_S:
            self.suppressed += 1
            return False
        if len(self._last) > 1024:  # causes are few; a flood of distinct ones must not grow this
            self._last = {k: t for k, t in self._last.items() if now - t < LOG_EVERY_S}
        self._last[cause] = now
        return True

    def line(self, cause: str, msg: str, *args: Any) -> None:
        if self.once(cause):
            self.log.warning(f"{self.what}: {msg}; more like it are not logged for a minute", *args)

    # -- what aiohttp's RequestHandler calls -------------------------------------------
    def exception(self, msg: str, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, ConnectionError):
            return  # the client went away (or we closed it for being slow): nothing to say
        if isinstance(exc, HttpProcessingError):
            # A malformed request: aiohttp has answered it with a 400; one line, no traceback.
            cause = type(exc).__name__
            detail = " ".join(str(getattr(exc, "message", "") or exc).split())[:160]
            self.line(f"bad:{cause}", "malformed request (%s: %s), answered 400", cause, detail)
            return
        # Anything else is a bug: keep its traceback, but not once per request.
        cause = f"exc:{type(exc).__name__ if exc else msg}"
        if self.once(cause):
            self.log.error(f"{self.what}: {msg}", *args, exc_info=exc_info, **kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.exception(msg, *args, **kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if self.once(f"warn:{msg}"):
            self.log.warning(msg, *args, **kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log.info(msg, *args, **kwargs)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log.debug(msg, *args, **kwargs)


# ---- connection caps -------------------------------------------------------------------
class Slot:
    """One admitted connection; :meth:`release` (idempotent) gives its place back."""

    __slots__ = ("_limiter", "ip")

    def __init__(self, limiter: "ConnectionLimiter", ip: str | None) -> None:
        self._limiter: ConnectionLimiter | None = limiter
        self.ip = ip

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter._release(self.ip)
            self._limiter = None


_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%b")


class ConnectionLimiter:
    """Counts open connections, in all and per client address; refuses those over a cap.

    ``exempt`` (addresses or networks, e.g. the registry's trusted proxies) are held only
    to the total: a proxy carries many clients' connections.
    """

    def __init__(self, total: int, per_ip: int, log: RateLimitedLog, exempt: Iterable[Any] = ()) -> None:
        self.total = total
        self.per_ip = per_ip
        self.log = log
        self.exempt = tuple(exempt)
        self.open = 0
        self.refused = 0
        self.by_ip: dict[str | None, int] = {}
        self._exempt_cache: dict[str, bool] = {}

    def _is_exempt(self, ip: str | None) -> bool:
        if not self.exempt or ip is None:
            return False
        known = self._exempt_cache.get(ip)
        if known is None:
            if len(self._exempt_cache) > 65536:
                self._exempt_cache.clear()
            try:
                addr = ipaddress.ip_address(ip)
                known = any(addr in net for net in self.exempt)
            except ValueError:
                known = False
            self._exempt_cache[ip] = known
        return known

    def admit(self, transport: asyncio.BaseTransport, ip: str | None = None) -> Slot | None:
        """A slot for this new connection (from ``ip``, else its peer's), or None: answered 503 and closed."""
        if ip is None:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) and peer else None
        held = self.by_ip.get(ip, 0)
        if self.open >= self.total:
            why = f"{self.open} connections are open (at most {self.total})"
        elif held >= self.per_ip and not self._is_exempt(ip):
            why = f"{held} connections from {ip} are open (at most {self.per_ip} from one address)"
        else:
            self.open += 1
            self.by_ip[ip] = held + 1
            return Slot(self, ip)
        self.refused += 1
        # One line a minute per cap, however many addresses hit it.
        self.log.line("refused:" + ("total" if self.open >= self.total else "per_ip"), "refused a connection from "
                      "%s: %s", ip, why)
        body = json.dumps({"error": {"code": "busy", "message": f"too many connections: {why}; retry later"}}).encode()
        transport.write(_REFUSED % (len(body), body))  # type: ignore[attr-defined]
        transport.close()
        return None

    def _release(self, ip: str | None) -> None:
        self.open -= 1
        held = self.by_ip.get(ip, 0) - 1
        if held > 0:
            self.by_ip[ip] = held
        else:
            self.by_ip.pop(ip, None)


def fit_under_fd_limit(total: int, log: logging.Logger, what: str) -> int:
    """``total`` connections, or fewer if the process may not open that many files.

    The soft ``RLIMIT_NOFILE`` is raised towards the hard one first (as Go's runtime does);
    past the limit, accept() fails with EMFILE and every client suffers, not only the
    greedy one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = total + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft - FD_RESERVE < total:
        fitted = max(16, soft - FD_RESERVE)
        log.warning("%s: at most %d connections at once (ulimit -n is %d); raise the open-files limit for more",
                    what, fitted, soft)
        return fitted
    return total


# ---- the request handler -----------------------------------------------------------------
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n%b")


class BoundedRequestHandler(web.RequestHandler):
    """aiohttp's request handler (one per connection) with a head timeout, a body timeout and a slot.

    Given ``slot`` (a connection the announce fast path already admitted and now hands
    over), it keeps that slot; otherwise it asks the limiter for one when the connection
    is made.
    """

    def __init__(self, bounded: "BoundedServer", slot: Slot | None = None) -> None:
        super().__init__(bounded.server, loop=bounded.loop, keepalive_timeout=bounded.limits.keepalive_timeout_s,
                         access_log=None, logger=bounded.log)  # type: ignore[arg-type]
        self._bounded = bounded
        self._slot = slot
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._head_since: float | None = None  # a partial request head arrived then
        self._in_request = False  # from a request's head to its answer
        self._body: Any = None  # the payload (StreamReader) a handler may be waiting on
        self._request: web.BaseRequest | None = None
        self._rx_at = 0.0  # when the last bytes arrived

    # ---- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._slot is None:
            self._slot = self._bounded.limiter.admit(transport)
            if self._slot is None:
                self._refused = True
                return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        if self._slot is not None:
            self._slot.release()
        body = self._body
        if body is not None and not body.is_eof() and body.exception() is None:
            # aiohttp reads the rest of an unread body after the answer ("lingering", up to
            # 10 s) and, the connection gone, would wait all of it: end that read now.
            body.set_exception(ConnectionResetError("the connection closed before the request body ended"))
        self._body = self._request = None
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        now = self._loop.time()
        self._rx_at = now
        body = self._body
        into_body = self._in_request or (body is not None and not body.is_eof())
        super().data_received(data)
        # Bytes between requests (not a request's body, nor a pipelined request behind one
        # being handled) begin a request head: it must be whole within the head timeout.
        if data and not into_body and self._head_since is None and not self._in_request:
            self._head_since = now
            self._arm(now + self._bounded.limits.header_timeout_s)

    # ---- called by BoundedServer's request factory, and by aiohttp when a request is done ----
    def request_started(self, request: web.BaseRequest, payload: Any) -> None:
        self._head_since = None
        self._in_request = True
        self._request = request
        if payload.is_eof():
            self._body = None
            return
        self._body = payload
        self._rx_at = self._loop.time()
        self._arm(self._rx_at + self._bounded.limits.body_timeout_s)

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._in_request = False

    # ---- the timer -------------------------------------------------------------------------
    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        limits = self._bounded.limits
        now = self._loop.time()
        deadlines = []
        if self._head_since is not None:
            if self._in_request:
                self._head_since = None  # the head arrived; its request is handled
            elif now >= self._head_since + limits.header_timeout_s:
                self._time_out("head", f"no whole request head within {limits.header_timeout_s:g} s")
                return
            else:
                deadlines.append(self._head_since + limits.header_timeout_s)
        body = self._body
        if body is not None:
            if body.is_eof() or body.exception() is not None:
                self._body = None
            elif not self.transport.is_reading():  # type: ignore[attr-defined]
                # Paused by us (the handler reads slower than the client sends): not the client's doing.
                self._rx_at = now
                deadlines.append(now + limits.body_timeout_s)
            elif now >= self._rx_at + limits.body_timeout_s:
                self._time_out("body", f"no request body bytes for {limits.body_timeout_s:g} s")
                return
            else:
                deadlines.append(self._rx_at + limits.body_timeout_s)
        if deadlines:
            self._arm(min(deadlines))

    def _time_out(self, cause: str, why: str) -> None:
        """Close a connection whose client is too slow: a 408 if no answer has begun, then close."""
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        ip = peer[0] if isinstance(peer, tuple) and peer else None
        self._bounded.timed_out += 1
        self._bounded.log.line(f"slow:{cause}", "closed a connection from %s: %s", ip, why)
        request = self._request
        if self.transport is not None and (request is None or request.writer.output_size == 0):
            body = json.dumps({"error": {"code": "timeout", "message": f"{why}; closing"}}).encode()
            self.transport.write(_TIMED_OUT % (len(body), body))
        self.force_close()


class BoundedServer:
    """The protocol factory for ``loop.create_server``: aiohttp's ``web.Server`` behind the bounds.

    Calling it (``slot``: a connection already admitted elsewhere) makes the
    :class:`BoundedRequestHandler` of one connection.  The handler arguments of
    ``AppRunner(..., **kwargs)`` are not used: access logging is off and the keep-alive is
    the limits'.
    """

    def __init__(self, server: web.Server, limits: ServerLimits, log: logging.Logger, what: str,
                 exempt: Iterable[Any] = ()) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.log = RateLimitedLog(log, what)
        total = fit_under_fd_limit(limits.max_connections, log, what)
        self.limits = replace(limits, max_connections=total)
        self.limiter = ConnectionLimiter(total, limits.max_per_ip, self.log, exempt)
        self.timed_out = 0
        make_request = server.request_factory

        def request_factory(message, payload, protocol, writer, task):  # type: ignore[no-untyped-def]
            request = make_request(message, payload, protocol, writer, task)
            if isinstance(protocol, BoundedRequestHandler):
                protocol.request_started(request, payload)
            return request

        # Handlers read the factory from the server when they are made: set before the first.
        server.request_factory = request_factory

    def __call__(self, slot: Slot | None = None) -> BoundedRequestHandler:
        return BoundedRequestHandler(self, slot)


@dataclass
class BoundedSite:
    """A started listener: the socket, the bounded factory and the aiohttp runner behind them."""

    runner: web.AppRunner
    server: asyncio.Server
    bounded: BoundedServer

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, then close the connections and run the app's cleanup (the runner's)."""
        self.server.close()
        await self.runner.cleanup()


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port), not yet listening.

    Binding before anything else starts keeps the address: a daemon that first starts
    listeners of its own on ephemeral ports could otherwise be handed this very port.
    Raises OSError if the address cannot be bound.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def start_bounded(runner: web.AppRunner, host: str, port: int, limits: ServerLimits, log: logging.Logger,
                        what: str, *, exempt: Iterable[Any] = (), ssl_context: ssl.SSLContext | None = None,
                        sock: socket.socket | None = None) -> BoundedSite:
    """Serve ``runner`` (already set up) on ``host:port`` (0: a free port) within ``limits``, over TLS with ``ssl_context``.

    With ``sock`` (from :func:`bind_socket`) it serves on that socket instead of binding.
    Raises OSError if the address cannot be bound (the caller says what to do about it).
    """
    bounded = BoundedServer(runner.server, limits, log, what, exempt)
    where = {"sock": sock} if sock is not None else {"host": host, "port": port}
    server = await asyncio.get_running_loop().create_server(
        bounded, **where, ssl=ssl_context,
        # A handshake that never completes holds a connection no longer than a request head may.
        ssl_handshake_timeout=limits.header_timeout_s if ssl_context is not None else None)
    return BoundedSite(runner, server, bounded)


# ---- request bodies ----------------------------------------------------------------------
async def read_body(request: web.BaseRequest, limit: int, what: str) -> bytes:
    """The whole body of ``request``, at most ``limit`` bytes however it is framed (else TooLarge, a 413).

    ``client_max_size`` bounds aiohttp's own ``request.read()``; this bounds each route by
    what it needs, before a byte too many is kept.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge(f"{what} is {declared} bytes; at most {limit} are read")
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise TooLarge(f"{what} is over {limit} bytes; at most {limit} are read")
    return bytes(buf)


def loads_json(raw: bytes, what: str, example: str = "") -> Any:
    """``raw`` as JSON; malformed, not UTF-8 or absurdly deep is a BadRequest (a 400), never a traceback."""
    try:
        return json.loads(raw)
    except RecursionError:  # thousands of '[': the C decoder recurses once per level
        raise BadRequest(f"{what} nests too deeply to be JSON we accept" + (f"; send {example}" if example else "")) \
            from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc})" + (f"; send {example}" if example else "")) from None


async def read_json(request: web.BaseRequest, limit: int, what: str, example: str = "", *,
                    empty: Any = None) -> Any:
    """The body of ``request`` as JSON, read with :func:`read_body`; ``empty`` (if not None) for no body."""
    raw = await read_body(request, limit, what)
    if not raw and empty is not None:
        return empty
    return loads_json(raw, what, example)
