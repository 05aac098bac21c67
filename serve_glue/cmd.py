"""``modelcast ray start`` and ``modelcast prewarm``: only argument parsing and wiring."""

from __future__ import annotations

import argparse
import asyncio
import json

from modelcast.cmdline import Handler, ca_arg, client_args
from modelcast.config import ClientConfig, ca_from_args
from modelcast.reference import Reference
from modelcast.units import human_bytes


def add_commands(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add this component's subcommands to ``sub``; return their handlers by name."""
    p = sub.add_parser("ray", help="Ray integration: start a Ray node wired to this host's node daemon")
    actions = p.add_subparsers(dest="ray_action", required=True, metavar="ACTION")
    a = actions.add_parser("start", help="ray start with the modelcast plugin, the daemon URL and node labels; "
                                         "arguments after -- go to ray start")
    a.add_argument("--accelerator", help="accelerator label (default: detected: cpu, cuda, cann)")
    a.add_argument("--zone", help="zone label (default: the node daemon's zone)")
    a.add_argument("--preload", action="append", default=[], metavar="REF",
                   help="warm and pin REF before joining; the node gets a label saying it holds it")
    a.add_argument("--dry-run", action="store_true", help="print the ray start command and environment only")
    a.add_argument("ray_args", nargs=argparse.REMAINDER, help="-- then arguments for ray start")
    client_args(a, node=True)

    p = sub.add_parser("prewarm", help="warm an artifact on many nodes in parallel before a rollout")
    p.add_argument("ref")
    p.add_argument("--nodes", help="comma-separated node daemon URLs (default: every Ray node, through Ray)")
    p.add_argument("--zone", help="only nodes in this zone")
    p.add_argument("--ray-address", help="Ray cluster to use without --nodes (default: auto)")
    p.add_argument("--pin", metavar="HOLDER", help="also pin it on every node for HOLDER")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per node")
    client_args(p, token=True)
    ca_arg(p, "https:// node daemons")
    return {"ray": cmd_ray, "prewarm": cmd_prewarm}


def cmd_ray(args) -> int:
    from .launcher import start

    ray_args = args.ray_args[1:] if args.ray_args[:1] == ["--"] else args.ray_args
    plan = start(args.node, ray_args, accelerator=args.accelerator, zone=args.zone, preloaded=args.preload,
                 dry_run=args.dry_run, ca=args.ca)
    for key, value in sorted(plan.env.items()):
        print(f"export {key}='{value}'")
    print(" ".join(plan.argv))
    return 0


def cmd_prewarm(args) -> int:
    from .prewarm import prewarm_nodes, prewarm_ray

    Reference.parse(args.ref)
    if args.nodes:
        urls = [u.strip() for u in args.nodes.split(",") if u.strip()]
        results = asyncio.run(prewarm_nodes(args.ref, urls, zone=args.zone, pin=args.pin,
                                            token=ClientConfig.from_env(token=args.token).token,
                                            deadline_s=args.timeout, ca=ca_from_args(args.ca)))
    else:
        results = prewarm_ray(args.ref, zone=args.zone, pin=args.pin, address=args.ray_address,
                              deadline_s=args.timeout)
    for r in results:
        where = (f"peers {human_bytes(r.bytes_from_peers)} origin {human_bytes(r.bytes_from_origin)}" if r.ok
                 else r.error)
        print(f"{r.node:40} {'ok' if r.ok else 'FAILED':6} {r.seconds:8.2f} s  {where}")
    print(json.dumps({"ref": args.ref, "nodes": [r.to_json() for r in results]}))
    return 0 if results and all(r.ok for r in results) else 1
