"""The origin's first-copy gate (pure logic)."""

from tracker.firstcopy import Admission, FirstCopyGate

PIECE = 262144


def test_a_piece_is_served_once_per_window_to_first_copy_requests():
    gate = FirstCopyGate(window_s=30)
    assert gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=True, now=0.0).serve
    assert not gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=True, now=1.0).serve and gate.refused == 1
    assert gate.admit("d", "m/w.bin", PIECE, 2 * PIECE - 1, first_copy=True, now=1.0).serve
    assert gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=False, now=2.0).serve  # a stalled node is served
    assert gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=True, now=40.0).serve  # the window passed


def test_a_piece_inside_a_run_served_without_the_header_is_refused():
    gate = FirstCopyGate()
    assert gate.admit("d", "f", 0, 8 * PIECE - 1, first_copy=False, now=0.0).serve  # a lone node's run
    assert not gate.admit("d", "f", 3 * PIECE, 4 * PIECE - 1, first_copy=True, now=0.5).serve
    assert gate.admit("d", "f", 8 * PIECE, 9 * PIECE - 1, first_copy=True, now=0.5).serve
    assert gate.admit("d", "other", 0, PIECE - 1, first_copy=True, now=0.5).serve


def test_memory_is_bounded():
    gate = FirstCopyGate(window_s=1000, max_ranges=100)
    for i in range(1000):
        assert gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=i / 1000).serve
    assert len(gate._order) <= 101 and sum(len(v) for v in gate._ranges.values()) <= 101


def test_zones_get_one_relay_each_and_their_own_copy_only_without_a_holder():
    """A first copy served to zone a is relayed to zone b once, from the node that holds it."""
    gate = FirstCopyGate(window_s=30)
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=0.0, zone="a", relay="http://10.0.0.1:7071").serve
    # Zone a's other nodes take it from their peers.
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=0.1, zone="a", relay="http://10.0.0.2:7071") \
        == Admission(False)
    # Zone b's first asker fetches it from the holder; the rest of zone b from their peers.
    got = gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=0.2, zone="b", relay="http://10.0.1.1:7071")
    assert got == Admission(False, "http://10.0.0.1:7071") and gate.relayed == 1
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=0.3, zone="b", relay="http://10.0.1.2:7071") \
        == Admission(False)
    # A third zone gets its own relay from the same holder.
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=0.4, zone="c").relay_from == "http://10.0.0.1:7071"
    # A node that names no relay URL cannot be relayed from: another zone gets its own copy.
    assert gate.admit("d", "f", PIECE, 2 * PIECE - 1, first_copy=True, now=1.0, zone="a").serve
    assert gate.admit("d", "f", PIECE, 2 * PIECE - 1, first_copy=True, now=1.1, zone="b", relay="http://x:1").serve
    assert gate.admit("d", "f", PIECE, 2 * PIECE - 1, first_copy=True, now=1.2, zone="a") == Admission(False)
    # Bytes that went to a client of unknown zone, or asked for without a zone: as before zones.
    assert gate.admit("d", "g", 0, PIECE - 1, first_copy=False, now=2.0).serve
    assert gate.admit("d", "g", 0, PIECE - 1, first_copy=True, now=2.1, zone="b") == Admission(False)
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=2.2) == Admission(False)
    # The window passed: served again, to whoever asks first.
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=40.0, zone="b").serve


def test_every_piece_of_a_run_served_to_one_zone_is_relayed_to_another():
    """A lone node's run is one range; each piece of it reaches another zone once."""
    gate = FirstCopyGate()
    assert gate.admit("d", "f", 0, 20 * PIECE - 1, first_copy=False, now=0.0, zone="a", relay="http://h:1").serve
    for i in range(20):
        got = gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=0.1, zone="b",
                         relay=f"http://b{i % 2}:1")
        assert got == Admission(False, "http://h:1"), i
        assert gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=0.2, zone="b") \
            == Admission(False)
    assert gate.relayed == 20


def test_bytes_served_to_one_zone_are_pushed_to_a_node_of_each_other_zone_in_turn():
    gate = FirstCopyGate(window_s=30)
    # Zone b's nodes make themselves known by asking (here: for bytes nobody has yet).
    for i, url in enumerate(("http://b1:1", "http://b2:1")):
        assert gate.admit("d", "f", (10 + i) * PIECE, (11 + i) * PIECE - 1, first_copy=True, now=0.0, zone="b",
                          relay=url).relay_to == ()  # nobody of another zone asked yet
    assert gate.admit("d", "f", 20 * PIECE, 21 * PIECE - 1, first_copy=True, now=0.1, zone="c").relay_to == ()
    pushed = [gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=0.5, zone="a",
                         relay="http://a1:1") for i in range(4)]
    # Zone c named no relay URL: nothing can be pushed to it; zone b's nodes take turns.
    assert [a.relay_to for a in pushed] == [("http://b1:1",), ("http://b2:1",), ("http://b1:1",), ("http://b2:1",)]
    assert all(a.serve for a in pushed) and gate.pushed == 4
    # Zone b has them now (a push is under way): its nodes take them from their peers.
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=0.6, zone="b", relay="http://b2:1") \
        == Admission(False)
    # Bytes served to zone b before any node of zone a asked: zone a fetches them from their holder.
    assert gate.admit("d", "f", 10 * PIECE, 11 * PIECE - 1, first_copy=True, now=0.7, zone="a",
                      relay="http://a1:1") == Admission(False, "http://b1:1")
    # Zone b's nodes stop asking (done, or gone): after the window nothing goes to them.
    assert gate.admit("d", "f", 40 * PIECE, 41 * PIECE - 1, first_copy=True, now=31.0, zone="a",
                      relay="http://a1:1").relay_to == ()
    # Another artifact's pullers are not this one's.
    assert gate.admit("e", "f", 0, PIECE - 1, first_copy=True, now=31.0, zone="a", relay="http://a1:1").relay_to == ()
