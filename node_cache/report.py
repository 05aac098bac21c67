"""The artifacts report a node sends with each heartbeat (the wire form is modelcast/progress.py).

The registry shows fleet-wide rollouts from these reports, so they say, per artifact:
state, bytes done of the total, the rate, and where the bytes came from.  A report is
bounded: pulls first (a rollout is what an operator watches), then failed pulls, then the
held artifacts, most recently used first, up to :data:`MAX_REPORTED_ARTIFACTS`; the rest
are only counted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from modelcast.progress import MAX_REPORTED_ARTIFACTS, ArtifactProgress

from .jobs import PullJob, PullState

# Rates are measured over the reports of the last few seconds: pieces from the origin and
# from other zones arrive in bursts, and one heartbeat interval would show them as 0 B/s
# between two bursts.
RATE_WINDOW_S = 3.0
# An unchanged report is sent again this often anyway, whatever the registry says it has.
REFRESH_S = 30.0


class ProgressReporter:
    """Builds each heartbeat's report; remembers the bytes of the last few to give each pull's rate.

    The rate is measured here, over the last :data:`RATE_WINDOW_S`, from the bytes done, rather
    than taken from libtorrent: libtorrent's rate leaves out what came from the origin
    and from other zones, which is all there is for the first node of a zone.
    """

    def __init__(self, limit: int = MAX_REPORTED_ARTIFACTS, window_s: float = RATE_WINDOW_S,
                 refresh_s: float = REFRESH_S):
        self.limit = limit
        self.window_s = window_s
        self.refresh_s = refresh_s
        self._sent: dict | None = None  # the last report the registry took, and when
        self._sent_at = 0.0
        self._pending: tuple[dict, float] | None = None  # the report on its way, until answered
        self._registry_has = False
        # Per pull, (when, done bytes) of the reports within the window, oldest first.
        self._seen: dict[str, deque[tuple[float, int]]] = {}

    def next_report(self, jobs: Iterable[PullJob], last_used: Mapping[str, float], now: float) -> dict | None:
        """The report for the next heartbeat, or None when the registry holds the same one already.

        A node that holds artifacts and pulls nothing sends the same report every second;
        the registry keeps the last one, so it is sent only when it changed, when the
        registry says it has none (it restarted, or another replica answered), and every
        :data:`REFRESH_S` anyway.  A heartbeat without a report keeps the one the registry has.
        """
        report = self.report(jobs, last_used, now)
        if report == self._sent and self._registry_has and now - self._sent_at < self.refresh_s:
            self._pending = None
            return None
        self._pending = (report, now)
        return report

    def answered(self, answer: dict) -> None:
        """Note the registry's answer to the heartbeat: it took the report, and whether it holds one.

        Not called when the heartbeat failed: the report then goes again with the next one.
        """
        # A registry that does not say keeps no reports: sending them again would not help.
        self._registry_has = bool(answer.get("reported", True))
        if self._pending is not None:
            self._sent, self._sent_at = self._pending
            self._pending = None

    def report(self, jobs: Iterable[PullJob], last_used: Mapping[str, float], now: float) -> dict:
        """``{"artifacts": [...], "more_artifacts": n}`` for a heartbeat body, at ``now`` (``time.time()``,
        the clock of :attr:`PullJob.started`)."""
        jobs = list(jobs)
        active = sorted((j for j in jobs if j.busy), key=lambda j: j.started)
        failed = sorted((j for j in jobs if j.state is PullState.FAILED), key=lambda j: -(j.finished or 0))
        ready = sorted((j for j in jobs if j.state is PullState.READY),
                       key=lambda j: -last_used.get(j.digest, j.finished or 0))
        chosen = (active + failed + ready)[: self.limit]
        seen, self._seen = self._seen, {}
        entries = []
        for job in chosen:
            total = job.manifest.total_size
            done = total if job.state is PullState.READY else min(job.done_bytes, total)
            rate = 0
            if job.busy:
                history = self._seen[job.digest] = seen.get(job.digest) or deque()
                if not history and now - self.window_s < job.started < now:
                    history.append((job.started, 0))  # a pull that just began: its bytes came since
                while history and now - history[0][0] > self.window_s:
                    history.popleft()
                if history and now > history[0][0]:
                    rate = max(0, round((done - history[0][1]) / (now - history[0][0])))
                else:
                    rate = job.download_rate  # first seen long after it began (resumed): libtorrent's figure
                history.append((now, done))
            entries.append(ArtifactProgress(
                digest=job.digest, state=job.state.value, done_bytes=done, total_bytes=total, rate=rate,
                bytes_from_peers=job.bytes_from_peers, bytes_from_origin=job.bytes_from_origin,
                bytes_from_other_zones=job.bytes_from_relay).to_json())
        return {"artifacts": entries, "more_artifacts": len(jobs) - len(chosen)}
