"""Relay tokens: the registry's short-lived permission for one cross-zone exchange of pieces.

Why tokens, and why this shape (issue #15).  A node's relay listener takes pieces pushed by,
and serves pieces to, nodes of other zones that it has never met, at the registry's word.
Checking every request with the registry would put a round trip on each piece; trusting any
request would let anyone push garbage at a node (wasting its hashing) or read its pieces.
So the registry, when its first-copy gate tells node A to push bytes to node B (or tells B
to fetch them from A), hands out a token that B's (or A's) listener checks *locally*:

    token = "<expiry>.<first>-<last>.<hmac>"
    hmac  = HMAC-SHA256(relay secret of the listening node,
                        method | listening node id | artifact digest | file path | first | last | expiry)

* The key is the listening node's own relay secret, which the registry derives from one
  random registry secret (kept in its SQL database, so replicas over one database agree)
  and the node id, and tells only that node, in the answer to its heartbeat (which its node
  key authenticates).  A token for node B is worthless at node C, and nodes never learn
  each other's secrets.
* The scope is the exact byte range of one file the gate admitted; the listener accepts a
  piece only if the piece's file bytes lie inside it, for that artifact, and that method
  (PUT for pushes, GET for fetches).
* Expiry is wall-clock (``time.time()``) and short (:data:`TOKEN_TTL_S`): clocks of
  registry and nodes need to agree to within that much.

Pure: strings and HMACs, no I/O; both sides import it.
"""

from __future__ import annotations

import hmac

TOKEN_TTL_S = 45.0
# The header carrying the token on a relay request (PUT or GET of a piece).
RELAY_TOKEN_HEADER = "X-Modelcast-Relay-Token"
MAX_TOKEN_LEN = 200


def node_relay_secret(registry_secret: bytes, node_id: str) -> str:
    """The relay secret of ``node_id`` (hex), derived from the registry's one secret."""
    # hmac.digest: OpenSSL's one-shot HMAC, several times cheaper than hmac.new() per call
    # (a heartbeat answer carries the node's secret).
    return hmac.digest(registry_secret, b"modelcast-relay-secret:" + node_id.encode("utf-8", "surrogateescape"),
                       "sha256").hex()


def _mac(secret: str, method: str, node_id: str, digest: str, path: str, first: int, last: int, expiry: int) -> str:
    msg = "\n".join((method, node_id, digest, path, str(first), str(last), str(expiry)))
    return hmac.digest(secret.encode(), msg.encode("utf-8", "surrogateescape"), "sha256").hex()


def make_token(secret: str, method: str, node_id: str, digest: str, path: str, first: int, last: int,
               now: float) -> str:
    """A token for ``method`` (PUT/GET) of pieces holding bytes ``first..last`` of ``path`` at node ``node_id``."""
    expiry = int(now + TOKEN_TTL_S)
    return f"{expiry}.{first}-{last}.{_mac(secret, method, node_id, digest, path, first, last, expiry)}"


def check_token(secret: str | None, token: str | None, method: str, node_id: str | None, digest: str, path: str,
                file_offset: int, length: int, now: float) -> str | None:
    """None if ``token`` allows ``method`` of the piece at ``path`` bytes ``file_offset``.. (``length``); else the cause.

    Causes (one word each, for counting and logging): ``missing``, ``unready`` (this node
    has no relay secret yet), ``malformed``, ``expired``, ``forged`` (wrong artifact, node,
    method or range: the HMAC does not match), ``range`` (the piece lies outside the range).
    """
    if not token:
        return "missing"
    if secret is None or node_id is None:
        return "unready"
    if len(token) > MAX_TOKEN_LEN:
        return "malformed"
    try:
        expiry_s, span, mac = token.split(".")
        first_s, last_s = span.split("-")
        expiry, first, last = int(expiry_s), int(first_s), int(last_s)
    except ValueError:
        return "malformed"
    if expiry < now:
        return "expired"
    if expiry > now + 2 * TOKEN_TTL_S:
        return "malformed"  # not one this registry issues
    if not hmac.compare_digest(mac, _mac(secret, method, node_id, digest, path, first, last, expiry)):
        return "forged"
    if not (first <= file_offset and file_offset + max(length, 1) - 1 <= last):
        return "range"
    return None
