"""Client for the registry HTTP API (``/v1/``).  Other components use only this.

The API, JSON unless said otherwise; errors are ``{"error": {"code", "message"}}`` with
the HTTP status of :mod:`modelcast.errors`; writes need ``Authorization: Bearer TOKEN``
when the registry has a token; reads (resolve, manifest, torrent, list, web seed) need
the read token or the write token when the registry has a read token (``--read-token``).
Announce and scrape are always open: BitTorrent clients send no headers, and only
info-hashes of stored artifacts are accepted.  A zone registry (``--upstream URL``)
answers reads of references it does not hold from its parent, and keeps them
(tracker/federation.py):

``GET  /v1/health``                         -> ``{"ok": true}``
``POST /v1/auth/check``                     -> ``{"ok": true}`` if the token may write, else 401
``POST /v1/artifacts``                      body ``{"manifest": {...}, "torrent": "<base64>",
                                            "origin": {"url": "file:///..|s3://..", "s3_endpoint": null},
                                            "tag": "v1"|null}`` -> 201/200 ``{"digest", "name", "tag", "created": bool}``
``GET  /v1/resolve?ref=REF``                -> ``{"digest", "name", "manifest": {...}}``
``GET  /v1/artifacts/{digest}``             -> the canonical manifest bytes
``GET  /v1/artifacts/{digest}/torrent``     -> the torrent (``announce`` set to this registry)
``GET  /v1/artifacts?name=&content_key=&limit=&after=`` -> ``{"artifacts": [...], "next": cursor|null}``
``GET  /v1/webseed/{digest}/{torrent_name}/{path}`` -> file bytes from the origin, HTTP Range (BEP 19)
``DELETE /v1/tags/{name}:{tag}``            -> ``{"name", "tag", "digest"}``; the artifact stays (404 if no such tag)
``DELETE /v1/artifacts/{digest}?force=0|1&name=`` -> ``{"digest", "name", "tags_removed": [...]}``; 409 while
                                            tags point at it unless ``force=1`` (they go too); origin blobs stay
``GET  /v1/stats``                          -> ``{"origin_bytes_served", "origin_requests", "announces", "swarms"}``
``GET  /metrics``                           -> Prometheus text (tracker/metrics.py); guarded like a read
``GET  /announce``, ``GET /scrape``         BitTorrent (BEP 3/23/48); extra query ``zone=`` and ``node=`` on announce
``POST /v1/nodes/{node_id}/heartbeat``      body ``{"zone": z, "ttl_s": 3.0, "artifacts": [...], "more_artifacts": n}``
                                            -> ``{"ok": true, "ttl_s", "entries", "reported": bool}``: keeps every
                                            swarm entry announced with ``node=node_id`` alive for ``ttl_s`` more
                                            seconds (capped by ``--max-heartbeat-ttl``); guarded like a read.
                                            ``artifacts`` (optional; modelcast/progress.py, at most 128, body at
                                            most 64 KiB) is what the node pulls and holds; without it the last
                                            report is kept; ``reported`` says whether the registry holds one
``DELETE /v1/nodes/{node_id}``              -> ``{"ok": true, "removed": n}``: the node leaves every swarm at once
``GET  /v1/nodes?zone=&limit=``             -> ``{"nodes": [{"node", "zone", "alive", "gone", "last_heartbeat",
                                            "artifacts": [...], ...}], "more", "live", "gone"}``: from heartbeats,
                                            at most ``limit`` (1000; up to 10000), ``more`` left out
``GET  /v1/rollout/{digest}``               -> ``{"digest", "name", "total_bytes", "nodes": [row per node pulling or
                                            holding it], "zones": [sums], "summary": {..., "done"}, "swarm"}``
``GET  /ui``                                the console (tracker/console/): HTML pages, read access as above
UDP (BEP 15, ``--udp-listen``)              connect, announce, scrape; ``zone=`` as BEP 41 URL data
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

from adapters.http import JsonClient
from modelcast.errors import IntegrityError, ModelcastError
from modelcast.manifest import Manifest, canonical_json, sha256_digest
from modelcast.reference import Reference
from modelcast.wire import NODE_KEY_HEADER, NODE_TOKEN_PARAM, announce_token, bearer

from .bencode import bdecode


class RegistryClient(JsonClient):
    """The registry API; ``base_url`` may list every replica (comma-separated): see :class:`JsonClient`."""

    service = "registry"

    async def health(self) -> dict:
        return await self.request("GET", "/v1/health", what="registry health")

    async def check_write_access(self, what: str) -> None:
        """Fail now with Unauthorized if this client's token may not write."""
        await self.request("POST", "/v1/auth/check", what=what)

    async def publish(self, manifest: Manifest, torrent: bytes, origin_url: str,
                      s3_endpoint: str | None, tag: str | None) -> dict:
        body = {
            "manifest": manifest.body(),
            "torrent": base64.b64encode(torrent).decode("ascii"),
            "origin": {"url": origin_url, "s3_endpoint": s3_endpoint},
            "tag": tag,
        }
        ref = f"{manifest.name}:{tag}" if tag else manifest.name
        return await self.request("POST", "/v1/artifacts", json=body, what=f"publish {ref}")

    async def resolve(self, ref: str | Reference) -> tuple[str, Manifest]:
        """Resolve a reference to ``(digest, manifest)``; the digest is checked locally."""
        ref_s = str(ref)
        parsed = Reference.parse(ref_s)
        answer = await self.request("GET", f"/v1/resolve?ref={quote(ref_s, safe='')}", what=f"resolve {ref_s}")
        digest = answer["digest"]
        if parsed.digest is not None and digest != parsed.digest:
            # A reference that names a digest is answered with that digest or an error (DESIGN.md).
            raise IntegrityError(f"the registry at {self.base_url} answered {digest} when asked for {parsed.digest}; "
                                 "it is misconfigured or not to be trusted")
        inline = answer.get("manifest")
        if isinstance(inline, dict):
            # The answer carries the manifest: if its canonical form hashes to the digest,
            # it is the manifest, and a second round trip is saved.
            data = canonical_json(inline)
            if sha256_digest(data) == digest:
                return digest, Manifest.from_bytes(data, expected_digest=digest)
        data = await self.manifest_bytes(digest)
        return digest, Manifest.from_bytes(data, expected_digest=digest)

    async def swarm_size(self, info_hash: bytes, zone: str | None = None) -> int | None:
        """Peers in the swarm of ``info_hash`` (BEP 48 scrape: seeds and downloaders, every zone); None if unknown."""
        params = f"info_hash={quote(info_hash, safe='')}" + (f"&zone={quote(zone, safe='')}" if zone else "")
        try:
            body = await self.request("GET", f"/scrape?{params}", raw=True, what="scrape", timeout_s=5)
            counts = bdecode(body).get(b"files", {}).get(info_hash)
        except (ModelcastError, ValueError, AttributeError, TypeError):
            return None
        if counts is None:
            return 0  # a swarm nobody joined yet
        return int(counts.get(b"complete", 0)) + int(counts.get(b"incomplete", 0))

    async def manifest_bytes(self, digest: str) -> bytes:
        return await self.request("GET", f"/v1/artifacts/{digest}", raw=True, what=f"manifest {digest}")

    async def torrent(self, digest: str) -> bytes:
        return await self.request("GET", f"/v1/artifacts/{digest}/torrent", raw=True, what=f"torrent of {digest}")

    async def find_by_content(self, content_key: str) -> dict | None:
        answer = await self.request(
            "GET", f"/v1/artifacts?content_key={quote(content_key, safe='')}&limit=1", what="content lookup"
        )
        items = answer.get("artifacts") or []
        return items[0] if items else None

    async def list_artifacts(self, name: str | None = None, limit: int = 100, after: str | None = None) -> dict:
        query = f"?limit={limit}"
        if name:
            query += f"&name={quote(name, safe='')}"
        if after:
            query += f"&after={quote(after, safe='')}"
        return await self.request("GET", f"/v1/artifacts{query}", what="list artifacts")

    async def delete_tag(self, name: str, tag: str) -> dict:
        """Remove ``name:tag``; the artifact stays, reachable by digest."""
        ref = f"{name}:{tag}"
        return await self.request("DELETE", f"/v1/tags/{quote(ref, safe='/:')}", what=f"delete {ref}")

    async def delete_artifact(self, digest: str, *, force: bool = False, name: str | None = None) -> dict:
        """Remove the artifact ``digest`` (only if it is named ``name``, when given).

        Refused with Conflict while tags point at it, unless ``force``.
        """
        query = f"?force={int(force)}" + (f"&name={quote(name, safe='')}" if name else "")
        what = f"delete {name}@{digest}" if name else f"delete {digest}"
        return await self.request("DELETE", f"/v1/artifacts/{digest}{query}", what=what)

    async def stats(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/stats", what="registry stats")

    def webseed_url(self, digest: str) -> str:
        # BEP 19: for a multi-file torrent the client appends "<name>/<path>".
        return f"{self.base_url}/v1/webseed/{digest}/"

    def announce_urls(self, zone: str | None = None, node_id: str | None = None,
                      node_key: str | None = None) -> list[str]:
        """The announce URL of every replica, the current one first (libtorrent gets one tier each)."""
        return [self.announce_url(zone, node_id, node_key, base=base) for base in self.replicas()]

    def announce_url(self, zone: str | None = None, node_id: str | None = None, node_key: str | None = None,
                     base: str | None = None) -> str:
        params = [f"zone={quote(zone, safe='')}"] if zone else []
        if node_id:
            params.append(f"node={quote(node_id, safe='')}")
            if node_key:
                params.append(f"{NODE_TOKEN_PARAM}={announce_token(node_key)}")
        return f"{base or self.base_url}/announce" + ("?" + "&".join(params) if params else "")

    async def heartbeat(self, node_id: str, zone: str, ttl_s: float, report: dict | None = None,
                        node_key: str | None = None, node_token: str | None = None,
                        relay: str | None = None) -> dict:
        """Keep the node's swarm entries alive; ``report`` (node_cache/report.py) says what it pulls and holds.

        ``node_key`` proves the node id (the first heartbeat with a key binds the id to it);
        ``node_token``, the registry's node enrolment token, is that first heartbeat's bearer;
        ``relay`` registers the node's relay URL, and the answer then holds its relay secret.
        """
        headers = {NODE_KEY_HEADER: node_key} if node_key else {}
        headers.update(bearer(node_token))
        return await self.request("POST", f"/v1/nodes/{quote(node_id, safe='')}/heartbeat",
                                  json={"zone": zone, "ttl_s": ttl_s, **({"relay": relay} if relay else {}),
                                        **(report or {})},
                                  what=f"heartbeat of node {node_id}", timeout_s=max(1.0, ttl_s), headers=headers)

    async def nodes(self, zone: str | None = None, limit: int = 1000) -> dict:
        """The nodes the registry knows, with what each last reported (``GET /v1/nodes``)."""
        query = f"?limit={limit}" + (f"&zone={quote(zone, safe='')}" if zone else "")
        return await self.request("GET", f"/v1/nodes{query}", what="node list")

    async def rollout(self, digest: str) -> dict:
        """One artifact across the fleet: each node pulling or holding it (``GET /v1/rollout/{digest}``)."""
        return await self.request("GET", f"/v1/rollout/{digest}", what=f"rollout of {digest}")

    async def leave(self, node_id: str, node_key: str | None = None) -> dict:
        return await self.request("DELETE", f"/v1/nodes/{quote(node_id, safe='')}", what=f"leave of node {node_id}",
                                  timeout_s=2.0, headers={NODE_KEY_HEADER: node_key} if node_key else {})
