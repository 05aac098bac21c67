"""Relay targets from node registration, and the tokens that let one relay exchange through.

Registration.  A node names its relay URL (where nodes of other zones push pieces to it and
fetch pieces from it) in its heartbeat body (``"relay": URL``), which its node key
authenticates (tracker/nodekeys.py).  The registry records the URL for that node only when
its host is the heartbeat's source address (the address a trusted proxy forwarded, for
heartbeats through one: ``--trusted-proxy``); a URL is held by one node at a time.  The web
seed believes a request's ``X-Modelcast-Relay`` only if it is a registered URL at the
requester's own address, so the first-copy gate (tracker/firstcopy.py) hands out as relay
targets (``X-Modelcast-Relay-To``/``-From``) registered URLs only: a URL nobody registered,
or one registered from another address, is never handed to anyone.

Tokens.  Each relay target handed out carries a token (``X-Modelcast-Relay-To-Token``,
``X-Modelcast-Relay-From-Token``, in the same order) for exactly that node, that artifact,
that file range and that direction, valid for seconds; the listening node checks it with
its own relay secret, which it learns from its heartbeat answer.  Why this design is in
modelcast/relay_auth.py.  The registry secret behind every node's relay secret is one random
value in the registry database (:meth:`tracker.store.RegistryStore.registry_secret`), so
replicas over one database issue tokens every node accepts.

Bounded: at most :data:`MAX_NODES` registrations, least recently heard from forgotten first.

With ``--swarm-store redis://`` the registrations live in Redis
(:class:`tracker.gate_redis.RedisRelayRegistry`), so every replica believes them.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from typing import Iterable
from urllib.parse import urlsplit

from modelcast.relay_auth import make_token, node_relay_secret

from .announce import normalize_ip
from .peer_policy import parse_networks

log = logging.getLogger("modelcast.tracker")

MAX_NODES = 200_000
MAX_URL_LEN = 256
REFUSAL_LOG_S = 60.0


def plain_relay_url(value: object) -> str | None:
    """``value`` as a plain ``http(s)://host[:port]`` URL (normalized), or None if it is anything else."""
    if not isinstance(value, str) or not value or len(value) > MAX_URL_LEN:
        return None
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query or parts.fragment \
            or parts.path not in ("", "/"):
        return None
    return f"{parts.scheme}://{parts.netloc}"


def url_host_is(url: str, address: str | None) -> bool:
    """Whether ``url``'s host is the IP address ``address``."""
    if not address:
        return False
    host = urlsplit(url).hostname
    return host is not None and normalize_ip(host) == normalize_ip(address)


class RelayRegistry:
    """node id -> its registered relay URL (and back), and the tokens for relays between them."""

    def __init__(self, trusted_proxies: Iterable[str] = (), max_nodes: int = MAX_NODES) -> None:
        self.trusted = parse_networks(trusted_proxies, "--trusted-proxy")
        self.max_nodes = max_nodes
        self.secret: bytes | None = None  # the registry secret, read from the database at start
        self._url: OrderedDict[str, str] = OrderedDict()  # node id -> URL
        self._node: dict[str, str] = {}  # URL -> node id
        self.refused = 0
        self._logged: dict[str, float] = {}
        self._secrets: dict[str, str] = {}  # node id -> its relay secret, derived from self._secrets_of
        self._secrets_of: bytes | None = None

    # ---- registration (heartbeats) ----------------------------------------------------
    def source(self, remote: str | None, forwarded_for: str | None) -> str | None:
        """The heartbeat's source address: ``remote``, or, from a trusted proxy, the last X-Forwarded-For hop."""
        if remote and forwarded_for and self.trusted:
            try:
                addr = ipaddress.ip_address(normalize_ip(remote))
            except ValueError:
                addr = None
            if addr is not None and any(addr in net for net in self.trusted):
                return forwarded_for.split(",")[-1].strip() or remote
        return remote

    def register(self, node_id: str, value: object, source: str | None) -> str | None:
        """Record ``value`` as ``node_id``'s relay URL if it is one at ``source``; the URL now registered."""
        url = plain_relay_url(value)
        if url is None or not url_host_is(url, source):
            if value is not None:
                self.refused += 1
                self._log("register", f"relay URL {str(value)[:80]!r} of node {node_id} not registered: it is not a "
                                      f"plain http(s)://host:port URL at the heartbeat's address {source}")
            self.forget(node_id)
            return None
        old = self._url.get(node_id)
        if old != url:
            if old is not None:
                self._node.pop(old, None)
            holder = self._node.get(url)
            if holder is not None and holder != node_id:
                self._url.pop(holder, None)  # a URL is one node's: the newest registration wins
            self._node[url] = node_id
        self._url[node_id] = url
        self._url.move_to_end(node_id)
        while len(self._url) > self.max_nodes:
            gone_id, gone_url = self._url.popitem(last=False)
            self._node.pop(gone_url, None)
        return url

    def pending(self, node_id: str):
        """The write of ``node_id``'s registration to a shared store, to await; None in process."""
        return None

    def forget(self, node_id: str) -> None:
        url = self._url.pop(node_id, None)
        if url is not None and self._node.get(url) == node_id:
            del self._node[url]

    def node_secret(self, node_id: str) -> str | None:
        """``node_id``'s relay secret (derived once per node: every heartbeat answer carries it)."""
        if self.secret is None:
            return None
        if self._secrets_of is not self.secret or len(self._secrets) >= self.max_nodes:
            self._secrets, self._secrets_of = {}, self.secret
        found = self._secrets.get(node_id)
        if found is None:
            found = self._secrets[node_id] = node_relay_secret(self.secret, node_id)
        return found

    # ---- the web seed -----------------------------------------------------------------
    def believed(self, value: str | None, remote: str | None) -> str | None:
        """A web-seed request's relay URL if it is registered and at the requester's address; else None."""
        url = plain_relay_url(value)
        if url is None or url not in self._node or not url_host_is(url, remote):
            if value:
                self.refused += 1
                self._log("believed", f"relay URL {value[:80]!r} from {remote} not used: no node registered it "
                                      "from that address")
            return None
        return url

    def token(self, url: str, method: str, digest: str, path: str, first: int, last: int) -> str | None:
        """A token for ``method`` of bytes ``first..last`` of ``path`` at the node registered at ``url``."""
        node_id = self._node.get(url)
        secret = None if node_id is None else self.node_secret(node_id)
        if secret is None:
            return None
        return make_token(secret, method, node_id, digest, path, first, last, time.time())

    def _log(self, cause: str, message: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(cause, -1e9) > REFUSAL_LOG_S:
            self._logged[cause] = now
            log.warning("%s (further such refusals are not logged for a minute)", message)


def make_relay_registry(swarms, trusted_proxies: Iterable[str] = ()) -> RelayRegistry:
    """Relay registrations for the swarm store ``swarms``: in process, or in its Redis."""
    from .swarm_redis import RedisSwarmStore

    if isinstance(swarms, RedisSwarmStore):
        from .gate_redis import RedisRelayRegistry
        return RedisRelayRegistry(swarms, trusted_proxies)
    return RelayRegistry(trusted_proxies)
