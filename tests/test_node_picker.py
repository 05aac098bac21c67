"""The origin piece picker (node_cache/picker.py): which pieces a node asks the origin for.  No server."""

from __future__ import annotations

import random

from adapters.torrent import PieceSpan
from node_cache.picker import (ALONE_AFTER_S, ORIGIN_PARALLEL, ORIGIN_PARALLEL_SWARM, ORIGIN_RUN_BYTES, REFETCH_S,
                               SwarmView, is_alone, plan_requests, run_limit_bytes)

MiB = 1 << 20


def spans_of(files: dict[str, int], piece: int = MiB) -> list[PieceSpan]:
    """Pieces of ``files`` (name -> size) laid out as a hybrid torrent does: each file starts a piece."""
    spans = []
    for path, size in files.items():
        for off in range(0, size, piece):
            spans.append(PieceSpan(len(spans), piece, f"m/{path}", off, min(piece, size - off)))
    return spans


def view(n: int, *, have: set[int] = frozenset(), avail: dict[int, int] | None = None, alone: bool) -> SwarmView:
    availability = [0] * n
    for i, k in (avail or {}).items():
        availability[i] = k
    return SwarmView([i for i in range(n) if i not in have], availability, alone)


def plan(v: SwarmView, spans, *, claimed=(), fetched_at=None, now=100.0, stalled=False, in_flight=0,
         run_bytes=ORIGIN_RUN_BYTES, seed=1):
    return plan_requests(v, spans, claimed=set(claimed), fetched_at=fetched_at or {}, now=now, stalled=stalled,
                         in_flight=in_flight, run_bytes=run_bytes, rng=random.Random(seed))


def test_alone_asks_for_runs_of_consecutive_pieces_up_to_16_mib_four_at_once_without_the_first_copy_mark():
    spans = spans_of({"big.bin": 64 * MiB})
    requests, wanted = plan(view(64, alone=True), spans)
    assert len(requests) == ORIGIN_PARALLEL == 4
    for r in requests:
        pieces = [s.piece for s in r.spans]
        assert pieces == list(range(pieces[0], pieces[0] + len(pieces)))  # consecutive
        assert sum(s.size for s in r.spans) <= 16 * MiB and not r.first_copy
    picked = {s.piece for r in requests for s in r.spans}
    assert len(picked) == sum(len(r.spans) for r in requests)  # no piece twice
    assert wanted == set(range(64)) - picked


def test_a_run_ends_at_the_limit_at_a_piece_already_here_and_at_the_end_of_a_file():
    spans = spans_of({"a.bin": 3 * MiB, "b.bin": 20 * MiB})
    # Only a.bin (pieces 0-2) is missing: asked for in runs that stay inside it.
    requests, _ = plan(view(23, have=set(range(3, 23)), alone=True), spans, seed=0)
    assert sorted(s.piece for r in requests for s in r.spans) == [0, 1, 2]
    assert all({s.path for s in r.spans} == {"m/a.bin"} for r in requests)
    # With piece 10 here, no run of b.bin crosses it; none is longer than the 16 MiB limit.
    requests, _ = plan(view(23, have={10}, alone=True), spans, seed=3)
    for r in requests:
        pieces = [s.piece for s in r.spans]
        assert 10 not in pieces and len(pieces) <= 16
        assert len({s.path for s in r.spans}) == 1
    # A download limit shrinks the run: 8 MiB/s gives runs of at most 2 MiB.
    requests, _ = plan(view(23, alone=True), spans, run_bytes=run_limit_bytes(8 * MiB))
    assert all(len(r.spans) <= 2 for r in requests)


def test_run_limit_is_a_quarter_second_of_the_download_limit_and_at_most_16_mib():
    assert run_limit_bytes(0) == ORIGIN_RUN_BYTES == 16 * MiB
    assert run_limit_bytes(20 * MiB) == 5 * MiB
    assert run_limit_bytes(40 * MiB) == 10 * MiB
    assert run_limit_bytes(100 * MiB) == 16 * MiB
    assert run_limit_bytes(3) == 1


def test_in_a_swarm_one_piece_per_request_two_at_once_only_pieces_no_peer_has_and_nobody_sends():
    spans = spans_of({"w.bin": 10 * MiB})
    # Peers have 0-6 (one of them is sending us 6); 7, 8, 9 nobody has.
    v = view(10, avail={i: 1 for i in range(7)}, alone=False)
    requests, wanted = plan(v, spans)
    assert len(requests) == ORIGIN_PARALLEL_SWARM == 2
    assert all(len(r.spans) == 1 and r.first_copy for r in requests)
    picked = {r.spans[0].piece for r in requests}
    assert picked < {7, 8, 9} and wanted == {7, 8, 9} - picked
    # Requests already under way take their slots.
    assert len(plan(v, spans, in_flight=1)[0]) == 1
    assert plan(v, spans, in_flight=2)[0] == []


def test_the_choice_is_random_among_the_pieces_nobody_has():
    spans = spans_of({"w.bin": 50 * MiB})
    v = view(50, avail={i: 2 for i in range(0, 50, 2)}, alone=False)  # peers have the even pieces
    firsts = {plan(v, spans, seed=s)[0][0].spans[0].piece for s in range(200)}
    assert firsts <= set(range(1, 50, 2)) and len(firsts) > 15


def test_pieces_claimed_or_fetched_moments_ago_are_not_asked_for_again():
    spans = spans_of({"w.bin": 4 * MiB})
    v = view(4, alone=False)
    requests, wanted = plan(v, spans, claimed={0}, fetched_at={1: 99.0, 2: 100.0 - REFETCH_S - 0.1})
    assert {r.spans[0].piece for r in requests} | wanted == {2, 3}


def test_stalled_asks_for_anything_missing_without_the_first_copy_mark():
    spans = spans_of({"w.bin": 4 * MiB})
    v = view(4, have={0}, avail={1: 3, 2: 3, 3: 3}, alone=False)
    assert plan(v, spans) == ([], set())  # peers deliver everything
    requests, wanted = plan(v, spans, stalled=True)
    assert len(requests) == 2 and all(len(r.spans) == 1 and not r.first_copy for r in requests)
    assert {r.spans[0].piece for r in requests} | wanted == {1, 2, 3}


def test_a_piece_whose_sender_left_half_way_is_wanted_alone_or_in_a_swarm():
    # Half-downloaded, and no connected peer has it: only the origin can finish it.
    spans = spans_of({"w.bin": 2 * MiB})
    requests, _ = plan(view(2, alone=True), spans)
    assert [s.piece for r in requests for s in r.spans] == [0, 1]
    requests, _ = plan(view(2, avail={1: 1}, alone=False), spans)
    assert [s.piece for r in requests for s in r.spans] == [0]


def test_nothing_missing_nothing_asked():
    spans = spans_of({"w.bin": 2 * MiB})
    assert plan(view(2, have={0, 1}, alone=True), spans) == ([], set())


def test_alone_each_run_is_a_whole_aligned_block_so_a_pull_takes_few_large_requests():
    # A lone node pulling 256 MiB in 16 MiB runs: every request is one whole 16 MiB block of the
    # file (no half-size runs left between randomly placed ones), so the registry answers
    # 16 requests, not twice as many.
    spans = spans_of({"big.bin": 256 * MiB})
    have: set[int] = set()
    rng = random.Random(7)
    sizes = []
    for _ in range(64):  # bounded: each round fetches what it asked for
        v = view(256, have=have, alone=True)
        if not v.missing:
            break
        requests, _ = plan_requests(v, spans, claimed=set(), fetched_at={}, now=100.0, stalled=False,
                                    in_flight=0, run_bytes=ORIGIN_RUN_BYTES, rng=rng)
        for r in requests:
            sizes.append(sum(s.size for s in r.spans))
            assert r.spans[0].file_offset % ORIGIN_RUN_BYTES == 0
            have.update(s.piece for s in r.spans)
    assert len(have) == 256 and sizes == [16 * MiB] * 16
    # With pieces already here, a run is the rest of its block, never a piece of the next.
    requests, _ = plan(view(256, have={3, 12}, alone=True), spans, seed=5)
    for r in requests:
        assert len({s.file_offset // ORIGIN_RUN_BYTES for s in r.spans}) == 1


def test_a_node_told_of_peers_does_not_take_whole_runs_while_they_connect():
    """Two nodes of a zone starting together: the second is told of the first before libtorrent
    connects them.  Until a peer connects (or none has for ALONE_AFTER_S) it asks piece by
    piece with the first-copy mark, so the gate splits the first copy instead of each node
    taking whole runs of it."""
    spans = spans_of({"big.bin": 64 * MiB})
    waiting = view(64, alone=is_alone(connected=0, told_of=1, unconnected_s=1.0))
    requests, _ = plan(waiting, spans)
    assert requests and all(r.first_copy and len(r.spans) == 1 for r in requests)
    assert len(requests) == ORIGIN_PARALLEL_SWARM
    # Nobody named by the tracker (or no reply yet): alone, large unmarked runs at once.
    for told_of in (0, None):
        requests, _ = plan(view(64, alone=is_alone(connected=0, told_of=told_of, unconnected_s=0.0)), spans)
        assert len(requests) == ORIGIN_PARALLEL and not any(r.first_copy for r in requests)
        assert sum(s.size for r in requests for s in r.spans) == 64 * MiB  # four whole 16 MiB runs
    # Peers named but unreachable: alone after ALONE_AFTER_S without a connection.
    assert is_alone(connected=0, told_of=3, unconnected_s=ALONE_AFTER_S)
    assert not is_alone(connected=1, told_of=0, unconnected_s=60.0)
