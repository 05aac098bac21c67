"""A real Prometheus scrapes the registry and two node daemons during a real pull; every query of the
Grafana dashboard (dashboards/modelcast.json) then answers with data, and every /metrics passes promtool."""

from __future__ import annotations

import json
import math
import re
import urllib.request

import pytest

from .helpers import (PROMETHEUS, PROMTOOL, ROOT, TOKEN, make_model, promtool_check_metrics, publish, start_node,
                      start_prometheus, start_tracker, wait_until)

DASHBOARD = ROOT / "dashboards" / "modelcast.json"
READ_TOKEN = "prometheus-reads"
# What Grafana puts in place of $__rate_interval: at least four scrape intervals; a minute
# covers the pull that just ended at this test's 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool are not installed (Debian package prometheus; `make test` installs it when root)")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            found.extend((panel["title"], t["expr"]) for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def test_the_dashboard_imports_with_a_prometheus_datasource_input_and_only_known_variables():
    dash = json.loads(DASHBOARD.read_text())
    assert [(i["name"], i["type"], i["pluginId"]) for i in dash["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")]
    assert dash["id"] is None and dash["uid"]  # an import makes a new dashboard, with a stable uid
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
    queries = dashboard_queries()
    # Each panel the issue asks for is there.
    text = " ".join(expr for _, expr in queries)
    for metric in ("modelcast_registry_peers", "modelcast_registry_origin_served_bytes_total",
                   "modelcast_node_bytes_from_relay_total", "modelcast_node_pull_duration_seconds_bucket",
                   "modelcast_node_cache_bytes", "modelcast_node_evictions_total", "modelcast_registry_announces_total",
                   "modelcast_registry_http_requests_total", "modelcast_registry_live_nodes"):
        assert metric in text, metric
    for title, expr in queries:
        unknown = set(re.findall(r"\$\{?\w+\}?", expr)) - set(GRAFANA_VARIABLES)
        assert not unknown, f"panel {title!r} uses variables this test does not know how to fill: {unknown}"


def _get(url: str, token: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


@needs_prometheus
def test_prometheus_scrapes_registry_and_nodes_during_a_pull_and_every_dashboard_query_has_data(tmp_path):
    registry = start_tracker(tmp_path, token=TOKEN, read_token=READ_TOKEN)
    started = [registry]
    try:
        model = make_model(tmp_path / "model", {"weights.bin": 48 << 20, "config.json": 2000})
        digest = publish(registry.url, model, "fleet/model:v1", (tmp_path / "origin").as_uri())
        # Two zones: the origin's bytes are counted per zone, and one copy crosses between them.
        nodes = [start_node(tmp_path, registry.url, f"node-{zone}", zone=zone, token=READ_TOKEN,
                            extra=["--quota", "1G"]) for zone in ("z1", "z2")]
        started += nodes
        token_file = tmp_path / "read-token"
        token_file.write_text(READ_TOKEN)
        prom = start_prometheus(tmp_path / "prometheus", [
            # The README's scrape_config: the registry's /metrics needs the read token.
            {"job_name": "modelcast-registry", "authorization": {"credentials_file": str(token_file)},
             "static_configs": [{"targets": [f"127.0.0.1:{registry.port}"]}]},
            {"job_name": "modelcast-node",
             "static_configs": [{"targets": [f"127.0.0.1:{n.api_port}" for n in nodes]}]},
        ])
        started.append(prom)

        def all_up():
            targets = prom.targets()
            return len(targets) == 3 and all(t["health"] == "up" for t in targets) and targets

        wait_until(all_up, 60, 0.2, lambda: f"3 targets up, Prometheus sees {prom.targets()}")

        for node in nodes:
            _post_json(f"{node.url}/v1/pull", {"ref": "fleet/model:v1", "wait": False})

        def ready(node) -> bool:
            state = json.loads(_get(f"{node.url}/v1/pulls/{digest}"))["state"]
            assert state != "failed", f"pull failed on {node.name}; see {node.log_path}"
            return state == "ready"

        wait_until(lambda: all(ready(n) for n in nodes), 180, 0.2, "both nodes to pull the artifact")

        def scraped(expr: str, want: float) -> bool:
            result = prom.query(expr)
            return bool(result) and float(result[0]["value"][1]) == want

        # Prometheus has scraped the end of the pull, with the nodes seeding and alive.
        wait_until(lambda: (scraped('sum(modelcast_node_pulls_total{result="ready"})', 2)
                            and scraped('sum(modelcast_registry_peers{role="peer",state="complete"})', 2)
                            and scraped("count(modelcast_registry_live_nodes)", 2)), 60, 0.5,
                   "Prometheus to scrape both pulls ready and both nodes seeding")

        empty = []
        for title, expr in dashboard_queries():
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            result = prom.query(expr)
            values = [float(sample["value"][1]) for sample in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {expr} -> {result}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # What the dashboard shows is what happened: both zones live and served by the origin.
        assert {s["metric"]["zone"]: float(s["value"][1]) for s in
                prom.query("sum by (zone) (modelcast_registry_live_nodes)")} == {"z1": 1, "z2": 1}
        origin = {s["metric"]["zone"]: float(s["value"][1]) for s in
                  prom.query("sum by (zone) (modelcast_registry_origin_served_bytes_total)")}
        assert sum(origin.values()) >= 48 << 20 and set(origin) <= {"z1", "z2"}, origin
        progress = prom.query('sum(modelcast_registry_peers{role="peer",state="complete"}) / '
                              'clamp_min(sum(modelcast_registry_peers{role="peer"}), 1)')
        assert float(progress[0]["value"][1]) == 1.0

        complaints = {"registry": promtool_check_metrics(_get(f"{registry.url}/metrics", READ_TOKEN))}
        complaints.update({n.name: promtool_check_metrics(_get(f"{n.url}/metrics")) for n in nodes})
        assert complaints == {"registry": "", "node-z1": "", "node-z2": ""}
    finally:
        for svc in reversed(started):
            svc.stop()
