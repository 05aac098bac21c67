"""``modelcast node pin|unpin|ls|status|evict|verify``: talk to a running node daemon."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from modelcast.errors import ArtifactNotFound
from modelcast.units import human_bytes
from modelcast.reference import Reference

from .client import NodeClient


async def _digest_of(node: NodeClient, ref: str) -> str:
    """The digest a reference names, as the node resolves it."""
    return ref if Reference.parse(ref).digest and not Reference.parse(ref).name else await node.resolve(ref)


def table(listing: dict, pinned_only: bool = False) -> str:
    rows = [f"{'NAME':28} {'DIGEST':19} {'STATE':11} {'SIZE':>10} {'DONE':>6} {'DOWN/s':>10} {'UP/s':>10} "
            f"{'PEERS':>5} {'ORIGIN':>10}  PINNED BY"]
    for a in listing["artifacts"]:
        if pinned_only and not a["pinned_by"]:
            continue
        done = a["done_bytes"] / max(1, a["total_bytes"]) * 100
        rows.append(f"{a['name'][:28]:28} {a['digest'][:19]} {a['state']:11} {human_bytes(a['total_bytes']):>10} "
                    f"{done:5.1f}% {human_bytes(a['download_rate']):>10} {human_bytes(a['upload_rate']):>10} "
                    f"{a['peers']:>5} {human_bytes(a['bytes_from_origin']):>10}  {','.join(a['pinned_by']) or '-'}")
    quota = listing.get("quota_bytes") or 0
    rows.append(f"node {listing.get('node_id', '?')} zone {listing.get('zone', '?')}: "
                f"{human_bytes(listing.get('used_bytes', 0))} used"
                + (f" (of which {human_bytes(listing['unpacked_bytes'])} unpacked runtime layers)"
                   if listing.get("unpacked_bytes") else "")
                + (f" of {human_bytes(quota)} quota" if quota else " (no quota)"))
    return "\n".join(rows)


async def _run(args, node_url: str, ca: Path | None) -> int:
    async with NodeClient(node_url, ca=ca) as node:
        if args.node_action == "pin":
            answer = await node.pin(args.ref, holder=args.holder)
            print(f"{answer['digest']} pinned by {', '.join(answer['pinned_by'])}")
        elif args.node_action == "unpin":
            digest = await _digest_of(node, args.ref)
            answer = await node.unpin(digest, holder=args.holder)
            print(f"{digest} pinned by {', '.join(answer['pinned_by']) or 'nobody'}")
        elif args.node_action == "ls":
            listing = await node.listing()
            if args.json:
                print(json.dumps(listing, indent=2))
            else:
                print(table(listing, pinned_only=args.pinned))
        elif args.node_action == "status":
            live = sys.stdout.isatty() and not args.once
            drawn = 0
            while True:
                text = table(await node.listing())
                if live:
                    if drawn:
                        sys.stdout.write(f"\x1b[{drawn}A\x1b[J")
                    sys.stdout.write(text + "\n")
                    sys.stdout.flush()
                    drawn = text.count("\n") + 1
                    await asyncio.sleep(args.interval)
                else:
                    print(text)
                    return 0
        elif args.node_action == "evict":
            digest = await _digest_of(node, args.ref)
            answer = await node.evict(digest)
            for layout in answer.get("hf_removed", []):
                print(f"removed Hugging Face layout {layout['repo_id']}@{layout['revision']} at {layout['snapshot']}")
            print(f"{digest} evicted")
        elif args.node_action == "verify":
            digest = await _digest_of(node, args.ref) if args.ref else None
            answer = await node.verify(digest)
            results = answer.get("results", [answer])
            bad = [r for r in results if r.get("ok") is False]
            for r in results:
                state = {True: "ok", False: f"CORRUPT, repairing: {r.get('problem')}", None: "busy, skipped"}[r.get("ok")]
                print(f"{r['digest']}  {state}")
            return 1 if bad else 0
    return 0


def run_action(args, node_url: str, ca: Path | None = None) -> int:
    try:
        return asyncio.run(_run(args, node_url, ca))
    except KeyboardInterrupt:
        return 130
    except ArtifactNotFound:
        raise
