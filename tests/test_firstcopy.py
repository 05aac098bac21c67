"""The origin's first-copy gate: the same decisions in process and in Redis (``make_gate``)."""

import asyncio
import inspect

import pytest

from tracker.firstcopy import MAX_REFUSALS, Admission, FirstCopyGate

PIECE = 262144


class SyncGate:
    """A :class:`tracker.gate_redis.RedisGateStore` whose ``admit`` returns its answer, not an awaitable."""

    def __init__(self, redis_url: str, **kwargs) -> None:
        from tracker.gate_redis import RedisGateStore
        from tracker.swarm_redis import RedisSwarmStore

        self._loop = asyncio.new_event_loop()
        self._swarms = RedisSwarmStore(redis_url, caller_clock=True)
        self._gate = RedisGateStore(self._swarms, caller_clock=True, **kwargs)

    def __getattr__(self, name):
        return getattr(self._gate, name)

    def admit(self, *args, **kwargs) -> Admission:
        got = self._gate.admit(*args, **kwargs)
        return self._loop.run_until_complete(got) if inspect.isawaitable(got) else got

    def close(self) -> None:
        self._loop.run_until_complete(self._swarms.close())
        self._loop.close()


@pytest.fixture(params=["memory", "redis"])
def make_gate(request):
    """``make_gate(window_s=..., max_ranges=...)``: a gate in process, or one in a real (emptied) Redis."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = []

    def make(**kwargs):
        gate = FirstCopyGate(**kwargs) if url is None else SyncGate(url, **kwargs)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        if isinstance(gate, SyncGate):
            gate.close()


def test_a_piece_is_served_once_per_window_to_first_copy_requests(make_gate):
    gate = make_gate(window_s=30)
    assert gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=True, now=0.0, zone="z").serve
    assert not gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=True, now=1.0, zone="z").serve and gate.refused == 1
    assert gate.admit("d", "m/w.bin", PIECE, 2 * PIECE - 1, first_copy=True, now=1.0, zone="z").serve
    assert gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=False, now=2.0, zone="z").serve  # a stalled node is served
    assert gate.admit("d", "m/w.bin", 0, PIECE - 1, first_copy=True, now=40.0, zone="z").serve  # the window passed


def test_a_piece_inside_a_run_served_without_the_header_is_refused(make_gate):
    gate = make_gate()
    assert gate.admit("d", "f", 0, 8 * PIECE - 1, first_copy=False, now=0.0, zone="z").serve  # a lone node's run
    assert not gate.admit("d", "f", 3 * PIECE, 4 * PIECE - 1, first_copy=True, now=0.5, zone="z").serve
    assert gate.admit("d", "f", 8 * PIECE, 9 * PIECE - 1, first_copy=True, now=0.5, zone="z").serve
    assert gate.admit("d", "other", 0, PIECE - 1, first_copy=True, now=0.5, zone="z").serve


def test_clients_that_name_no_zone_never_make_the_gate_refuse(make_gate):
    # Issue #15: whole-file GETs from a client in no swarm kept a zone's nodes refused.
    gate = make_gate()
    for t in range(10):
        assert gate.admit("d", "f", 0, 100 * PIECE - 1, first_copy=False, now=t * 0.1).serve
        assert gate.admit("d", "f", 0, 100 * PIECE - 1, first_copy=True, now=t * 0.1).serve
    assert all(gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=1.0, zone="z").serve
               for i in range(100))
    assert gate.refused == 0


def test_a_piece_is_refused_a_bounded_number_of_times(make_gate):
    # Issue #15: a node of the zone that took the bytes and vanished never spreads them;
    # its zone's nodes are refused a few times, then served.
    gate = make_gate(window_s=30)
    assert gate.admit("d", "f", 0, 10 * PIECE - 1, first_copy=True, now=0.0, zone="z").serve
    answers = [gate.admit("d", "f", PIECE, 2 * PIECE - 1, first_copy=True, now=1.0 + i / 10, zone="z").serve
               for i in range(10)]
    assert answers == [False] * MAX_REFUSALS + [True] * (10 - MAX_REFUSALS)
    assert not gate.admit("d", "f", 2 * PIECE, 3 * PIECE - 1, first_copy=True, now=2.0, zone="z").serve


def test_memory_is_bounded():
    gate = FirstCopyGate(window_s=1000, max_ranges=100)
    for i in range(1000):
        assert gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=i / 1000).serve
    assert len(gate._order) <= 101 and sum(len(v) for v in gate._ranges.values()) <= 101


def test_zones_get_one_relay_each_and_their_own_copy_only_without_a_holder(make_gate):
    """A first copy served to zone a is relayed to zone b once, from the node that holds it."""
    gate = make_gate(window_s=30)
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
    # Bytes that went to a client of unknown zone are forgotten; such a client is always served.
    assert gate.admit("d", "g", 0, PIECE - 1, first_copy=False, now=2.0).serve
    assert gate.admit("d", "g", 0, PIECE - 1, first_copy=True, now=2.1, zone="b").serve
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=2.2).serve
    # The window passed: served again, to whoever asks first.
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=40.0, zone="b").serve


def test_every_piece_of_a_run_served_to_one_zone_is_relayed_to_another(make_gate):
    """A lone node's run is one range; each piece of it reaches another zone once."""
    gate = make_gate()
    assert gate.admit("d", "f", 0, 20 * PIECE - 1, first_copy=False, now=0.0, zone="a", relay="http://h:1").serve
    for i in range(20):
        got = gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=0.1, zone="b",
                         relay=f"http://b{i % 2}:1")
        assert got == Admission(False, "http://h:1"), i
        assert gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=0.2, zone="b") \
            == Admission(False)
    assert gate.relayed == 20


def test_bytes_served_to_one_zone_are_pushed_to_a_node_of_each_other_zone_in_turn(make_gate):
    gate = make_gate(window_s=30)
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


def test_memory_in_redis_is_bounded_and_expires(redis_url):
    """An artifact's served ranges and refusals are capped, and every key of its gate expires."""
    import redis

    gate = SyncGate(redis_url, window_s=1000, max_ranges=100)
    try:
        for i in range(300):
            assert gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=i / 1000, zone="z",
                              relay="http://h:1").serve
            assert not gate.admit("d", "f", i * PIECE, (i + 1) * PIECE - 1, first_copy=True, now=i / 1000,
                                  zone="z").serve
        client = redis.Redis.from_url(redis_url)
        keys = client.keys("mc:{g:d}*")
        assert keys and all(0 < client.pttl(k) <= 2_001_000 for k in keys), keys
        assert client.zcard("mc:{g:d}:o") <= 101 and client.zcard("mc:{g:d}:r:f") <= 101
        assert client.hlen("mc:{g:d}:f") <= 101 and client.zcard("mc:{g:d}:fo") <= 101
        client.close()
        # The newest ranges are still refused; the oldest were dropped (served again).
        assert not gate.admit("d", "f", 299 * PIECE, 300 * PIECE - 1, first_copy=True, now=0.5, zone="z").serve
        assert gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=0.5, zone="z").serve
    finally:
        gate.close()


def test_a_solo_requester_is_served_only_while_no_other_node_asks(make_gate):
    """A node's libtorrent URL seed (solo: it marks nothing and pushes to nobody) gets bytes while
    it is the only node asking; once another node asks, it is told so and nothing is remembered
    of the refused request, so the others' first-copy requests are not refused for it."""
    gate = make_gate(window_s=30)
    assert gate.admit("d", "f", 0, 8 * PIECE - 1, first_copy=False, now=0.0, zone="z", node="a", solo=True).serve
    assert gate.admit("d", "f", 8 * PIECE, 16 * PIECE - 1, first_copy=False, now=0.5, zone="z", node="a",
                      solo=True).serve
    # Node b (any zone) asks: b's first-copy request for a's bytes is refused as usual...
    assert not gate.admit("d", "f", 0, PIECE - 1, first_copy=True, now=1.0, zone="z", node="b").serve
    assert gate.admit("d", "f", 16 * PIECE, 17 * PIECE - 1, first_copy=True, now=1.0, zone="z", node="b").serve
    # ... and a's URL seed is sent back to marked requests, its range not taken.
    crowded = gate.admit("d", "f", 17 * PIECE, 24 * PIECE - 1, first_copy=False, now=1.5, zone="z", node="a",
                         solo=True)
    assert not crowded.serve and crowded.crowded and crowded.relay_from is None
    assert gate.admit("d", "f", 20 * PIECE, 21 * PIECE - 1, first_copy=True, now=2.0, zone="z", node="b").serve
    assert gate.refused == 1
    # Another artifact is not crowded; this one is again once the others stopped asking.
    assert gate.admit("e", "f", 0, PIECE - 1, first_copy=False, now=2.0, zone="z", node="a", solo=True).serve
    assert gate.admit("d", "f", 30 * PIECE, 31 * PIECE - 1, first_copy=False, now=40.0, zone="y", node="c",
                      solo=True).serve


def test_a_solo_requester_of_another_zone_is_crowded_too(make_gate):
    gate = make_gate(window_s=30)
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=False, now=0.0, zone="z", node="a").serve
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=False, now=0.1, zone="y", node="b", solo=True).crowded
    # A request that proves no node (no zone for the gate) is never crowded: nothing to share with.
    assert gate.admit("d", "f", 0, PIECE - 1, first_copy=False, now=0.2, solo=True).serve
