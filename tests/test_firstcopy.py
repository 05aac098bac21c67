"""The origin's first-copy gate (pure logic)."""

from tracker.firstcopy import FirstCopyGate

PIECE = 262144


def test_a_piece_is_served_once_per_window_to_first_copy_requests():
    gate = FirstCopyGate(window_s=30)
    assert gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=True, now=0.0)
    assert not gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=True, now=1.0) and gate.refused == 1
    assert gate.admit("d", "m/w.bin", PIECE, 2 * PIECE - 1, first_copy=True, now=1.0)
    assert gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=False, now=2.0)  # a stalled node is served
    assert gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=True, now=40.0)  # the window passed


def test_a_piece_inside_a_run_served_without_the_header_is_refused():
    gate = FirstCopyGate()
    assert gate.admit("d", "f", 0, 8 * PIECE - 1, first_copy=False, now=0.0)  # a lone node's run
    assert not gate.admit("d", "f", 3 * PIECE, 4 * PIECE - 1, first_copy=True, now=0.5)
    assert gate.admit("d", "f", 8 * PIECE, 9 * PIECE - 1, first_copy=True, now=0.5)
    assert gate.admit("d", "other", 0, PIECE - 1, first_copy=True, now=0.5)


def test_memory_is_bounded():
    gate = FirstCopyGate(window_s=1000, max_ranges=100)
    for i in range(1000):
        assert gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=i / 1000)
    assert len(gate._order) <= 101 and sum(len(v) for v in gate._ranges.values()) <= 101
