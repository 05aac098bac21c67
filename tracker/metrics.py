"""The registry's Prometheus metrics on ``GET /metrics``, through ``prometheus_client``.

Two kinds of sources, one :class:`~prometheus_client.CollectorRegistry` per application:

* What the tracker's hot paths count (announces and scrapes over HTTP, fast path
  included, and UDP; origin bytes; the first-copy gate's decisions) stays plain integers
  in the state those paths already keep (:class:`~tracker.endpoint.TrackerEndpoint`,
  :class:`~tracker.udp_server.UdpStats`, :class:`~tracker.state.Stats`,
  :class:`~tracker.firstcopy.FirstCopyGate`).  :class:`RegistryCollector` turns them, and
  the swarm state (live nodes per zone, swarms, peers), into metric families at scrape
  time.  An announce costs an integer increment, not a ``Counter.inc()`` with its lock
  and label lookup: the announce fast path's throughput is a measured budget
  (``benchmarks/tracker_load.py``).
* Request latencies of the registry API (through aiohttp, by the route's canonical name,
  never the raw path) and of the SQL store are ``prometheus_client`` histograms,
  observed per request by :func:`metrics_middleware` and per store call.

Every label set is bounded: routes and store operations are fixed by the code, results
and HTTP codes by the protocol, zones are capped at :data:`MAX_ZONE_LABELS` (a client
names its own zone; the rest is summed under ``_other``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .auth import check_auth
from .endpoint import TRACKER
from .state import FIRST_COPY, NO_ZONE, STATS, SWARMS, UDP_TRACKER
from .swarm import TRACKER_RESULTS

# Registry API answers take from a millisecond (resolve from SQLite) to seconds (a publish
# of a big torrent, a web seed range streamed from S3).
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One SQLite statement or transaction: tens of microseconds, up to the 5 s busy timeout.
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
# The store's operations (tracker/store.py), created at zero so a dashboard sees them all.
STORE_OPERATIONS = ("publish", "pull_through", "drop_pulled_tag", "delete_tag", "delete_artifact", "lookup", "get",
                    "list", "all_info_hashes", "names", "tags_of")
MAX_ZONE_LABELS = 256
OTHER_ZONES = "_other"  # not a valid zone name (tracker/announce.py ZONE_RE), so it cannot clash with one

# Routes whose requests are also reported as node liveness events.
HEARTBEAT_ROUTE = ("POST", "/v1/nodes/{node_id}/heartbeat")
LEAVE_ROUTE = ("DELETE", "/v1/nodes/{node_id}")
_RESULT_OF_STATUS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large"}
UNMATCHED_ROUTE = "unmatched"  # 404 and 405: no route of ours, so no route label either
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _result(status: int) -> str:
    return "ok" if status < 400 else _RESULT_OF_STATUS.get(status, "error")


def kept_zones(totals: dict[str, int], limit: int = MAX_ZONE_LABELS) -> set[str]:
    """The zones that get a label of their own: all, or the ``limit - 1`` largest when there are more."""
    if len(totals) <= limit:
        return set(totals)
    return {zone for zone, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:limit - 1]}


def capped(counts: dict[str, int], limit: int = MAX_ZONE_LABELS) -> dict[str, int]:
    """``counts`` by zone with at most ``limit`` zones, the smallest summed under :data:`OTHER_ZONES`."""
    kept = kept_zones(counts, limit)
    if len(kept) == len(counts):
        return counts
    out = {zone: counts[zone] for zone in kept}
    out[OTHER_ZONES] = sum(n for zone, n in counts.items() if zone not in kept)
    return out


class RegistryCollector(Collector):
    """Every ``modelcast_registry_*`` metric read from the application's state at scrape time."""

    def __init__(self, app: web.Application, requests: Tally):
        self.app = app
        self.requests = requests  # (route, method, code) -> answered requests, from metrics_middleware

    def collect(self) -> Iterator[Metric]:
        app = self.app
        endpoint, swarms, stats, gate = app[TRACKER], app[SWARMS], app[STATS], app[FIRST_COPY]
        udp = app.get(UDP_TRACKER)
        udp_stats = udp.tracker.stats if udp is not None else None

        sources = [("http", endpoint.announces, endpoint.scrapes, endpoint.failures)]
        if udp_stats is not None:
            sources.append(("udp", udp_stats.announces, udp_stats.scrapes, udp_stats.failures))
        for kind in ("announce", "scrape"):
            family = CounterMetricFamily(f"modelcast_registry_{kind}s", f"Tracker {kind}s answered, by transport "
                                         "and result (unknown_torrent: an info-hash no artifact has; invalid: a "
                                         "malformed request; error: a bug, logged).", labels=["transport", "result"])
            for transport, announces, scrapes, failures in sources:
                family.add_metric([transport, "ok"], announces if kind == "announce" else scrapes)
                for result in TRACKER_RESULTS:
                    family.add_metric([transport, result], failures.get((kind, result), 0))
            yield family
        if udp_stats is not None:
            yield CounterMetricFamily("modelcast_registry_udp_connects", "BEP 15 connect requests answered.",
                                      value=udp_stats.connects)
            dropped = CounterMetricFamily("modelcast_registry_udp_dropped_packets", "UDP tracker packets left "
                                          "unanswered: too short to answer, or the answer could not be sent.",
                                          labels=["reason"])
            dropped.add_metric(["malformed"], udp_stats.dropped)
            dropped.add_metric(["send_failed"], udp_stats.send_errors)
            yield dropped

        for name, (method, route), help_text in (
                ("heartbeats", HEARTBEAT_ROUTE, "Node heartbeats, by result."),
                ("node_leaves", LEAVE_ROUTE, "Nodes leaving every swarm at once (clean stops), by result.")):
            family = CounterMetricFamily(f"modelcast_registry_{name}", help_text, labels=["result"])
            by_result = Tally({"ok": 0, "bad_request": 0, "unauthorized": 0})
            for (r, m, code), n in self.requests.items():
                if r == route and m == method:
                    by_result[_result(int(code))] += n
            for result, n in sorted(by_result.items()):
                family.add_metric([result], n)
            yield family

        live = GaugeMetricFamily("modelcast_registry_live_nodes", "Node daemons with a live heartbeat, by zone.",
                                 labels=["zone"])
        live_zones = capped(swarms.live_nodes_by_zone())
        for zone, n in sorted(live_zones.items()):
            live.add_metric([zone], n)
        yield live
        total, active = swarms.swarm_totals()
        published = GaugeMetricFamily("modelcast_registry_swarms", "Swarms of published artifacts, by whether any "
                                      "peer is in them.", labels=["state"])
        published.add_metric(["active"], active)
        published.add_metric(["idle"], total - active)
        yield published
        peers = GaugeMetricFamily("modelcast_registry_peers", "Peers in the swarms, by zone, state (complete: "
                                  "seeding; downloading) and role (origin_seed: the origin's own seed).",
                                  labels=["zone", "state", "role"])
        counts = swarms.peer_counts()
        totals: Tally = Tally()
        for (zone, _, _), n in counts.items():
            totals[zone] += n
        kept = kept_zones(totals)
        merged: Tally = Tally()
        for (zone, complete, origin_seed), n in counts.items():
            merged[(zone if zone in kept else OTHER_ZONES, complete, origin_seed)] += n
        for (zone, complete, origin_seed), n in sorted(merged.items()):
            peers.add_metric([zone, "complete" if complete else "downloading",
                              "origin_seed" if origin_seed else "peer"], n)
        yield peers

        served = CounterMetricFamily("modelcast_registry_origin_served_bytes", "Bytes the web seed served from the "
                                     "origin, by the zone the requesting node named (_none: none named).",
                                     labels=["zone"])
        requests = CounterMetricFamily("modelcast_registry_origin_requests", "Web seed answers that carried origin "
                                       "bytes, by the requesting node's zone.", labels=["zone"])
        # Every zone with live nodes is there from its first heartbeat, at zero until the origin
        # serves it: a series that appears only with its first bytes would lose them to rate().
        zones = set(stats.origin_requests_by_zone) | set(live_zones)  # each capped: bounded
        for zone in sorted(zones or {NO_ZONE}):
            served.add_metric([zone], stats.origin_bytes_by_zone.get(zone, 0))
            requests.add_metric([zone], stats.origin_requests_by_zone.get(zone, 0))
        yield served
        yield requests
        yield CounterMetricFamily("modelcast_registry_origin_redirected_bytes", "Of the origin bytes served, those "
                                  "handed to nodes as presigned object-store URLs (S3 origins): they never passed "
                                  "through the registry.", value=stats.origin_bytes_redirected)
        yield CounterMetricFamily("modelcast_registry_first_copy_refusals", "Web seed requests refused (409) "
                                  "because the bytes were just served to the same zone: peers have them.",
                                  value=gate.refused)
        relays = CounterMetricFamily("modelcast_registry_relays", "Copies between zones the first-copy gate "
                                     "directed: push (the served node pushes to a node of another zone) and fetch "
                                     "(a node of another zone fetches from the holder).", labels=["mode"])
        relays.add_metric(["push"], gate.pushed)
        relays.add_metric(["fetch"], gate.relayed)
        yield relays

        http = CounterMetricFamily("modelcast_registry_http_requests", "Registry API requests through aiohttp, by "
                                   "route (its canonical name), method and HTTP status code.",
                                   labels=["route", "method", "code"])
        for (route, method, code), n in sorted(self.requests.items()):
            http.add_metric([route, method, code], n)
        yield http


class RegistryMetrics:
    """The registry's metrics: its ``CollectorRegistry``, the latency histograms and the request tallies."""

    def __init__(self, app: web.Application):
        self.registry = CollectorRegistry()
        self.requests: Tally = Tally()
        self.registry.register(RegistryCollector(app, self.requests))
        self.request_seconds = Histogram(
            "modelcast_registry_http_request_duration_seconds",
            "Time to answer a registry API request through aiohttp, by route (its canonical name) and method; "
            "for a web seed file, until the headers are sent.",
            ["route", "method"], buckets=API_BUCKETS, registry=self.registry)
        self.store_seconds = Histogram(
            "modelcast_registry_store_operation_duration_seconds",
            "Time of one registry database (SQLite or PostgreSQL) operation, waiting for its lock included.",
            ["operation"], buckets=STORE_BUCKETS, registry=self.registry)
        self.store_errors = Counter("modelcast_registry_store_errors", "Registry database operations that failed.",
                                    ["operation"], registry=self.registry)
        for op in STORE_OPERATIONS:
            self.store_seconds.labels(op)
            self.store_errors.labels(op)

    def prime_routes(self, router: web.UrlDispatcher) -> None:
        """Make every route's latency series exist at zero from the first scrape.

        A series that first appears already counting N requests shows no increase to
        Prometheus, so ``rate()`` and the dashboard's p99 miss a burst of requests that
        fell between two scrapes (a fast pull's web-seed ranges); primed, it counts from 0.
        """
        for route in router.routes():
            if route.resource is not None and route.method in _METHODS:
                self.request_seconds.labels(route.resource.canonical, route.method)

    def observe_request(self, request: web.BaseRequest, status: int, seconds: float) -> None:
        route = request.match_info.route
        if route.resource is None:
            name, method = UNMATCHED_ROUTE, request.method if request.method in _METHODS else "other"
        else:
            name, method = route.resource.canonical, route.method
        self.observe_route(name, method, status, seconds)

    def observe_route(self, name: str, method: str, status: int, seconds: float) -> None:
        """Count and time one answer of route ``name`` (also for answers of the fast path, tracker/fastpath.py)."""
        self.requests[(name, method, str(status))] += 1
        self.request_seconds.labels(name, method).observe(seconds)

    def observe_store(self, operation: str, seconds: float, failed: bool) -> None:
        """Called by :class:`~tracker.store.RegistryStore` after each operation, on its worker thread."""
        self.store_seconds.labels(operation).observe(seconds)
        if failed:
            self.store_errors.labels(operation).inc()

    def exposition(self) -> bytes:
        """The text a Prometheus scrape of ``GET /metrics`` gets."""
        return generate_latest(self.registry)


# Here, not in tracker/state.py: the collector reads the other keys, and state.py would import this module.
METRICS = web.AppKey("metrics", RegistryMetrics)


@web.middleware
async def metrics_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Count and time every request aiohttp answers (outermost, so it sees the status the client gets)."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before the answer (nginx's code for it)
        raise
    finally:
        request.app[METRICS].observe_request(request, status, time.perf_counter() - start)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text; guarded like every read (``--read-token``)."""
    check_auth(request, read=True)
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
