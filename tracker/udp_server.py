"""The BEP 15 UDP tracker: connection IDs, the request path, and a thin asyncio adapter.

:class:`ConnectionIds` makes and checks connection IDs from a secret and the clock value
it is given.  :class:`UdpTracker` ties the packet functions of :mod:`tracker.udp` to a
:class:`~tracker.swarm.SwarmRegistry` (in memory, no I/O) and maps one datagram to at
most one answer, so the whole request path is tested without a socket.
:class:`UdpTrackerProtocol` is the asyncio adapter.

Connection IDs are stateless: a keyed BLAKE2b MAC of the client's address and a time
bucket, truncated to 64 bits.  Nothing is stored per client, so a flood of connects
cannot grow memory, and a spoofed source address never learns a valid ID.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import os
import socket
import time
from typing import Awaitable
from dataclasses import dataclass, field

from modelcast.errors import ModelcastError

from .announce import SwarmCounts, normalize_ip
from .nodekeys import NodeKeys
from .peer_policy import PeerPolicy
from .swarm import SwarmRegistry, tracker_result
from .udp import (ACTION_ANNOUNCE, ACTION_CONNECT, ACTION_SCRAPE, MAX_DATAGRAM, AnnounceRequest, ConnectRequest,
                  UdpProtocolError, encode_announce, encode_connect, encode_error, encode_scrape, parse_header,
                  parse_request)

_ACTION_NAMES = {ACTION_CONNECT: "connect", ACTION_ANNOUNCE: "announce", ACTION_SCRAPE: "scrape"}

log = logging.getLogger("modelcast.tracker.udp")

# A connection ID is accepted for CONNECTION_ID_BUCKETS whole buckets of
# CONNECTION_ID_BUCKET_S seconds after the one it was issued in, so it stays valid for
# 2 to 3 minutes: BEP 15 asks trackers to accept an ID for two minutes, clients to use
# it for one.
CONNECTION_ID_BUCKET_S = 60.0
CONNECTION_ID_BUCKETS = 2


# ---------------------------------------------------------------------------------------
# Connection IDs


class ConnectionIds:
    """Stateless, unforgeable BEP 15 connection IDs.

    An ID is a keyed BLAKE2b MAC (a MAC by construction, one C call) of the client's
    address and a time bucket, truncated to 64 bits.  It proves that the client received
    our connect answer at that address, which is what stops a spoofed source address
    from getting announce answers sent to a victim.  ``now`` is any clock in seconds
    that does not go backwards; the secret is per process, so a restart invalidates
    every ID and clients reconnect, as BEP 15 expects.
    """

    def __init__(self, secret: bytes | None = None, *, bucket_s: float = CONNECTION_ID_BUCKET_S,
                 buckets: int = CONNECTION_ID_BUCKETS):
        self._secret = secret if secret is not None else os.urandom(32)
        if not 16 <= len(self._secret) <= 64:
            raise ValueError("connection id secret must be 16 to 64 bytes")
        self._bucket_s = bucket_s
        self._buckets = buckets

    def _mac(self, host: str, port: int, bucket: int) -> bytes:
        msg = b"%s|%d|%d" % (host.encode(), port, bucket)
        return hashlib.blake2b(msg, key=self._secret, digest_size=8).digest()

    def issue(self, host: str, port: int, now: float) -> int:
        """A connection ID for the client at ``(host, port)``."""
        return int.from_bytes(self._mac(host, port, int(now // self._bucket_s)), "big")

    def valid(self, connection_id: int, host: str, port: int, now: float) -> bool:
        """True if ``connection_id`` was issued to ``(host, port)`` recently enough."""
        given = connection_id.to_bytes(8, "big")
        bucket = int(now // self._bucket_s)
        for b in range(bucket, bucket - self._buckets - 1, -1):
            # Constant-time comparison, so the MAC cannot be learnt byte by byte from timings.
            if hmac.compare_digest(self._mac(host, port, b), given):
                return True
        return False


# ---------------------------------------------------------------------------------------
# The request path, still without sockets


@dataclass
class UdpStats:
    """Counters of the UDP tracker, for logs, stats and benchmarks."""

    packets: int = 0
    connects: int = 0
    announces: int = 0  # answered with peers
    scrapes: int = 0  # answered with counts
    errors: int = 0  # error actions sent
    dropped: int = 0  # packets too short to answer
    internal_errors: int = 0  # bugs: unexpected exceptions while answering
    send_errors: int = 0  # sends refused by the OS or dropped under backpressure
    # (announce|scrape|connect|other, TRACKER_RESULTS entry) -> error actions sent; for the registry's metrics.
    failures: dict[tuple[str, str], int] = field(default_factory=dict)

    def failed(self, action: int, exc: BaseException) -> None:
        key = (_ACTION_NAMES.get(action, "other"), tracker_result(exc))
        self.failures[key] = self.failures.get(key, 0) + 1


class UdpTracker:
    """Maps one request datagram to at most one answer, against a swarm registry.

    Never raises for bad input: malformed requests, expired connection IDs and unknown
    info-hashes become error actions; a packet with no transaction ID gets no answer.
    """

    def __init__(self, swarms: SwarmRegistry, *, interval: int, default_numwant: int = 50,
                 max_numwant: int = 200, ids: ConnectionIds | None = None, policy: PeerPolicy | None = None,
                 node_keys: NodeKeys | None = None):
        self.swarms = swarms
        self.interval = interval
        self.default_numwant = default_numwant
        self.max_numwant = max_numwant
        self.ids = ids or ConnectionIds()
        self.policy = policy or PeerPolicy()
        self.node_keys = node_keys or NodeKeys()
        self.stats = UdpStats()

    def handle(self, data: bytes, addr: tuple, now: float) -> bytes | None:
        """The answer to ``data`` received from ``addr`` (a socket address tuple), or None."""
        stats = self.stats
        stats.packets += 1
        host, port = addr[0], addr[1]
        tid = None
        action = -1
        try:
            connection_id, action, tid = parse_header(data)
            if action != ACTION_CONNECT and not self.ids.valid(connection_id, host, port, now):
                # Checked before the body is parsed, so a sender that never received a
                # connect answer learns nothing but this short message.
                raise UdpProtocolError("connection id expired or invalid; connect again", tid)
            req = parse_request(data, default_numwant=self.default_numwant, max_numwant=self.max_numwant)
            if isinstance(req, ConnectRequest):
                stats.connects += 1
                return encode_connect(tid, self.ids.issue(host, port, now))
            if isinstance(req, AnnounceRequest):
                answer = self._announce(req, host, now)
                stats.announces += 1
                return answer
            found = self.swarms.scrape(req.info_hashes)
            stats.scrapes += 1
            if inspect.isawaitable(found):
                return self._later(found, lambda f: encode_scrape(tid, [f.get(ih, SwarmCounts()) for ih in req.info_hashes]),
                                   tid, action)
            zero = SwarmCounts()
            return encode_scrape(tid, [found.get(ih, zero) for ih in req.info_hashes])
        except ModelcastError as exc:
            if tid is None:
                stats.dropped += 1
                return None
            stats.errors += 1
            stats.failed(action, exc)
            return encode_error(tid, str(exc))
        except Exception as exc:
            stats.internal_errors += 1
            # A bug, not bad input; logged sparingly so a flood cannot fill the disk.
            if stats.internal_errors in (1, 10, 100) or stats.internal_errors % 10_000 == 0:
                log.exception("UDP tracker failed on a %d-byte packet from %s (%d such failures)",
                              len(data), host, stats.internal_errors)
            if tid is None:
                return None
            stats.errors += 1
            stats.failed(action, exc)
            return encode_error(tid, "internal error in the tracker")

    def _announce(self, req: AnnounceRequest, host: str, now: float) -> bytes:
        # The kernel writes IPv4 addresses in canonical form; only IPv6 ones (scope
        # ids, IPv4-mapped addresses of a dual-stack socket) need normalising.
        ipv6 = ":" in host
        if ipv6:
            host = normalize_ip(host) or host
            ipv6 = ":" in host
        a = req.announce
        # The 32-bit address field cannot name an IPv6 peer (BEP 15); for IPv4 it is
        # honoured like the HTTP ``ip=`` parameter: from trusted proxies only.
        ip = self.policy.address(a._replace(ip=None) if ipv6 else a, host)
        if a.node is not None and not self.node_keys.may_announce_as(a.node, a.node_token):
            a = a._replace(node=None)
        result = self.swarms.announce(a, ip, now)
        if inspect.isawaitable(result):
            return self._later(result, lambda r: encode_announce(req.transaction_id, self.interval, r.counts, r.peers,
                                                                 ipv6=ipv6), req.transaction_id, 1)
        return encode_announce(req.transaction_id, self.interval, result.counts, result.peers, ipv6=ipv6)

    async def _later(self, result: Awaitable, encode, tid: int, action: int) -> bytes:
        """The answer of a swarm store over the network (tracker/swarm_redis.py), or its error."""
        try:
            return encode(await result)
        except ModelcastError as exc:
            self.stats.errors += 1
            self.stats.failed(action, exc)
            return encode_error(tid, str(exc))


# ---------------------------------------------------------------------------------------
# asyncio adapter


class UdpTrackerProtocol(asyncio.DatagramProtocol):
    """The asyncio adapter: one datagram in, at most one out, on the event loop thread.

    ``datagram_received`` never raises.  While the transport's send buffer is full
    (``pause_writing``), answers are dropped instead of queued: UDP clients retry, and
    an unbounded queue would let a flood exhaust memory.
    """

    def __init__(self, tracker: UdpTracker, clock=time.monotonic):
        self.tracker = tracker
        self.transport: asyncio.DatagramTransport | None = None
        self._clock = clock
        self._paused = False

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        assert self.transport is not None, "the UDP tracker is not started"
        sockname = self.transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    @property
    def port(self) -> int:
        return self.address[1]

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        # asyncio reads every datagram into a fresh 256 KiB buffer by default; BEP 15
        # packets fit in MAX_DATAGRAM.
        if hasattr(transport, "max_size"):
            transport.max_size = MAX_DATAGRAM

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            answer = self.tracker.handle(data, addr, self._clock())
            if inspect.isawaitable(answer):
                asyncio.ensure_future(answer).add_done_callback(lambda fut: self._send_later(fut, addr))
                return
            if answer is not None:
                if self._paused:
                    self.tracker.stats.send_errors += 1
                else:
                    self.transport.sendto(answer, addr)
        except Exception:  # Never let one datagram take the endpoint down.
            self.tracker.stats.internal_errors += 1
            log.debug("UDP tracker could not answer %s", addr, exc_info=True)

    def _send_later(self, fut: asyncio.Future, addr) -> None:
        try:
            answer = fut.result()
            if self.transport is not None and not self._paused and not self.transport.is_closing():
                self.transport.sendto(answer, addr)
        except Exception:  # noqa: BLE001 - as datagram_received: one datagram never takes the endpoint down
            self.tracker.stats.internal_errors += 1
            log.debug("UDP tracker could not answer %s", addr, exc_info=True)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away, and the like.
        self.tracker.stats.send_errors += 1
        log.debug("UDP tracker socket error: %s", exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def start_udp_tracker(tracker: UdpTracker, host: str, port: int) -> UdpTrackerProtocol:
    """Bind a UDP tracker endpoint on ``host:port`` (0 for an ephemeral port) and start serving."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    _, protocol = await loop.create_datagram_endpoint(lambda: UdpTrackerProtocol(tracker), local_addr=(host, port),
                                                      family=family)
    sock = protocol.transport.get_extra_info("socket")
    try:
        # A larger receive buffer absorbs bursts (a fleet re-announcing at once) that the
        # event loop drains a moment later; the kernel caps it at net.core.rmem_max.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    except OSError:
        pass
    return protocol
