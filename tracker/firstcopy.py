"""The origin's first-copy gate: serve each piece to one node, let the swarm spread it.

Nodes pulling together each pick, at random, pieces no peer has yet; two may pick the same
piece before either's HAVE reaches the other. A node marks such requests "first copy"
(header ``X-Modelcast-First-Copy: 1``); the gate answers one whose byte range lies inside a
range served within ``window_s`` with 409, and the node takes that piece from its peers.
Every served range is remembered, with the header or without; requests without it (a lone
or stalled node, a plain BEP 19 client) are always served.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

HEADER = "X-Modelcast-First-Copy"


class FirstCopyGate:
    """Recently served byte ranges per (artifact, file), bounded in time and count.  No I/O."""

    def __init__(self, window_s: float = 30.0, max_ranges: int = 200_000):
        self.window_s = window_s
        self.max_ranges = max_ranges
        self._order: deque[tuple[float, tuple[str, str], int, int]] = deque()
        self._ranges: OrderedDict[tuple[str, str], list[tuple[int, int, float]]] = OrderedDict()
        self.refused = 0

    def _expire(self, now: float) -> None:
        while self._order and (now - self._order[0][0] > self.window_s or len(self._order) > self.max_ranges):
            at, key, start, end = self._order.popleft()
            ranges = self._ranges.get(key)
            if ranges:
                try:
                    ranges.remove((start, end, at))
                except ValueError:
                    pass
                if not ranges:
                    del self._ranges[key]

    def admit(self, artifact: str, path: str, start: int, end: int, first_copy: bool,
              now: float | None = None) -> bool:
        """True if bytes ``start..end`` of ``path`` may be served now (and remembers them)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        key = (artifact, path)
        if first_copy and any(s <= start and end <= e for s, e, _ in self._ranges.get(key, ())):
            self.refused += 1
            return False
        self._ranges.setdefault(key, []).append((start, end, now))
        self._order.append((now, key, start, end))
        return True
