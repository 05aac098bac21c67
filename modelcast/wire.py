"""Wire constants shared by the registry and the node daemon: headers, route shapes, auth.

Both sides of every exchange import these names from here, so a header or a path is
spelt once.  Pure: strings and small functions, no I/O.
"""

from __future__ import annotations

# ---- the web seed's first-copy gate (tracker/firstcopy.py) ------------------------------
# A node marks an origin request "first copy": the registry may answer 409 when the bytes
# were just served to another node of its zone, and the node takes them from its peers.
FIRST_COPY_HEADER = "X-Modelcast-First-Copy"
# The requesting node's zone.
ZONE_HEADER = "X-Modelcast-Zone"
# Where the requesting node serves pieces to other zones: <base>/v1/artifacts/<digest>/pieces/<n>.
RELAY_HEADER = "X-Modelcast-Relay"
# In a 409: fetch the piece from this node (of another zone) instead.
RELAY_FROM_HEADER = "X-Modelcast-Relay-From"
# With served bytes: push them to these nodes of other zones (space-separated base URLs).
RELAY_TO_HEADER = "X-Modelcast-Relay-To"
# Beside each: the relay tokens (modelcast/relay_auth.py) for those nodes, in the same order.
RELAY_FROM_TOKEN_HEADER = "X-Modelcast-Relay-From-Token"
RELAY_TO_TOKEN_HEADER = "X-Modelcast-Relay-To-Token"
# A node may take its origin bytes from a short-lived presigned URL of the object store:
# the registry then answers 307 with that URL for exactly the asked range instead of
# streaming the bytes itself (S3 origins; tracker/webseed.py).
ACCEPT_REDIRECT_HEADER = "X-Modelcast-Accept-Redirect"
# On a node's libtorrent URL seed requests (node_cache/origin_fill.py): a requester that neither
# pushes to other zones nor follows redirects; served only while no other node pulls the
# artifact (tracker/firstcopy.py), and only from a file origin.
URL_SEED_HEADER = "X-Modelcast-Url-Seed"

# ---- node identity (tracker/nodekeys.py) ----------------------------------------------
# The node's own secret, with each heartbeat and leave: the first one binds its node id.
NODE_KEY_HEADER = "X-Modelcast-Node-Key"
# The node id, with the key, on web seed requests: the first-copy gate counts only proven nodes.
NODE_ID_HEADER = "X-Modelcast-Node"
# Announce parameter proving ``node=``: derived from the key, so announce URLs (which
# libtorrent may log, and which travel to the tracker in the clear) never carry the key.
NODE_TOKEN_PARAM = "nk"


def announce_token(node_key: str) -> str:
    """The announce token of a node key (``nk=``): a hash of the key, not the key."""
    import hashlib

    return hashlib.sha256(b"modelcast-announce:" + node_key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


# ---- routes ----------------------------------------------------------------------------
WEBSEED_PREFIX = "/v1/webseed/"
HEALTH_PATH = "/v1/health"
ANNOUNCE_PATH = "/announce"
SCRAPE_PATH = "/scrape"


def webseed_base(registry_url: str, digest: str) -> str:
    """The BEP 19 web-seed URL of an artifact: append ``<torrent_name>/<path>`` (quoted) for a file."""
    return f"{registry_url.rstrip('/')}{WEBSEED_PREFIX}{digest}/"


def piece_path(digest: str, piece: int) -> str:
    """The relay listener's path of one piece of an artifact (GET to fetch, PUT to push)."""
    return f"/v1/artifacts/{digest}/pieces/{piece}"


def heartbeat_path(node_id: str) -> str:
    """Where a node daemon sends its heartbeat (POST) to the registry."""
    return f"/v1/nodes/{node_id}/heartbeat"


def node_path(node_id: str) -> str:
    """A node's liveness record at the registry (DELETE: the node leaves every swarm)."""
    return f"/v1/nodes/{node_id}"


def bearer(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``token`` (none without one)."""
    return {"Authorization": f"Bearer {token}"} if token else {}
