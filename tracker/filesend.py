"""Sending a file origin's blob range: one blocking ``sendfile`` per range, in a bounded pool of threads.

asyncio's own ``loop.sendfile`` (what aiohttp's ``FileResponse`` uses) sends on the
non-blocking socket: each time the socket buffer fills it parks the transfer, waits for
the event loop to say the socket is writable and calls ``sendfile`` again, which costs
the registry more CPU in Python (epoll registration, futures, callbacks) than the kernel
spends moving the bytes.  Here the range goes out from a worker thread instead, on a
duplicate of the connection's descriptor switched to blocking mode for the send: the
kernel sleeps and wakes inside one ``sendfile`` call, and Python runs once per range.

While a range is sent, the event loop neither reads nor writes the connection (reading
is paused, as asyncio's ``loop.sendfile`` does, and the response owns the writing); the
socket goes back to non-blocking mode before the loop uses it again.

What a slow or hostile client can hold:

* **a thread, for a while**: a send that moves no byte for :data:`SEND_STALL_S` seconds
  (``SO_SNDTIMEO``) ends, and the connection is closed;
* **never another request's turn**: at most :data:`SEND_THREADS` ranges go out from
  threads at once; one more is sent the way asyncio does it, on the event loop, so
  stalled readers slow nobody down but themselves;
* **nothing after a shutdown**: a cancelled send (the server stopping) shuts the socket
  down, which ends the blocked call at once.

TLS connections (``sendfile`` cannot encrypt) are sent from ``pread`` chunks through the
transport; connections with bytes still buffered in the transport, the asyncio way.

Blobs are immutable and content-addressed, so :class:`BlobCache` keeps each one open for
a few seconds after use (:data:`BLOB_TTL_S`, at most :data:`BLOB_CACHE_MAX` at once):
the runs of one pull ask for the same few files back to back, and each request then
costs no ``stat``, ``open`` or ``close`` (each a trip to a worker thread).

Both belong to the application (:func:`setup_file_sending`, key :data:`FILE_SENDING`):
its cleanup closes the cached blobs and ends the pool's threads, so a stopped registry
(or one of the tests' in-process apps) leaves neither behind.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import socket
import stat
import struct
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

log = logging.getLogger("modelcast.tracker")

SEND_THREADS = 32  # ranges sent from threads at once; one more goes out on the event loop
SEND_STALL_S = 30.0  # a send that moves no byte for this long ends, and its connection closes
BLOB_TTL_S = 10.0  # a blob's descriptor stays open this long after it was opened
BLOB_CACHE_MAX = 64  # blobs kept open at once (the registry's connection cap leaves 256 descriptors spare)
PREAD_CHUNK = 256 << 10  # what one read moves on the TLS path


class SendStalled(ConnectionResetError):
    """The client took no byte for :data:`SEND_STALL_S` seconds: the connection is closed.

    A ConnectionError, so aiohttp's request handler ends the connection without a traceback.
    """


def _send_blocking(sock: socket.socket, file_fd: int, offset: int, count: int, stall_s: float,
                   head: bytes = b"") -> int:
    """Worker thread: send ``head``, then ``count`` bytes of ``file_fd`` from ``offset`` on ``sock``; return
    the file's bytes sent.

    ``sock`` is a duplicate of the connection's descriptor: switching it to blocking mode
    switches the connection (they share the open file), and that is undone before return.
    The head goes with ``MSG_MORE``: the kernel holds it back to leave in one segment with
    the first of the file's bytes.
    """
    sent = 0
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(stall_s),
                                                                          int(stall_s % 1 * 1_000_000)))
    try:
        view = memoryview(head)
        while view:
            try:
                view = view[sock.send(view, socket.MSG_MORE):]
            except BlockingIOError:
                raise SendStalled(f"the client took no byte for {stall_s:g} s (of the answer's head)") from None
        while sent < count:
            try:
                n = os.sendfile(sock.fileno(), file_fd, offset + sent, count - sent)
            except BlockingIOError:  # SO_SNDTIMEO ran out without a byte taken
                raise SendStalled(f"the client took no byte for {stall_s:g} s "
                                  f"({sent} of {count} bytes sent)") from None
            if n == 0:
                raise ConnectionResetError(f"the file ended {count - sent} bytes early")
            sent += n
        return sent
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
        sock.setblocking(False)


class FileSender:
    """The bounded pool that sends file ranges with blocking ``sendfile`` (see the module's docstring)."""

    def __init__(self, threads: int = SEND_THREADS, stall_s: float = SEND_STALL_S) -> None:
        self.threads = threads
        self.stall_s = stall_s
        self.busy = 0  # ranges being sent from threads now (touched on the event loop only)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="webseed-send")

    def usable(self, transport: asyncio.BaseTransport | None) -> bool:
        """Whether a range can go out on ``transport`` from a thread now (else: the asyncio way)."""
        return (transport is not None and not transport.is_closing() and self.busy < self.threads
                and transport.get_extra_info("sslcontext") is None
                and transport.get_extra_info("socket") is not None
                and isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size() == 0)

    async def send(self, transport: asyncio.Transport, file_fd: int, offset: int, count: int,
                   head: bytes = b"") -> None:
        """Send ``count`` bytes of ``file_fd`` from ``offset`` on the connection (after ``head``, the answer's
        head, if given); the caller checked :meth:`usable`.

        Raises ConnectionError (and closes the connection) when the client goes away or
        stalls; aiohttp's handler then ends the connection quietly.
        """
        loop = asyncio.get_running_loop()
        conn = transport.get_extra_info("socket")
        sock = socket.socket(conn.family, conn.type, conn.proto, fileno=os.dup(conn.fileno()))
        resume_reading = transport.is_reading()
        transport.pause_reading()
        self.busy += 1
        fut = loop.run_in_executor(self._pool, _send_blocking, sock, file_fd, offset, count, self.stall_s, head)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The server is stopping: end the blocked call, and let the thread go before the socket does.
            sock.shutdown(socket.SHUT_RDWR)
            await asyncio.wait([fut])
            raise
        except OSError as exc:
            if isinstance(exc, SendStalled):
                log.warning("web seed: closing a connection from %s: %s", transport.get_extra_info("peername"), exc)
            transport.close()
            if isinstance(exc, ConnectionError):
                raise
            raise ConnectionResetError(str(exc)) from exc
        finally:
            self.busy -= 1
            sock.close()
        if resume_reading and not transport.is_closing():
            transport.resume_reading()

    def close(self, wait: bool = False) -> None:
        """No more sends; with ``wait``, return once the pool's threads have ended."""
        self._pool.shutdown(wait=wait, cancel_futures=True)


async def send_buffered(writer, fd: int, offset: int, count: int) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset`` through aiohttp's ``writer`` (TLS: the transport encrypts).

    ``pread`` leaves the descriptor's position alone, so requests sharing a cached blob do not race.
    """
    loop = asyncio.get_running_loop()
    while count:
        chunk = await loop.run_in_executor(None, os.pread, fd, min(PREAD_CHUNK, count), offset)
        if not chunk:
            raise ConnectionResetError(f"the file ended {count} bytes early")
        await writer.write(chunk)
        offset += len(chunk)
        count -= len(chunk)


class Blob:
    """An open blob: its descriptor, size and modification time, and how many answers are sending from it."""

    __slots__ = ("path", "fd", "size", "mtime", "last_modified", "opened_at", "users", "retired")

    def __init__(self, path: str, fd: int, size: int, mtime: float, opened_at: float) -> None:
        self.path, self.fd, self.size, self.mtime, self.opened_at = path, fd, size, mtime, opened_at
        self.last_modified = email.utils.formatdate(mtime, usegmt=True)  # the header, formatted once
        self.users = 0
        self.retired = False  # out of the cache: closed when its last user is done


def _open_blob(path: str) -> tuple[int, int, float] | None:
    """Worker thread: (descriptor, size, mtime) of a regular file, or None if there is none at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return fd, st.st_size, st.st_mtime
    except BaseException:
        os.close(fd)
        raise


class BlobCache:
    """Blobs kept open for :data:`BLOB_TTL_S` after they were opened (used on the event loop only)."""

    def __init__(self, ttl_s: float = BLOB_TTL_S, max_open: int = BLOB_CACHE_MAX) -> None:
        self.ttl_s = ttl_s
        self.max_open = max_open
        self._open: OrderedDict[str, Blob] = OrderedDict()  # oldest first
        self.opens = 0  # files opened (a measure of what the cache saves)

    async def get(self, path: Path | str) -> Blob | None:
        """The open blob at ``path`` (opened in a worker thread if not cached), or None if there is no file.

        Pair :meth:`hold` and :meth:`release` around sending from it; call :meth:`hold`
        before the next ``await``, or the blob may be closed meanwhile.
        """
        key = str(path)
        now = time.monotonic()
        self._expire(now)
        blob = self._open.get(key)
        if blob is not None:
            return blob
        opened = await asyncio.to_thread(_open_blob, key)
        if opened is None:
            return None
        self.opens += 1
        blob = self._open.get(key)  # opened by another request meanwhile: use that one
        if blob is not None:
            os.close(opened[0])
            return blob
        blob = self._open[key] = Blob(key, *opened, opened_at=now)
        while len(self._open) > self.max_open:
            self._retire(self._open.popitem(last=False)[1])
        return blob

    def hold(self, blob: Blob) -> None:
        blob.users += 1

    def release(self, blob: Blob) -> None:
        blob.users -= 1
        if blob.retired and blob.users == 0:
            os.close(blob.fd)

    def _expire(self, now: float) -> None:
        while self._open:
            blob = next(iter(self._open.values()))
            if now - blob.opened_at < self.ttl_s:
                return
            del self._open[blob.path]
            self._retire(blob)

    def _retire(self, blob: Blob) -> None:
        blob.retired = True
        if blob.users == 0:
            os.close(blob.fd)

    def close(self) -> None:
        for blob in self._open.values():
            self._retire(blob)
        self._open.clear()


class FileSending:
    """One application's :class:`FileSender` and :class:`BlobCache`, and their end (see :func:`setup_file_sending`)."""

    def __init__(self, sender: FileSender | None = None, blobs: BlobCache | None = None) -> None:
        self.sender = sender if sender is not None else FileSender()
        self.blobs = blobs if blobs is not None else BlobCache()

    async def close(self) -> None:
        """Close every cached blob and end the pool's threads (sends under way end first)."""
        self.blobs.close()
        await asyncio.to_thread(self.sender.close, wait=True)


def setup_file_sending(app: web.Application) -> FileSending:
    """Give ``app`` its sender and blob cache (:data:`FILE_SENDING`), closed by the app's cleanup.

    Threads are started on first use only, so an app that never sends starts none; once
    the app has stopped (its cleanup ran, after aiohttp ended or cancelled every answer),
    it holds no sending thread and no blob descriptor.
    """
    sending = app[FILE_SENDING] = FileSending()

    async def close(app: web.Application) -> None:
        await app[FILE_SENDING].close()  # the one in place then (tests may swap in a smaller pool)

    app.on_cleanup.append(close)
    return sending


# Here, not in tracker/state.py, which the handlers' modules import.
FILE_SENDING = web.AppKey("file_sending", FileSending)
