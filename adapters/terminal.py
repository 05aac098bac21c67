"""Progress bars on a terminal (stderr); silent when not a terminal."""

from __future__ import annotations

import sys
import threading
import time

from modelcast.units import human_bytes


class ProgressBar:
    """A thread-safe byte-progress bar redrawn at most 10 times a second."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_draw = 0.0
        self.note = ""

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
        self._maybe_draw()

    def update(self, done: int, note: str = "") -> None:
        with self._lock:
            self.done = done
            self.note = note
        self._maybe_draw()

    def _maybe_draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        with self._lock:
            done, total = self.done, self.total
        frac = 1.0 if total == 0 else min(done / total, 1.0)
        width = 28
        filled = int(frac * width)
        rate = done / max(now - self._start, 1e-6)
        bar = "#" * filled + "-" * (width - filled)
        line = (f"\r{self.label:<18} [{bar}] {frac * 100:5.1f}% {human_bytes(done):>10}/{human_bytes(total):<10}"
                f" {human_bytes(rate)}/s {self.note}")
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._maybe_draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
