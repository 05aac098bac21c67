"""The console's HTML: plain functions from the views' dicts to page text.  No I/O.

Every value that came from outside (names, tags, paths, annotations, node ids, zones) goes
through :func:`esc`; URLs are built from checked digests and quoted parts only.  Pages load
one stylesheet and one script from ``/ui/static/`` and nothing else (the responses carry a
Content-Security-Policy that allows only that), so the console works with no internet.
The rollout tables are rendered here once; ``console.js`` then redraws them from the JSON
view every half second with the same columns.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from modelcast.manifest import Manifest
from modelcast.units import human_bytes

MAX_FILES_SHOWN = 1000
STATE_LABELS = {"queued": "queued", "downloading": "downloading", "verifying": "verifying", "ready": "complete",
                "failed": "failed"}


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def redact_url(url: str | None) -> str:
    """``url`` without what may be a secret: user and password, query (presigned signatures), fragment."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparsable URL, not shown)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def rate(n: float) -> str:
    return f"{human_bytes(n)}/s"


def utc(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def short(digest: str) -> str:
    return digest[:19]


def artifact_href(digest: str) -> str:
    return f"/ui/artifacts/{quote(digest, safe=':')}"


def rollout_href(digest: str) -> str:
    return f"/ui/rollout/{quote(digest, safe=':')}"


# ---- the frame ---------------------------------------------------------------------------


def page(title: str, body: str, *, nav: str = "", live_nodes: int | None = None) -> str:
    """A whole page: the header with navigation, then ``body``."""
    links = "".join(f'<a href="{href}"{" class=current" if key == nav else ""}>{label}</a>'
                    for key, href, label in (("artifacts", "/ui", "Artifacts"), ("nodes", "/ui/nodes", "Nodes")))
    fleet = f'<span class="fleet">{live_nodes} node{"s" if live_nodes != 1 else ""} live</span>' \
        if live_nodes is not None else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · modelcast</title>
<link rel="stylesheet" href="/ui/static/console.css">
<script src="/ui/static/console.js" defer></script>
</head>
<body>
<header><a class="brand" href="/ui">modelcast</a><nav>{links}</nav>{fleet}</header>
<main>
{body}
</main>
</body>
</html>
"""


def error_page(status: int, message: str) -> str:
    return page(f"Error {status}", f'<h1>Error {status}</h1>\n<p class="error">{esc(message)}</p>\n'
                                   '<p><a href="/ui">Back to the artifacts</a></p>')


def login_page(next_path: str, problem: str | None = None) -> str:
    """The form that trades the registry's read token for a console cookie (the token is never echoed)."""
    note = f'<p class="error">{esc(problem)}</p>' if problem else ""
    body = f"""<h1>Sign in</h1>
<p>This registry needs its read token (or its write token) to be read.</p>
{note}
<form class="login" method="post" action="/ui/login">
<input type="hidden" name="next" value="{esc(next_path)}">
<label>Token <input type="password" name="token" autocomplete="current-password" required autofocus></label>
<button type="submit">Sign in</button>
</form>
<p class="hint">Or open any console page once with <code>?token=TOKEN</code>; the console then keeps an
HttpOnly cookie (derived from the token, never the token itself) for this browser.</p>"""
    return page("Sign in", body)


def table(columns: Iterable[str], rows: Iterable[str], *, attrs: str = "", empty: str = "nothing yet") -> str:
    cols = list(columns)
    rows = list(rows)
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "\n".join(rows) if rows else f'<tr class="empty"><td colspan="{len(cols)}">{esc(empty)}</td></tr>'
    return f"<table {attrs}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def progress_cell(fraction: float, state: str) -> str:
    return (f'<td class="progress"><progress max="1" value="{fraction:.4f}" class="{esc(state)}"></progress>'
            f' <span class="pct">{fraction * 100:.1f}%</span></td>')


def chips(values: Iterable[str], cls: str = "chip") -> str:
    return " ".join(f'<span class="{cls}">{esc(v)}</span>' for v in values) or "-"


# ---- /ui: artifacts and tags -------------------------------------------------------------


def artifacts_page(items: list[dict], counts: Mapping[str, tuple[int, int]], query: str, next_cursor: str | None,
                   live_nodes: int) -> str:
    rows = []
    for a in items:
        complete, active = counts.get(a["digest"], (0, 0))
        tags = chips(f"{a['name']}:{t}" for t in a.get("tags") or [])
        rows.append(
            f'<tr data-digest="{esc(a["digest"])}" data-name="{esc(a["name"])}">'
            f'<td><a href="{artifact_href(a["digest"])}">{esc(a["name"])}</a></td>'
            f'<td class="tags">{tags}</td><td>{esc(a["kind"])}</td>'
            f'<td class="num" data-bytes="{int(a["total_size"])}">{human_bytes(a["total_size"])}</td>'
            f'<td class="mono" title="{esc(a["digest"])}">{esc(short(a["digest"]))}</td>'
            f'<td>{esc(a.get("created"))}</td>'
            f'<td class="num" data-complete="{complete}" data-active="{active}">{complete} complete'
            f'{f", {active} pulling" if active else ""}</td></tr>')
    search = (f'<form class="search" method="get" action="/ui">'
              f'<input type="search" name="q" value="{esc(query)}" placeholder="search by name" aria-label="name">'
              f'<button type="submit">Search</button>'
              f'{" <a href=/ui>clear</a>" if query else ""}</form>')
    more = ""
    if next_cursor:
        q = f"&q={quote(query, safe='')}" if query else ""
        more = f'<p><a class="next" href="/ui?after={quote(next_cursor, safe="")}{q}">Next page</a></p>'
    body = (f"<h1>Artifacts</h1>\n{search}\n"
            + table(("Name", "Tags", "Kind", "Size", "Digest", "Created", "Nodes"), rows, attrs='id="artifacts"',
                    empty=f"no artifact name contains {query!r}" if query else "no artifact published yet")
            + more)
    return page("Artifacts", body, nav="artifacts", live_nodes=live_nodes)


# ---- rollout tables (the artifact page and /ui/rollout/{digest}) ---------------------------

ROLLOUT_COLUMNS = ("Node", "Zone", "State", "Progress", "Done", "Rate", "From peers", "From origin",
                   "From other zones", "Heartbeat")
ZONE_COLUMNS = ("Zone", "Nodes", "Complete", "Downloading", "Failed", "From peers", "From origin",
                "From other zones", "Rate")


def summary_text(view: dict) -> str:
    s = view["summary"]
    if not s["nodes"]:
        return "No node reports this artifact yet."
    parts = [f"{s['complete']} of {s['nodes']} nodes complete"]
    if s["downloading"]:
        parts.append(f"{s['downloading']} downloading at {rate(s['rate'])}")
    if s["failed"]:
        parts.append(f"{s['failed']} failed")
    parts.append(f"{human_bytes(s['bytes_from_origin'])} from the origin, "
                 f"{human_bytes(s['bytes_from_other_zones'])} across zones, {human_bytes(s['bytes_from_peers'])} "
                 "from peers")
    return "; ".join(parts) + "."


def rollout_row(r: dict) -> str:
    return (f'<tr data-node="{esc(r["node"])}" data-state="{esc(r["state"])}" data-fraction="{r["fraction"]:.4f}">'
            f'<td class="mono">{esc(r["node"])}</td><td>{esc(r["zone"] or "-")}</td>'
            f'<td class="state {esc(r["state"])}">{esc(STATE_LABELS.get(r["state"], r["state"]))}</td>'
            + progress_cell(r["fraction"], r["state"])
            + f'<td class="num">{human_bytes(r["done_bytes"])} / {human_bytes(r["total_bytes"])}</td>'
            f'<td class="num">{rate(r["rate"])}</td><td class="num">{human_bytes(r["bytes_from_peers"])}</td>'
            f'<td class="num">{human_bytes(r["bytes_from_origin"])}</td>'
            f'<td class="num">{human_bytes(r["bytes_from_other_zones"])}</td>'
            f'<td class="num">{ago(r["seconds_since_heartbeat"])}</td></tr>')


def zone_row(z: dict) -> str:
    return (f'<tr data-zone="{esc(z["zone"] or "")}"><td>{esc(z["zone"] or "-")}</td><td class="num">{z["nodes"]}</td>'
            f'<td class="num">{z["complete"]}</td><td class="num">{z["downloading"]}</td>'
            f'<td class="num">{z["failed"]}</td><td class="num">{human_bytes(z["bytes_from_peers"])}</td>'
            f'<td class="num">{human_bytes(z["bytes_from_origin"])}</td>'
            f'<td class="num">{human_bytes(z["bytes_from_other_zones"])}</td>'
            f'<td class="num">{rate(z["rate"])}</td></tr>')


def rollout_section(view: dict, feed: str) -> str:
    """The live rollout: summary, one row per node, sums per zone; ``feed`` is the JSON the script polls."""
    swarm = view.get("swarm")
    tracker = (f'Tracker swarm: {swarm["complete"]} seeding, {swarm["incomplete"]} downloading, '
               f'{swarm["downloaded"]} completed downloads (every BitTorrent client, node daemons or not).'
               if swarm else "")
    nodes = table(ROLLOUT_COLUMNS, map(rollout_row, view["nodes"]), attrs='class="rollout-nodes"',
                  empty="no node pulls or holds this artifact")
    zones = table(ZONE_COLUMNS, map(zone_row, view["zones"]), attrs='class="rollout-zones"', empty="no zone yet")
    return f"""<section class="rollout" data-feed="{esc(feed)}">
<h2>Rollout <span class="live" title="refreshed from {esc(feed)}">live</span></h2>
<p class="summary">{esc(summary_text(view))}</p>
{nodes}
<h2>Swarm by zone</h2>
{zones}
<p class="tracker-swarm">{esc(tracker)}</p>
<p class="updated">as of {utc(view["at"])}</p>
</section>"""


# ---- /ui/artifacts/{digest} and /ui/rollout/{digest} ----------------------------------------


def artifact_page(digest: str, manifest: Manifest, tags: list[str], origin_url: str, s3_endpoint: str | None,
                  view: dict, live_nodes: int) -> str:
    ih = manifest.info_hash
    facts = [
        ("Digest", f'<span class="mono">{esc(digest)}</span>'),
        ("Kind", esc(manifest.kind)),
        ("Tags", chips(f"{manifest.name}:{t}" for t in tags)),
        ("Size", f"{human_bytes(manifest.total_size)} ({manifest.total_size:,} bytes) in {len(manifest.files)} "
                 f"file{'s' if len(manifest.files) != 1 else ''}"),
        ("Created", esc(manifest.created)),
        ("Piece length", human_bytes(manifest.piece_length)),
        ("Info-hash v1", f'<span class="mono">{esc(ih.v1 or "-")}</span>'),
        ("Info-hash v2", f'<span class="mono">{esc(ih.v2 or "-")}</span>'),
        ("Origin", f'<span class="mono">{esc(redact_url(origin_url))}</span>'
                   + (f' via <span class="mono">{esc(redact_url(s3_endpoint))}</span>' if s3_endpoint else "")),
    ]
    dl = "\n".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    notes = "\n".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in sorted(manifest.annotations.items()))
    files = manifest.files[:MAX_FILES_SHOWN]
    file_rows = (f'<tr><td class="mono">{esc(f.path)}</td><td class="num" data-bytes="{f.size}">{human_bytes(f.size)}'
                 f'</td><td class="mono">{esc(f.xxh3_128)}</td></tr>' for f in files)
    more = (f'<p class="hint">{len(manifest.files) - len(files)} more files not shown.</p>'
            if len(manifest.files) > len(files) else "")
    annotations = f'<dl class="facts annotations">{notes}</dl>' if notes else '<p class="hint">none</p>'
    body = f"""<h1>{esc(manifest.name)}</h1>
<p class="hint"><a href="{rollout_href(digest)}">Rollout view</a></p>
<dl class="facts">
{dl}
</dl>
<h2>Annotations</h2>
{annotations}
{rollout_section(view, f"/ui/api/rollout/{quote(digest, safe=':')}")}
<h2>Files</h2>
{table(("Path", "Size", "xxh3-128"), file_rows, attrs='id="files"', empty="no files")}
{more}"""
    return page(manifest.name, body, nav="artifacts", live_nodes=live_nodes)


def rollout_page(digest: str, view: dict, live_nodes: int) -> str:
    name = view.get("name") or digest
    body = (f'<h1>Rollout of <a href="{artifact_href(digest)}">{esc(name)}</a></h1>\n'
            f'<p class="mono hint">{esc(digest)} · {human_bytes(view["total_bytes"])}</p>\n'
            + rollout_section(view, f"/ui/api/rollout/{quote(digest, safe=':')}"))
    return page(f"Rollout of {name}", body, nav="artifacts", live_nodes=live_nodes)


# ---- /ui/nodes ---------------------------------------------------------------------------------


def _artifact_link(entry: dict) -> str:
    label = entry.get("name") or short(entry["digest"])
    return f'<a href="{artifact_href(entry["digest"])}" title="{esc(entry["digest"])}">{esc(label)}</a>'


def nodes_page(view: dict, zone: str | None = None) -> str:
    rows = []
    for n in view["nodes"]:
        held = [a for a in n["artifacts"] if a["state"] == "ready"]
        pulling = [a for a in n["artifacts"] if a["state"] != "ready"]
        holds = ", ".join(_artifact_link(a) for a in held) or "-"
        if n["more_artifacts"]:
            holds += f' <span class="hint">and {n["more_artifacts"]} more</span>'
        if not n["reported"] and n["alive"]:
            holds = '<span class="hint">not reported (an older node)</span>'
        pulls = "".join(map(_pull, pulling)) or "-"
        alive = "yes" if n["alive"] else f"no ({esc(n['gone'])})"
        rows.append(
            f'<tr data-node="{esc(n["node"])}" data-alive="{str(n["alive"]).lower()}" '
            f'data-holds="{esc(" ".join(a["digest"] for a in held))}" '
            f'data-pulling="{esc(" ".join(a["digest"] for a in pulling))}">'
            f'<td class="mono">{esc(n["node"])}</td><td>{_zone_link(n["zone"])}</td>'
            f'<td class="{"alive" if n["alive"] else "gone"}">{alive}</td>'
            f'<td>{utc(n["last_heartbeat"])} <span class="hint">({ago(n["seconds_since_heartbeat"])})</span></td>'
            f"<td>{holds}</td><td>{pulls}</td></tr>")
    where = f' in zone {esc(zone)} (<a href="/ui/nodes">all zones</a>)' if zone else ""
    more = (f'<p class="hint">{view["more"]} more not shown: pick a zone (<code>?zone=</code>) or raise '
            '<code>?limit=</code>.</p>' if view["more"] else "")
    body = (f"<h1>Nodes{where}</h1>\n<p class=\"summary\">{view['live']} live, {view['gone']} recently gone; as of "
            f"{utc(view['at'])}. Nodes report with each heartbeat.</p>\n"
            + table(("Node", "Zone", "Alive", "Last heartbeat", "Holds", "Pulling"), rows, attrs='id="nodes"',
                    empty="no node has sent a heartbeat yet") + more)
    return page("Nodes", body, nav="nodes", live_nodes=view["live"])


def _zone_link(zone: str | None) -> str:
    return f'<a href="/ui/nodes?zone={quote(zone, safe="")}">{esc(zone)}</a>' if zone else "-"


def _pull(a: dict) -> str:
    speed = "" if a["state"] == "failed" else f" at {rate(a['rate'])}"
    return (f'<div class="pull" data-digest="{esc(a["digest"])}" data-state="{esc(a["state"])}">{_artifact_link(a)} '
            f'<progress max="1" value="{_fraction(a):.4f}" class="{esc(a["state"])}"></progress> '
            f'<span class="pct">{_fraction(a) * 100:.1f}%</span> {esc(STATE_LABELS.get(a["state"], a["state"]))}'
            f'{speed}</div>')


def _fraction(a: dict) -> float:
    if a["state"] == "ready":
        return 1.0
    return min(1.0, a["done_bytes"] / a["total_bytes"]) if a["total_bytes"] else 0.0
