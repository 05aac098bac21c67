"""The origin piece picker: which pieces a node asks the origin for, as pure functions.

The node's origin policy (README, "Tuning"): a node fetches a piece from the origin (the
registry's web seed) only when no connected peer has it (so nobody is sending it), choosing
at random among such pieces, so that nodes pulling together split the first copy between
them instead of each taking a whole copy.

* **Alone** (no peer connected, and the tracker named none, or none it named connected
  within :data:`ALONE_AFTER_S`: see :func:`is_alone`) a node asks for runs of consecutive pieces of one file in
  one range request, up to :data:`ORIGIN_RUN_BYTES` (or a quarter second of its download
  limit), :data:`ORIGIN_PARALLEL` requests in flight: that is what makes a cold pull fast.
* **In a swarm** it asks for one piece per request, :data:`ORIGIN_PARALLEL_SWARM` in
  flight, at random among the pieces no connected peer has (so none is sending): fewer
  requests in flight each finish sooner, so new pieces reach peers sooner.
* **Stalled** (no progress for :data:`STALL_S`) it asks for anything missing, and without
  the first-copy mark: a stuck or dishonest swarm cannot stall a pull.

Nothing here does I/O: :mod:`node_cache.origin_fill` feeds it what libtorrent says and
fetches what it picks.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapters.torrent import PieceSpan

ORIGIN_PARALLEL = 4  # origin requests in flight at once per node with no peers
ORIGIN_PARALLEL_SWARM = 2  # ... and with peers
# A node with no peers asks the origin for up to this much per request.  Each request costs
# the registry a fixed ~1 ms of CPU (accept, auth, gate, headers) beside the bytes' sendfile:
# 16 MiB runs halve that per GiB against 8 MiB (issue #13, registry_cpu_s_per_gib).
ORIGIN_RUN_BYTES = 16 << 20
STALL_S = 5.0  # without progress for this long, fetch from the origin even what peers claim to have
REFETCH_S = 5.0  # a piece fetched this recently is not asked for again (libtorrent may still be checking it)
ALONE_AFTER_S = 5.0  # told of peers, none connected for this long: alone after all (they may be unreachable)


def run_limit_bytes(download_limit: int) -> int:
    """The most a lone node asks the origin for in one request.

    About a quarter second's worth under a rate limit (each of the :data:`ORIGIN_PARALLEL`
    requests gets a quarter of a second's budget): a crash wastes only what is in flight.
    """
    if not download_limit:
        return ORIGIN_RUN_BYTES
    return min(ORIGIN_RUN_BYTES, max(1, download_limit // ORIGIN_PARALLEL))


def is_alone(connected: int, told_of: int | None, unconnected_s: float) -> bool:
    """Whether a node pulls as if nobody else were in the swarm (large unmarked runs).

    ``connected``: peers connected now; ``told_of``: peers in the tracker's last reply (None
    before one came); ``unconnected_s``: seconds since a peer was last connected (or since
    the fill started).  A node the tracker told of peers is not alone before they connect:
    two nodes of a zone starting together would otherwise each take whole runs while
    libtorrent connects them (on a busy machine, seconds), and the first copy would come
    out of the origin once per node.  Marked requests meanwhile split it between them
    through the first-copy gate.  Peers named but never reachable stop counting after
    :data:`ALONE_AFTER_S`.
    """
    return connected == 0 and (not told_of or unconnected_s >= ALONE_AFTER_S)


def parallel_requests(alone: bool) -> int:
    """Origin requests in flight at once: alone, several runs fill the pipe; in a swarm the
    origin is shared, and fewer requests in flight each finish sooner."""
    return ORIGIN_PARALLEL if alone else ORIGIN_PARALLEL_SWARM


@dataclass(frozen=True)
class SwarmView:
    """What libtorrent says about one download right now."""

    missing: Sequence[int]  # pieces not yet here
    availability: Sequence[int]  # per piece: connected peers that have it
    alone: bool  # see is_alone


@dataclass(frozen=True)
class Request:
    """One range request to the origin: consecutive pieces of one file."""

    spans: tuple[PieceSpan, ...]
    first_copy: bool  # marked X-Modelcast-First-Copy: the origin may answer 409 (tracker/firstcopy.py)


def wanted_pieces(view: SwarmView, *, claimed: Collection[int], fetched_at: Mapping[int, float], now: float,
                  stalled: bool) -> set[int]:
    """The missing pieces the origin should send: those no peer can give us (all of them when alone or stalled).

    A piece already being fetched (``claimed``) is not wanted again, nor one fetched in the
    last :data:`REFETCH_S` (libtorrent hash-checks a fetched piece before it counts as
    ours).  A piece a peer is sending us is one that peer has; one whose sender left half
    way (no connected peer has it) can only be finished from the origin.
    """
    return {i for i in view.missing
            if i not in claimed and now - fetched_at.get(i, -1e9) > REFETCH_S
            and (stalled or view.alone or view.availability[i] == 0)}


def pick_runs(wanted: set[int], spans: Sequence[PieceSpan], *, slots: int, run_limit: int,
              rng: random.Random) -> list[list[PieceSpan]]:
    """Up to ``slots`` runs of consecutive wanted pieces of one file, each under ``run_limit`` bytes
    (``run_limit`` 1: one piece per run).

    A run is the wanted part of one ``run_limit``-aligned block of a file, the block picked
    at random (through a random wanted piece): runs that started anywhere would leave gaps
    of a few pieces between them, and a lone node would end up asking for half-size runs
    (twice the requests, each a cost to the registry).  The pieces picked are removed from
    ``wanted``.
    """
    runs: list[list[PieceSpan]] = []
    candidates = sorted(wanted)

    def joined(a: PieceSpan, b: PieceSpan) -> bool:  # b follows a in the same file and the same block
        return (a.piece in wanted and b.piece in wanted and b.path == a.path and b.file_offset == a.file_offset + a.length
                and b.file_offset // run_limit == a.file_offset // run_limit)

    while candidates and len(runs) < slots:
        first = candidates[rng.randrange(len(candidates))]
        while first > 0 and joined(spans[first - 1], spans[first]):  # back to the block's first wanted piece
            first -= 1
        run = [spans[first]]
        size = spans[first].size
        while size < run_limit:
            nxt = run[-1].piece + 1
            if nxt >= len(spans) or not joined(run[-1], spans[nxt]):
                break
            run.append(spans[nxt])
            size += spans[nxt].size
        for span in run:
            wanted.discard(span.piece)
        runs.append(run)
        candidates = sorted(wanted)
    return runs


def plan_requests(view: SwarmView, spans: Sequence[PieceSpan], *, claimed: Collection[int],
                  fetched_at: Mapping[int, float], now: float, stalled: bool, in_flight: int, run_bytes: int,
                  rng: random.Random) -> tuple[list[Request], set[int]]:
    """The origin requests to start now, and the pieces still wanted after them.

    ``in_flight`` counts origin requests already under way (relay fetches from nodes of
    other zones do not count).  Requests carry the first-copy mark unless the node is
    alone or stalled.
    """
    wanted = wanted_pieces(view, claimed=claimed, fetched_at=fetched_at, now=now, stalled=stalled)
    run_limit = run_bytes if view.alone else 1
    slots = max(0, parallel_requests(view.alone) - in_flight)
    runs = pick_runs(wanted, spans, slots=slots, run_limit=run_limit, rng=rng)
    first_copy = not (view.alone or stalled)
    return [Request(tuple(run), first_copy) for run in runs], wanted
