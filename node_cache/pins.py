"""Pins and last use: what eviction must respect, kept in memory and saved off the event loop."""

from __future__ import annotations

import asyncio
import time

from .store import Store


class PinsAndUse:
    """``pins`` ({digest: holders}; a pinned artifact is never evicted) and ``last_used`` (the LRU order).

    Pins are saved (fsynced) before :meth:`pin`/:meth:`unpin` return; last use is saved
    by :meth:`flush`, which the daemon calls every second and at stop.  Saves go to a
    thread, one at a time, each writing the newest state.
    """

    def __init__(self, store: Store, pins: dict[str, list[str]], last_used: dict[str, float]):
        self._store = store
        self.pins: dict[str, set[str]] = {d: set(h) for d, h in pins.items() if h}
        self.last_used = dict(last_used)
        self._dirty = False
        self._pins_lock = asyncio.Lock()
        self._use_lock = asyncio.Lock()

    @classmethod
    async def load(cls, store: Store) -> PinsAndUse:
        pins, last_used = await asyncio.to_thread(lambda: (store.load_pins(), store.load_last_used()))
        return cls(store, pins, last_used)

    def holders(self, digest: str) -> list[str]:
        return sorted(self.pins.get(digest, ()))

    def pinned(self, digest: str) -> bool:
        return bool(self.pins.get(digest))

    def to_json(self) -> dict[str, list[str]]:
        return {d: sorted(h) for d, h in self.pins.items()}

    async def pin(self, digest: str, holder: str) -> None:
        holders = self.pins.setdefault(digest, set())
        if holder not in holders:
            holders.add(holder)
            await self._save_pins()

    async def unpin(self, digest: str, holder: str | None) -> None:
        holders = self.pins.get(digest, set())
        if holder is None:
            holders.clear()
        else:
            holders.discard(holder)
        if not holders:
            self.pins.pop(digest, None)
        await self._save_pins()

    async def _save_pins(self) -> None:
        # The snapshot is taken inside the lock: the last save to finish holds the newest pins.
        async with self._pins_lock:
            await asyncio.to_thread(self._store.save_pins, self.to_json())

    def touch(self, digest: str) -> None:
        self.last_used[digest] = time.time()
        self._dirty = True

    def forget(self, digest: str) -> None:
        """An evicted artifact leaves the LRU order (its pins, if any, stay)."""
        if self.last_used.pop(digest, None) is not None:
            self._dirty = True

    async def flush(self, force: bool = False) -> None:
        """Save the LRU order if it changed (``force``: anyway)."""
        if not (self._dirty or force):
            return
        async with self._use_lock:
            self._dirty = False
            await asyncio.to_thread(self._store.save_last_used, dict(self.last_used))
