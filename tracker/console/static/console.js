// modelcast console: redraws the live rollout from its JSON feed twice a second.
// Everything from the feed is written with textContent: no markup from data, ever.
"use strict";
(function () {
  const POLL_MS = 500;
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  const LABELS = {queued: "queued", downloading: "downloading", verifying: "verifying", ready: "complete",
                  failed: "failed"};

  // The same text as modelcast.units.human_bytes, so the page reads the same before and after a redraw.
  function bytes(n) {
    let i = 0;
    while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n.toFixed(0)} B` : `${n.toFixed(1)} ${UNITS[i]}`;
  }
  const rate = (n) => `${bytes(n)}/s`;
  const ago = (s) => (s < 120 ? `${s.toFixed(1)} s ago` : `${(s / 60).toFixed(0)} min ago`);
  const utc = (t) => new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function progressCell(tr, fraction, state) {
    const td = cell(tr, "", "progress");
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = fraction;
    bar.className = state;
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(fraction * 100).toFixed(1)}%`;
    td.append(bar, " ", pct);
  }

  function fill(table, rows, draw, empty) {
    const tbody = table.tBodies[0];
    const cols = table.tHead.rows[0].cells.length;
    const fresh = document.createElement("tbody");
    if (rows.length === 0) {
      const tr = fresh.insertRow();
      tr.className = "empty";
      cell(tr, empty).colSpan = cols;
    }
    for (const row of rows) draw(fresh.insertRow(), row);
    table.replaceChild(fresh, tbody);
  }

  function nodeRow(tr, r) {
    tr.dataset.node = r.node;
    tr.dataset.state = r.state;
    tr.dataset.fraction = r.fraction.toFixed(4);
    cell(tr, r.node, "mono");
    cell(tr, r.zone || "-");
    cell(tr, LABELS[r.state] || r.state, `state ${r.state}`);
    progressCell(tr, r.fraction, r.state);
    cell(tr, `${bytes(r.done_bytes)} / ${bytes(r.total_bytes)}`, "num");
    cell(tr, rate(r.rate), "num");
    cell(tr, bytes(r.bytes_from_peers), "num");
    cell(tr, bytes(r.bytes_from_origin), "num");
    cell(tr, bytes(r.bytes_from_other_zones), "num");
    cell(tr, ago(r.seconds_since_heartbeat), "num");
  }

  function zoneRow(tr, z) {
    tr.dataset.zone = z.zone || "";
    cell(tr, z.zone || "-");
    for (const k of ["nodes", "complete", "downloading", "failed"]) cell(tr, String(z[k]), "num");
    for (const k of ["bytes_from_peers", "bytes_from_origin", "bytes_from_other_zones"]) cell(tr, bytes(z[k]), "num");
    cell(tr, rate(z.rate), "num");
  }

  // The same sentence as pages.summary_text.
  function summary(view) {
    const s = view.summary;
    if (!s.nodes) return "No node reports this artifact yet.";
    const parts = [`${s.complete} of ${s.nodes} nodes complete`];
    if (s.downloading) parts.push(`${s.downloading} downloading at ${rate(s.rate)}`);
    if (s.failed) parts.push(`${s.failed} failed`);
    parts.push(`${bytes(s.bytes_from_origin)} from the origin, ${bytes(s.bytes_from_other_zones)} across zones, ` +
               `${bytes(s.bytes_from_peers)} from peers`);
    return parts.join("; ") + ".";
  }

  async function refresh(section) {
    const live = section.querySelector(".live");
    try {
      const resp = await fetch(section.dataset.feed, {credentials: "same-origin", cache: "no-store"});
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const view = await resp.json();
      fill(section.querySelector("table.rollout-nodes"), view.nodes, nodeRow, "no node pulls or holds this artifact");
      fill(section.querySelector("table.rollout-zones"), view.zones, zoneRow, "no zone yet");
      section.querySelector(".summary").textContent = summary(view);
      const swarm = view.swarm;
      section.querySelector(".tracker-swarm").textContent = swarm
        ? `Tracker swarm: ${swarm.complete} seeding, ${swarm.incomplete} downloading, ${swarm.downloaded} ` +
          "completed downloads (every BitTorrent client, node daemons or not)." : "";
      section.querySelector(".updated").textContent = `as of ${utc(view.at)}`;
      section.dataset.done = String(view.summary.done);
      section.classList.remove("stale");
      if (live) live.textContent = "live";
    } catch (err) {
      section.classList.add("stale");
      if (live) live.textContent = `stale (${err.message})`;
    }
  }

  for (const section of document.querySelectorAll("section.rollout[data-feed]")) {
    const tick = async () => {
      await refresh(section);
      setTimeout(tick, POLL_MS);
    };
    setTimeout(tick, POLL_MS);
  }
})();
