"""The cache quota and the eviction plan, as pure functions (LAYOUT.md, "Eviction is a plan").

The daemon describes what the cache holds as :class:`Held` records; :func:`plan_eviction`
says which least recently used artifacts go to make room for a pull, or raises
:class:`~modelcast.errors.QuotaExceeded` with the sizes when even evicting every
candidate would not; the daemon then carries the plan out.  :func:`check_disk` does the
same for the filesystem's free space.  Nothing here touches the disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from modelcast.errors import DiskFull, QuotaExceeded
from modelcast.units import human_bytes


@dataclass(frozen=True)
class Held:
    """One artifact the cache holds (ready) or has promised room to (busy: being pulled, verified, repaired)."""

    digest: str
    size: int
    ready: bool
    busy: bool
    pinned: bool
    last_used: float  # unix time of the last pull; 0 if never recorded
    unpacked: int = 0  # bytes of its unpacked runtime layer (or the room promised to one being unpacked)

    @property
    def footprint(self) -> int:
        """What evicting it frees: the artifact and its unpacked layer go together."""
        return self.size + self.unpacked


@dataclass(frozen=True)
class EvictionPlan:
    """What goes, least recently used first; executing it frees ``freed`` bytes."""

    digests: tuple[str, ...] = ()
    freed: int = 0


def used_bytes(held: Iterable[Held], exclude: str | None = None) -> int:
    """Bytes held or promised: complete artifacts plus downloads under way, and unpacked runtime layers."""
    return sum((h.size if h.ready or h.busy else 0) + h.unpacked for h in held if h.digest != exclude)


def evictable(h: Held, exclude: str | None) -> bool:
    """Complete, not pinned, not in use, and not the artifact being made room for."""
    return h.digest != exclude and h.ready and not h.busy and not h.pinned


def plan_eviction(held: Iterable[Held], *, name: str, digest: str | None, size: int, quota: int) -> EvictionPlan:
    """What to evict so that ``size`` more bytes (for ``name``, ``digest``) fit in ``quota`` (0: no quota).

    ``digest`` is the artifact being pulled or repaired: its own entry is neither counted nor
    evicted.  Room for unpacking a layer passes ``None`` (the artifact stays counted) and
    marks the artifact busy.  An artifact and its unpacked layer are one unit: counted and
    evicted together.  Raises QuotaExceeded, evicting nothing, when even every candidate
    would not make room.
    """
    held = list(held)
    if not quota:
        return EvictionPlan()
    used = used_bytes(held, exclude=digest)
    need = used + size - quota
    if need <= 0:
        return EvictionPlan()
    candidates = sorted((h for h in held if evictable(h, digest)), key=lambda h: h.last_used)
    chosen, freed = [], 0
    for h in candidates:
        if freed >= need:
            break
        chosen.append(h.digest)
        freed += h.footprint
    if freed >= need:
        return EvictionPlan(tuple(chosen), freed)
    pinned = sum(h.footprint for h in held if h.pinned and h.ready)
    room = sum(h.footprint for h in candidates)
    raise QuotaExceeded(
        f"{name} needs {human_bytes(size)} but the cache quota of "
        f"{human_bytes(quota)} leaves {human_bytes(quota - used + room)} "
        f"even after evicting everything not pinned or in use ({human_bytes(pinned)} pinned); "
        "raise --quota or unpin something (modelcast node ls)")


def check_disk(*, name: str, size: int, on_disk: int, free: int, root: Path) -> None:
    """Raise DiskFull unless the ``size - on_disk`` bytes still to download fit in ``free``."""
    if size - on_disk > free:
        raise DiskFull(f"{name} needs {human_bytes(size - on_disk)} more but the filesystem of "
                       f"{root} has {human_bytes(free)} free; free space or lower the quota")
