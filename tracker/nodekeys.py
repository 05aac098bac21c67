"""Node identity: a node id is held by the node that first proved a secret for it (issue #15).

A node daemon keeps a random secret beside its node id (``state/node_key`` in its cache)
and sends it with every heartbeat and leave (``X-Modelcast-Node-Key``).  The first
heartbeat that carries a key binds the id to it (trust on first use); from then on a
heartbeat or a leave of that id with another key, or with none, is refused, and announces
tie an entry to the node (``node=``) only with the announce token derived from the key
(``nk=``, :func:`modelcast.wire.announce_token`), so nobody can make a node's heartbeats
keep their entries alive, or make a node's leave take others' entries with it.  Ids never
bound (clients without a key, older nodes) are guarded as before: like reads.

The registry keeps hashes, not keys, in memory, least recently seen forgotten first past
:data:`MAX_NODES`.  A restarted registry binds each id again on its next heartbeat.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict

from modelcast.errors import Unauthorized
from modelcast.wire import NODE_KEY_HEADER, announce_token

MAX_NODES = 200_000
MAX_KEY_LEN = 128


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class NodeKeys:
    """node id -> (hash of its key, its announce token), bound on first use."""

    def __init__(self, max_nodes: int = MAX_NODES) -> None:
        self.max_nodes = max_nodes
        self._bound: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self.refused = 0

    def _check(self, node_id: str, key: str | None, what: str) -> None:
        bound = self._bound.get(node_id)
        if bound is None:
            return
        if key is None or not hmac.compare_digest(_hash(key), bound[0]):
            self.refused += 1
            raise Unauthorized(f"{what} of node {node_id} refused: that node id is held by another node's key "
                               f"({NODE_KEY_HEADER})")
        self._bound.move_to_end(node_id)

    def heartbeat(self, node_id: str, key: str | None) -> None:
        """Allow a heartbeat of ``node_id`` with ``key``, binding the id to a first key; else Unauthorized."""
        if key is not None and not 16 <= len(key) <= MAX_KEY_LEN:
            raise Unauthorized(f"{NODE_KEY_HEADER} must be 16 to {MAX_KEY_LEN} characters")
        if node_id in self._bound:
            self._check(node_id, key, "heartbeat")
        elif key is not None:
            self._bound[node_id] = (_hash(key), announce_token(key))
            while len(self._bound) > self.max_nodes:
                self._bound.popitem(last=False)

    def leave(self, node_id: str, key: str | None) -> None:
        """Allow ``node_id`` to leave; Unauthorized unless ``key`` is the one it is bound to (if bound)."""
        self._check(node_id, key, "leave")

    def may_announce_as(self, node_id: str, token: str | None) -> bool:
        """Whether an announce with ``node=node_id`` and ``nk=token`` speaks for that node (on the hot path)."""
        bound = self._bound.get(node_id)
        return bound is None or (token is not None and hmac.compare_digest(token, bound[1]))
