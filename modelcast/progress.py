"""What a node daemon tells the registry of its artifacts with each heartbeat: the wire form.

A node's heartbeat (``POST /v1/nodes/{id}/heartbeat``) may carry ``"artifacts"``: one
:class:`ArtifactProgress` per artifact it is pulling or holds, at most
:data:`MAX_REPORTED_ARTIFACTS` (pulls first), and ``"more_artifacts"``: how many it left
out.  The registry keeps the latest report of each live node and builds the console's
rollout view from it, so it never calls a node.

Both sides use this module: the node builds entries with :meth:`ArtifactProgress.to_json`,
the registry reads them with :func:`parse_report`, which refuses anything it does not
expect (a wrong type, a negative count, an unknown field) with :class:`BadRequest`.
Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import BadRequest
from .reference import DIGEST_RE

# The states of a node's pull job (node_cache/jobs.py PullState values).
PULL_STATES = ("queued", "downloading", "verifying", "ready", "failed")
# States in which the artifact is still on its way: the rollout's "downloading" column.
ACTIVE_STATES = frozenset({"queued", "downloading", "verifying"})
MAX_REPORTED_ARTIFACTS = 128
# A heartbeat body, report included, is at most this long.  A full report of
# MAX_REPORTED_ARTIFACTS entries with the largest counts is about 40 KiB (tests check it).
MAX_HEARTBEAT_BODY = 64 * 1024
# Byte counts above this are not believed (8 EiB): no artifact is that big.
MAX_COUNT = 1 << 63


@dataclass(frozen=True, slots=True)
class ArtifactProgress:
    """One artifact on one node, as the node last reported it.

    ``rate`` is bytes per second over the node's last heartbeat interval, from every
    source together.  The three ``bytes_from_*`` count where the payload came from:
    peers of the node's zone (BitTorrent), the origin (through the registry's web seed),
    and nodes of other zones (relayed pieces, tracker/firstcopy.py).
    """

    digest: str
    state: str
    done_bytes: int
    total_bytes: int
    rate: int
    bytes_from_peers: int
    bytes_from_origin: int
    bytes_from_other_zones: int

    @property
    def complete(self) -> bool:
        return self.state == "ready"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def fraction(self) -> float:
        """How much of the artifact is here, from 0 to 1 (1 when ready, whatever the counts say)."""
        if self.complete:
            return 1.0
        return min(1.0, self.done_bytes / self.total_bytes) if self.total_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> "ArtifactProgress":
        """Read one report entry; :class:`BadRequest` names the first thing wrong with it."""
        if not isinstance(obj, dict):
            raise BadRequest(f"heartbeat artifacts entries must be JSON objects, got {_show(obj)}")
        unknown = set(obj) - _FIELDS
        if unknown:
            raise BadRequest(f"heartbeat artifact entry has unknown fields {', '.join(sorted(map(_show, unknown)))}; "
                             f"expected {', '.join(sorted(_FIELDS))}")
        missing = _FIELDS - set(obj)
        if missing:
            raise BadRequest(f"heartbeat artifact entry lacks {', '.join(sorted(missing))}")
        digest, state = obj["digest"], obj["state"]
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            raise BadRequest(f"heartbeat artifact digest {_show(digest)} is not sha256: and 64 lowercase hex digits")
        if state not in PULL_STATES:
            raise BadRequest(f"heartbeat artifact state {_show(state)} is not one of {', '.join(PULL_STATES)}")
        counts = {name: _count(obj[name], name) for name in _COUNTS}
        if counts["done_bytes"] > counts["total_bytes"]:
            raise BadRequest(f"heartbeat artifact {digest}: done_bytes {counts['done_bytes']} exceeds total_bytes "
                             f"{counts['total_bytes']}")
        return cls(digest=digest, state=state, **counts)


_FIELDS = frozenset(f.name for f in fields(ArtifactProgress))
_COUNTS = tuple(f.name for f in fields(ArtifactProgress) if f.name not in ("digest", "state"))


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short (a report may be 64 KiB of junk)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _count(value: Any, name: str) -> int:
    # bool is an int; a float count is accepted only when whole (JSON has one number type).
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"heartbeat artifact {name} must be a non-negative integer, got {_show(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise BadRequest(f"heartbeat artifact {name} must be a non-negative integer, got {_show(value)}")
        value = int(value)
    if not 0 <= value < MAX_COUNT:
        raise BadRequest(f"heartbeat artifact {name} must be between 0 and 2**63, got {_show(value)}")
    return value


def parse_report(body: dict[str, Any]) -> tuple[tuple[ArtifactProgress, ...], int] | None:
    """The report of a heartbeat body: ``(entries, more_artifacts)``, or None if it carries none.

    A body without ``"artifacts"`` (an older node) reports nothing, and the registry keeps
    no holdings for it; an empty list says the node holds nothing.
    """
    if "artifacts" not in body:
        if "more_artifacts" in body:
            raise BadRequest("heartbeat more_artifacts needs an artifacts list beside it")
        return None
    items = body["artifacts"]
    if not isinstance(items, list):
        raise BadRequest(f"heartbeat artifacts must be a list, got {_show(items)}")
    if len(items) > MAX_REPORTED_ARTIFACTS:
        raise BadRequest(f"heartbeat reports {len(items)} artifacts; at most {MAX_REPORTED_ARTIFACTS} are taken "
                         "(count the rest in more_artifacts)")
    entries = tuple(ArtifactProgress.from_json(item) for item in items)
    if len({e.digest for e in entries}) != len(entries):
        raise BadRequest("heartbeat reports one artifact twice")
    more = body.get("more_artifacts", 0)
    if isinstance(more, bool) or not isinstance(more, int) or not 0 <= more < MAX_COUNT:
        raise BadRequest(f"heartbeat more_artifacts must be a non-negative integer, got {_show(more)}")
    return entries, more
