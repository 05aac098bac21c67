"""Pull jobs: one artifact on this node, being pulled, verified, repaired, or ready."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum

from modelcast.errors import ModelcastError
from modelcast.manifest import Manifest


class PullState(str, Enum):
    """Where a job is; the value is what the API's JSON says."""

    QUEUED = "queued"  # known, not yet downloading (making room, fetching the torrent)
    DOWNLOADING = "downloading"  # in the swarm, pieces arriving
    VERIFYING = "verifying"  # every piece here; xxh3 of every file, then the rename into place
    READY = "ready"  # complete: artifacts/sha256/<hex> exists
    FAILED = "failed"  # stopped with ``error``; a new pull starts a new job

    @property
    def terminal(self) -> bool:
        return self in (PullState.READY, PullState.FAILED)


@dataclass(eq=False)
class PullJob:
    """One artifact on this node.  The daemon's reconcile loop moves it from state to state."""

    digest: str
    manifest: Manifest
    state: PullState = PullState.QUEUED
    path: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    bytes_from_origin: int = 0
    bytes_from_url_seed: int = 0  # of bytes_from_origin: what libtorrent fetched from the origin itself
    bytes_from_peers: int = 0
    bytes_from_relay: int = 0  # pieces fetched from a node of another zone (tracker/firstcopy.py)
    done_bytes: int = 0
    download_rate: int = 0
    upload_rate: int = 0
    peers: int = 0
    error: ModelcastError | None = None
    repairing: bool = False
    # The step the daemon runs for this job now (preparing, finishing, aborting), if any.
    step: asyncio.Task | None = field(default=None, repr=False)
    _done: asyncio.Future | None = field(default=None, repr=False)

    @property
    def busy(self) -> bool:
        """Being pulled, verified or repaired: "in use", never evicted."""
        return not self.state.terminal

    def end(self, state: PullState, error: ModelcastError | None = None) -> None:
        """Reach ``state`` (ready or failed) and wake whoever waits for the job."""
        self.state, self.error = state, error
        self.repairing = False
        self.finished = time.time()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def wait(self) -> None:
        """Until the job is ready or failed (a cancelled waiter leaves the job running)."""
        if self.state.terminal:
            return
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._done)

    def to_json(self, pins: dict[str, set[str]] | None = None, last_used: float | None = None) -> dict:
        total = self.manifest.total_size
        return {
            "digest": self.digest, "name": self.manifest.name, "kind": self.manifest.kind,
            "state": self.state.value, "path": self.path, "total_bytes": total,
            "done_bytes": total if self.state is PullState.READY else self.done_bytes,
            "bytes_from_peers": self.bytes_from_peers, "bytes_from_origin": self.bytes_from_origin,
            "bytes_from_url_seed": self.bytes_from_url_seed,
            "bytes_from_relay": self.bytes_from_relay,
            "download_rate": self.download_rate, "upload_rate": self.upload_rate, "peers": self.peers,
            "started": self.started, "finished": self.finished,
            "seconds": (self.finished - self.started) if self.finished else None,
            "pinned_by": sorted((pins or {}).get(self.digest, ())), "last_used": last_used,
            "repairing": self.repairing,
            "error": None if self.error is None else {"code": self.error.code, "message": str(self.error)},
        }
