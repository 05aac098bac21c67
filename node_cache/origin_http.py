"""Plain-HTTP range answers read in a worker thread: the origin's bytes off the event loop.

A cold pull's bytes come from the registry's web seed in runs of up to 8 MiB.  Read through
aiohttp on the event loop, each piece went through the loop's reads of 256 KiB, a join into
one ``bytes`` and the loop's bookkeeping, all holding the GIL on the loop's thread.  For a
plain ``http://`` registry :class:`PlainRange` reads the answer with a blocking socket in a
worker thread instead: ``http.client`` parses the status line and headers, and each piece is
one ``read`` that receives straight into a new ``bytes`` object with the GIL released while
the kernel copies (no other copy in Python), which the same thread hands to libtorrent.

:class:`PlainRange` is one request on its own connection (``Connection: close``; a run is
megabytes, so a connection per request costs nothing measurable).  :meth:`PlainRange.abort`,
from any thread, shuts the socket down: a thread blocked in ``recv`` wakes at once, which is
how a cancelled pull or a stopping daemon ends its fetches.  TLS registries and the object
store an S3 origin redirects to are read through aiohttp as before (origin_fill.py).
"""

from __future__ import annotations

import http.client
import socket
import threading
from urllib.parse import urlsplit

READ_TIMEOUT_S = 30.0  # no byte for this long: the registry replica hangs (aiohttp's sock_read for the rest)

# What a broken or hung connection raises while reading an answer: the replica went away.
CONNECTION_ERRORS = (OSError, http.client.HTTPException)


class Aborted(Exception):
    """The fetch was abandoned (the pull was cancelled or the daemon stops)."""


class PlainRange:
    """One GET to a plain ``http://`` URL, its answer read with blocking calls in a worker thread."""

    def __init__(self, url: str, headers: dict[str, str], source_address: tuple[str, int] | None = None,
                 timeout: float = READ_TIMEOUT_S):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain http:// URL: {url}")
        self.target = parts.path + (f"?{parts.query}" if parts.query else "") or "/"
        self.headers = {**headers, "Connection": "close"}
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout,
                                               source_address=source_address)
        self.conn.auto_open = 0  # a connection closed by abort() is not opened again
        self.resp: http.client.HTTPResponse | None = None
        self.aborted = threading.Event()
        self._lock = threading.Lock()

    # -- in the worker thread ------------------------------------------------------------------
    def open(self) -> None:
        """Connect, send the request and read the status line and headers."""
        self.conn.connect()
        self._check()
        self.conn.request("GET", self.target, headers=self.headers)
        self.resp = self.conn.getresponse()
        self._check()

    @property
    def status(self) -> int:
        return self.resp.status

    @property
    def content_length(self) -> int | None:
        value = self.resp.getheader("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.resp.getheader(name, default)

    def read(self, n: int) -> bytes:
        """Exactly the next ``n`` bytes of the body (one new ``bytes``, received into directly)."""
        data = self.resp.read(n)
        self._check()
        if len(data) != n:
            raise http.client.IncompleteRead(data, n - len(data))
        return data

    def skip(self, n: int) -> None:
        """Read and drop the next ``n`` bytes (a 200 for the whole file: up to our range)."""
        while n:
            n -= len(self.read(min(n, 1 << 20)))

    def _check(self) -> None:
        if self.aborted.is_set():
            raise Aborted()

    # -- from any thread -----------------------------------------------------------------------
    def abort(self) -> None:
        """End the fetch: a thread blocked reading it wakes (and raises) at once."""
        self.aborted.set()
        with self._lock:
            sock = self.conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self.resp is not None:
                self.resp.close()
            self.conn.close()
