"""``modelcast status REF``: one artifact's rollout across the fleet, as a live table in the terminal.

The same view as the console's rollout (``GET /v1/rollout/{digest}``, tracker/fleet.py):
one row per node pulling or holding the artifact, then sums per zone.  On a terminal the
table is redrawn in place until every node is done (or Ctrl-C); elsewhere (a pipe, a log)
the command waits as quietly and prints the final table, so a script can wait on a
rollout.  A node that failed makes the command fail once the others are done.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from modelcast.errors import PullFailed
from modelcast.units import human_bytes

from .client import RegistryClient

BAR = 20
STATES = {"ready": "complete"}


def _bar(fraction: float) -> str:
    filled = int(fraction * BAR)
    return "[" + "#" * filled + "-" * (BAR - filled) + "]"


def summary_line(view: dict) -> str:
    s = view["summary"]
    head = f"{view.get('name') or '?'} {view['digest'][:19]} ({human_bytes(view['total_bytes'])})"
    if not s["nodes"]:
        return f"{head}: no node reports it yet"
    parts = [f"{s['complete']}/{s['nodes']} nodes complete"]
    if s["downloading"]:
        parts.append(f"{s['downloading']} downloading at {human_bytes(s['rate'])}/s")
    if s["failed"]:
        parts.append(f"{s['failed']} failed")
    parts.append(f"origin {human_bytes(s['bytes_from_origin'])}, other zones {human_bytes(s['bytes_from_other_zones'])}"
                 f", peers {human_bytes(s['bytes_from_peers'])}")
    return f"{head}: " + "; ".join(parts)


def rollout_table(view: dict) -> str:
    """The rollout view as text: a summary line, a row per node, a row per zone."""
    lines = [summary_line(view)]
    # Node ids and zones are whole (up to 64 characters each): a cut id could not be looked for.
    nw = max([4, *(len(r["node"]) for r in view["nodes"])])
    zw = max([4, *(len(z["zone"] or "-") for z in view["zones"])])
    if view["nodes"]:
        lines.append(f"{'NODE':{nw}} {'ZONE':{zw}} {'STATE':11} {'PROGRESS':29} {'RATE':>12} {'PEERS':>10} "
                     f"{'ORIGIN':>10} {'OTHER ZONES':>11}  HEARTBEAT")
        for r in view["nodes"]:
            lines.append(f"{r['node']:{nw}} {r['zone'] or '-':{zw}} {STATES.get(r['state'], r['state']):11} "
                         f"{_bar(r['fraction'])} {r['fraction'] * 100:5.1f}% {human_bytes(r['rate']) + '/s':>12} "
                         f"{human_bytes(r['bytes_from_peers']):>10} {human_bytes(r['bytes_from_origin']):>10} "
                         f"{human_bytes(r['bytes_from_other_zones']):>11}  {r['seconds_since_heartbeat']:.1f}s ago")
    if len(view["zones"]) > 1:
        lines.append(f"{'ZONE':{zw}} {'NODES':>5} {'COMPLETE':>8} {'DOWNLOADING':>11} {'FAILED':>6} {'ORIGIN':>10} "
                     f"{'OTHER ZONES':>11}")
        for z in view["zones"]:
            lines.append(f"{z['zone'] or '-':{zw}} {z['nodes']:>5} {z['complete']:>8} {z['downloading']:>11} "
                         f"{z['failed']:>6} {human_bytes(z['bytes_from_origin']):>10} "
                         f"{human_bytes(z['bytes_from_other_zones']):>11}")
    return "\n".join(lines)


async def watch(registry: str, token: str | None, ref: str, *, once: bool, interval: float,
                out: TextIO | None = None) -> int:
    """Show the rollout of ``ref`` until every reporting node is done (or once); 0 when none failed."""
    out = out or sys.stdout
    live = out.isatty() and not once
    drawn = 0
    async with RegistryClient(registry, token) as reg:
        digest, _ = await reg.resolve(ref)
        while True:
            view = await reg.rollout(digest)
            done = view["summary"]["done"]
            text = rollout_table(view)
            if live:
                if drawn:
                    out.write(f"\x1b[{drawn}A\x1b[J")  # back over the last table, and clear below
                out.write(text + "\n")
                out.flush()
                drawn = text.count("\n") + 1
            elif once or done:
                out.write(text + "\n")
                out.flush()
            if once:
                return 0
            if done:
                failed = view["summary"]["failed"]
                if failed:
                    raise PullFailed(f"{failed} of {view['summary']['nodes']} nodes failed to pull {ref}; "
                                     "see their logs, or `modelcast node status` on them")
                return 0
            await asyncio.sleep(interval)
