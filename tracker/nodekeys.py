"""Node identity: a node id is held by the node that first proved a secret for it (issue #15).

A node daemon keeps a random secret beside its node id (``state/node_key`` in its cache)
and sends it with every heartbeat and leave (``X-Modelcast-Node-Key``).  The first
heartbeat that carries a key binds the id to it: enrolment, which needs the registry's
node token (tracker/liveness.py; trust on first use only where the registry allows it).
From then on a heartbeat or a leave of that id with another key, or with none, is refused,
and announces tie an entry to the node (``node=``) only with the announce token derived
from the key (``nk=``, :func:`modelcast.wire.announce_token`), so nobody can make a node's
heartbeats keep their entries alive, or make a node's leave take others' entries with it.

Bindings are kept in the registry database (table ``node_keys``, tracker/store.py), so
they survive a restart and every replica on one database holds the same ones.  This class
is the in-memory cache in front of it: loaded at start, filled on a miss (heartbeats and
leaves look the store up; the announce hot path, :meth:`may_announce_as`, never does).
It holds hashes, not keys, least recently seen forgotten first past :data:`MAX_NODES`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict

from modelcast.errors import Unauthorized
from modelcast.wire import NODE_KEY_HEADER, announce_token

MAX_NODES = 200_000
MAX_KEY_LEN = 128


def key_hash(key: str) -> str:
    """What the registry keeps of a node key (hex): a hash, never the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def check_key_shape(key: str | None) -> None:
    if key is not None and not 16 <= len(key) <= MAX_KEY_LEN:
        raise Unauthorized(f"{NODE_KEY_HEADER} must be 16 to {MAX_KEY_LEN} characters")


class NodeKeys:
    """node id -> (hash of its key, its announce token): a cache of the store's bindings."""

    def __init__(self, max_nodes: int = MAX_NODES) -> None:
        self.max_nodes = max_nodes
        self._bound: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.refused = 0

    @property
    def count(self) -> int:  # not __len__: an empty cache must stay truthy ("node_keys or NodeKeys()")
        return len(self._bound)

    def remember(self, node_id: str, hashed: str, token: str) -> None:
        """Cache a binding (from the store, or just made there)."""
        self._bound[node_id] = (hashed, token)
        self._bound.move_to_end(node_id)
        while len(self._bound) > self.max_nodes:
            self._bound.popitem(last=False)

    def is_bound(self, node_id: str) -> bool:
        return node_id in self._bound

    def matches(self, node_id: str, key: str | None) -> bool:
        """Whether ``key`` is the key ``node_id`` is bound to (False when not bound, or no key)."""
        bound = self._bound.get(node_id)
        return bound is not None and key is not None and hmac.compare_digest(key_hash(key), bound[0])

    def check(self, node_id: str, key: str | None, what: str) -> None:
        """Unauthorized unless ``node_id`` is unbound here or bound to ``key``."""
        bound = self._bound.get(node_id)
        if bound is None:
            return
        if not self.matches(node_id, key):
            self.refused += 1
            raise Unauthorized(f"{what} of node {node_id} refused: that node id is held by another node's key "
                               f"({NODE_KEY_HEADER})")
        self._bound.move_to_end(node_id)

    def binding(self, node_id: str) -> object:
        """``node_id``'s binding as cached now (an opaque token: compare it with ``is``), or None."""
        return self._bound.get(node_id)

    def still_bound(self, node_id: str, binding: object) -> bool:
        """Whether ``node_id`` is still bound as ``binding`` (from :meth:`binding`) says; if so, it was seen now.

        A key checked against a binding that is still cached (the same object: a binding
        remembered again, even the same one, is a new object) needs no second check.
        """
        if binding is None or self._bound.get(node_id) is not binding:
            return False
        self._bound.move_to_end(node_id)
        return True

    def may_announce_as(self, node_id: str, token: str | None) -> bool:
        """Whether an announce with ``node=node_id`` and ``nk=token`` speaks for that node (on the hot path)."""
        bound = self._bound.get(node_id)
        return bound is None or (token is not None and hmac.compare_digest(token, bound[1]))
