"""Talking to this host's node daemon on behalf of Ray: warm, pin, verify, activate.

Everything goes through :class:`node_cache.client.NodeClient` (the daemon's local HTTP
API).  Transient failures are retried here with backoff until a deadline; permanent ones
(unknown reference, bad token, quota) raise at once with the daemon's message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from modelcast.errors import ModelcastError, PullFailed, RemoteError, from_error_body
from node_cache.client import NodeClient

from .config import GlueConfig
from .spec import NoRuntimeSupport, is_permanent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Warm:
    """An artifact that is complete and verified in this node's cache."""

    ref: str
    digest: str
    path: str
    total_bytes: int
    seconds: float  # time this call waited for it
    hf: dict | None = None  # its Hugging Face layout (repo_id, revision, cache, snapshot), if asked for

    def to_json(self) -> dict:
        return {"ref": self.ref, "digest": self.digest, "path": self.path, **({"hf": self.hf} if self.hf else {})}


class NodeCache:
    """This host's node daemon, seen from Ray (the plugin, Serve replicas, prewarm tasks)."""

    def __init__(self, cfg: GlueConfig, logger: logging.Logger | None = None):
        self.cfg = cfg
        self.log = logger or log
        self._client = NodeClient(cfg.node, cfg.token, ca=cfg.ca)

    async def __aenter__(self) -> "NodeCache":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    # ---- warm ---------------------------------------------------------------------------
    async def ensure_warm(self, ref: str, *, pin: str | None = None, deadline_s: float | None = None,
                          hf: dict | None = None) -> Warm:
        """Make ``ref`` warm on this node (pinned by ``pin`` if given) and return its path.

        Idempotent and safe to cancel at any await: the daemon's download goes on without
        us, and the next call joins it.  Retries transient failures until ``deadline_s``.
        ``hf`` (``{"repo": "org/name" or "", "cache": dir or None}``) lays it out in that
        Hugging Face hub cache too (the daemon's own cache when ``cache`` is None).
        """
        return await self._retrying(f"pull {ref}", lambda: self._pull_once(ref, pin, hf), deadline_s)

    async def _pull_once(self, ref: str, pin: str | None, hf: dict | None = None) -> Warm:
        start = time.monotonic()
        body = {"ref": ref, "wait": False, **({"pin": pin} if pin else {})}
        status = await self._client.request("POST", "/v1/pull", json=body, what=f"pull {ref}", timeout_s=60)
        while status["state"] not in ("ready", "failed"):
            await asyncio.sleep(self.cfg.poll_s)
            status = await self._client.status(status["digest"])
        if status["state"] == "failed":
            err = status.get("error") or {}
            raise from_error_body({"error": err}, 500, f"pull {ref} failed", context=f"pull {ref}")
        path = status.get("path") or ""
        if not os.path.isdir(path):
            # The daemon still lists it as ready, but its files are gone: have it check
            # (and repair) before the next attempt.
            await self._verify_quietly(status["digest"])
            raise PullFailed(f"pull {ref}: the node says {status['digest']} is ready at {path!r}, "
                             "but that directory is missing; asked the node to verify and repair it")
        layout = (await self._client.lay_out_hf(status["digest"], hf.get("repo"), hf.get("cache"))
                  if hf is not None else None)
        return Warm(ref, status["digest"], path, int(status.get("total_bytes") or 0), time.monotonic() - start,
                    layout)

    async def activate_runtime(self, ref: str, deadline_s: float | None = None) -> dict:
        """Pull and activate a runtime layer: ``{"variant", "digest", "path", "env"}``."""

        async def once() -> dict:
            try:
                return await self._client.request("POST", "/v1/runtime/activate", json={"ref": ref},
                                                  what=f"activate runtime {ref}", timeout_s=None)
            except RemoteError as exc:
                if exc.http_status in (404, 405):
                    raise NoRuntimeSupport(
                        f"activate runtime {ref}: the node daemon at {self.cfg.node} has no runtime-layer API "
                        "(POST /v1/runtime/activate); upgrade modelcast on that node or drop \"runtime\"") from exc
                raise

        return await self._retrying(f"activate runtime {ref}", once, deadline_s)

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[Any]], deadline_s: float | None) -> Any:
        budget = self.cfg.pull_deadline_s if deadline_s is None else deadline_s
        deadline = time.monotonic() + budget
        delay, tries = self.cfg.retry_initial_s, 0
        while True:
            tries += 1
            try:
                return await attempt()
            except ModelcastError as exc:
                if is_permanent(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise PullFailed(f"{what}: gave up after {tries} attempts in {budget:.0f} s; "
                                     f"last error: {exc}") from exc
                if tries == 1 or tries % 10 == 0:
                    self.log.warning("%s: %s; retrying (attempt %d, next in %.1f s)", what, exc, tries, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.retry_max_s)

    # ---- inspect, verify, unpin ---------------------------------------------------------
    async def status(self, digest: str) -> dict:
        return await self._client.status(digest)

    async def verify(self, digest: str) -> dict:
        """Full re-hash by the daemon; a corrupt or incomplete artifact is repaired."""
        return await self._client.verify(digest)

    async def _verify_quietly(self, digest: str) -> None:
        try:
            await self._client.verify(digest)
        except ModelcastError as exc:
            self.log.warning("asking the node to verify %s failed: %s", digest, exc)

    async def unpin(self, digest: str, holder: str) -> None:
        await self._client.unpin(digest, holder)

    async def health(self) -> dict:
        return await self._client.health()


def run_sync(make: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    """Run a coroutine to the end from sync code, even inside a running event loop.

    Ray calls some plugin hooks synchronously from its agent's event loop; a private loop
    in a helper thread keeps that loop free of nested ``asyncio.run``.
    """
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="modelcast-sync")
    try:
        return pool.submit(lambda: asyncio.run(make())).result(timeout_s)
    finally:
        pool.shutdown(wait=False)
