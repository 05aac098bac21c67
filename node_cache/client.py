"""Client for a node daemon's local HTTP API (used by the CLI and by serve_glue)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

from modelcast.errors import PullFailed, from_error_body
from adapters.http import JsonClient
from adapters.terminal import ProgressBar


class NodeClient(JsonClient):
    service = "node daemon"

    async def health(self) -> dict:
        return await self.request("GET", "/v1/health", what="node health")

    async def pull(self, ref: str, wait: bool = True, pin: str | None = None, hf: dict | None = None) -> dict:
        """Make ``ref`` warm (``wait``: until verified); ``pin`` names a holder to pin it for.

        ``hf`` (``{"repo": "org/name@rev" or "", "cache": "/abs"}``, needs ``wait``) lays it
        out in that Hugging Face hub cache too; the answer's ``hf`` says where.
        """
        body = {"ref": ref, "wait": wait, **({"pin": pin} if pin else {}), **({"hf": hf} if hf is not None else {})}
        # A waiting pull lasts as long as the download: no client-side timeout.
        return await self.request("POST", "/v1/pull", json=body, what=f"pull {ref}",
                                  timeout_s=None if wait else 60)

    async def status(self, digest: str) -> dict:
        return await self.request("GET", f"/v1/pulls/{digest}", what=f"status of {digest}")

    async def artifacts(self) -> list[dict]:
        return (await self.listing())["artifacts"]

    async def listing(self) -> dict:
        return await self.request("GET", "/v1/artifacts", what="list node artifacts")

    async def resolve(self, ref: str) -> str:
        answer = await self.request("GET", f"/v1/resolve?ref={quote(ref, safe='')}", what=f"resolve {ref}")
        return answer["digest"]

    async def pin(self, ref: str, holder: str = "user") -> dict:
        return await self.request("POST", "/v1/pins", json={"ref": ref, "holder": holder}, what=f"pin {ref}")

    async def unpin(self, digest: str, holder: str | None = None) -> dict:
        query = f"?holder={quote(holder, safe='')}" if holder else ""
        return await self.request("DELETE", f"/v1/pins/{digest}{query}", what=f"unpin {digest}")

    async def lay_out_hf(self, digest: str, repo: str | None = None, cache: str | None = None) -> dict:
        """Lay a ready artifact out in a Hugging Face hub cache (``repo`` None: as published)."""
        body = {"repo": repo or "", **({"cache": cache} if cache else {})}
        return await self.request("POST", f"/v1/artifacts/{digest}/hf", json=body,
                                  what="Hugging Face layout", timeout_s=None)

    async def evict(self, digest: str) -> dict:
        """Delete a complete, unpinned artifact now (its Hugging Face layouts first)."""
        return await self.request("DELETE", f"/v1/artifacts/{digest}", what=f"evict {digest}", timeout_s=None)

    async def verify(self, digest: str | None = None) -> dict:
        path = f"/v1/artifacts/{digest}/verify" if digest else "/v1/verify"
        return await self.request("POST", path, what=f"verify {digest or 'all artifacts'}", timeout_s=None)


async def pull_with_progress(node_url: str, ref: str, *, wait: bool = True, progress: bool = False,
                             poll_s: float = 0.2, hf: dict | None = None,
                             ca: Path | None = None) -> dict:
    """Start a pull and follow it to the end, drawing a progress bar on a terminal.

    With ``hf`` (``{"repo", "cache"}``, as :meth:`NodeClient.lay_out_hf` takes) the ready
    artifact is laid out in that Hugging Face hub cache; the answer's ``hf`` says where.
    """
    async with NodeClient(node_url, ca=ca) as node:
        status = await _follow(node, ref, wait=wait, progress=progress, poll_s=poll_s)
        if hf is not None and status["state"] == "ready":
            status["hf"] = await node.lay_out_hf(status["digest"], hf.get("repo"), hf.get("cache"))
        return status


async def _follow(node: NodeClient, ref: str, *, wait: bool, progress: bool, poll_s: float) -> dict:
    """Start the pull; with ``wait``, poll its status (drawing the bar) until ready or failed."""
    status = await node.pull(ref, wait=False)
    if not wait:
        return status
    bar = ProgressBar(ref, status["total_bytes"], enabled=progress and status["state"] != "ready")
    try:
        while status["state"] not in ("ready", "failed"):
            note = f"peers {status['peers']} origin {status['bytes_from_origin'] >> 20} MiB [{status['state']}]"
            bar.update(status["done_bytes"], note)
            await asyncio.sleep(poll_s)
            status = await node.status(status["digest"])
        bar.update(status["done_bytes"], f"[{status['state']}]")
    finally:
        bar.close()
    if status["state"] == "failed":
        err = status.get("error") or {}
        raise from_error_body({"error": err}, 500, f"pull {ref} failed") if err else PullFailed(f"pull {ref} failed")
    return status
