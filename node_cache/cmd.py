"""``modelcast node`` (run the daemon, or manage one), ``modelcast pull``, and the node side of ``modelcast runtime``.

Only argument parsing and wiring; the work is in :mod:`node_cache.api` (the daemon),
:mod:`node_cache.admin`, :mod:`node_cache.client` and :mod:`node_cache.runtime`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from modelcast.cmdline import Handler, ca_arg, client_args, secret_file, tls_args
from modelcast.config import ENV_NODE_TOKEN, ENV_TOKEN, ClientConfig, NodeConfig, env_str, TlsFiles, hf_hub_cache, parse_hostport, parse_size
from modelcast.errors import ModelcastError
from modelcast.hf import HfName
from modelcast.reference import Reference

log = logging.getLogger("modelcast.node")


def add_commands(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add this component's subcommands to ``sub``; return their handlers by name."""
    p = sub.add_parser("node", help="run the node cache daemon, or manage one (pin, unpin, ls, status, evict, verify)")
    actions = p.add_subparsers(dest="node_action", metavar="[ACTION]")
    a = actions.add_parser("pin", help="pin an artifact so eviction never removes it")
    a.add_argument("ref")
    a.add_argument("--holder", default="cli", help="who holds the pin (each holder unpins its own)")
    client_args(a, node=True)
    a = actions.add_parser("unpin", help="remove a pin")
    a.add_argument("ref")
    a.add_argument("--holder", help="remove only this holder's pin (default: all pins)")
    client_args(a, node=True)
    a = actions.add_parser("ls", help="list the node's artifacts")
    a.add_argument("--pinned", action="store_true", help="only pinned artifacts")
    a.add_argument("--json", action="store_true")
    client_args(a, node=True)
    a = actions.add_parser("status", help="live table of artifacts, progress and rates")
    a.add_argument("--once", action="store_true", help="print the table once and exit")
    a.add_argument("--interval", type=float, default=0.5)
    client_args(a, node=True)
    a = actions.add_parser("evict", help="delete an artifact from the node now (not pinned, not in use); its "
                                         "Hugging Face layouts go first")
    a.add_argument("ref")
    client_args(a, node=True)
    a = actions.add_parser("verify", help="re-hash artifacts (all, or one) and repair what fails")
    a.add_argument("ref", nargs="?")
    client_args(a, node=True)
    p.add_argument("--registry", action="append", metavar="URL",
                   help="registry URL (env MODELCAST_REGISTRY); replicas: repeat the flag or separate URLs "
                        "with commas, requests fail over from one to the next")
    p.add_argument("--cache", type=Path, help="cache directory (required to run the daemon)")
    p.add_argument("--no-p2p", action="store_true", help="never use peers: fetch everything from the origin "
                                                          "(a baseline for benchmarks)")
    p.add_argument("--no-url-seed", action="store_true",
                   help="a lone node fetches origin bytes with its own range requests, not through libtorrent's "
                        "URL seed (which costs about half the CPU per byte)")
    p.add_argument("--quota", default="0", help="cache quota (e.g. 50G); least recently used artifacts are "
                                                 "evicted to stay under it, 0 = none")
    p.add_argument("--api", default="127.0.0.1:7071", help="HOST:PORT of the local HTTP API")
    p.add_argument("--peer-listen", default="127.0.0.1:6881", help="HOST:PORT for BitTorrent peers")
    p.add_argument("--zone", default="default")
    p.add_argument("--relay-listen", metavar="HOST:PORT",
                   help="where nodes of other zones fetch and push pieces, as the origin directs (default: the "
                        "peer host, any free port)")
    p.add_argument("--relay-url", metavar="URL",
                   help="the URL other nodes reach the relay at, if not http(s)://HOST:PORT of --relay-listen; '' = no "
                        "relay (this node's zone then takes its own copy from the origin)")
    p.add_argument("--token", help="bearer token for reads at the registry (prefer env MODELCAST_TOKEN, which ps "
                                   "cannot read); without it the node reads with its node token")
    p.add_argument("--node-token-file", type=Path,
                   help="file holding the registry's node enrolment token (else env MODELCAST_NODE_TOKEN); a node on "
                        "the registry's own machine needs none")
    p.add_argument("--heartbeat-interval", type=float, default=NodeConfig.heartbeat_interval_s,
                   help="seconds between heartbeats to the tracker")
    p.add_argument("--heartbeat-ttl", type=float, default=NodeConfig.heartbeat_ttl_s,
                   help="seconds after the last heartbeat before the tracker drops this node from every swarm")
    p.add_argument("--upload-limit", default="0", help="upload limit in bytes/s (e.g. 20M), 0 = none")
    p.add_argument("--download-limit", default="0", help="download limit in bytes/s, 0 = none")
    p.add_argument("--webseed-grace", type=float, default=NodeConfig.webseed_grace_s,
                   help="seconds without peer progress before the origin web seed is used")
    p.add_argument("--accel-root", type=Path, default=NodeConfig.accel_root,
                   help="where accelerator detection looks for /dev, /proc and driver files (for tests)")
    tls_args(p, "the local API and the relay listener")
    # Its own dest: the actions' --ca (client_args) would otherwise reset "node --ca FILE ls" to none.
    ca_arg(p, "an https:// registry and other nodes' relay listeners", dest="daemon_ca")

    p = sub.add_parser("pull", help="make an artifact warm on a node and print its local path")
    p.add_argument("ref")
    p.add_argument("--no-wait", action="store_true", help="start the pull and return at once")
    p.add_argument("--hf", nargs="?", const="", metavar="ORG/NAME[@REVISION]",
                   help="also lay it out in the Hugging Face hub cache as this repo (no value: the repo and "
                        "revision it was published from), so huggingface_hub loads it offline by repo id; prints "
                        "the snapshot folder")
    p.add_argument("--hf-cache", type=Path, metavar="DIR",
                   help="the hub cache for --hf (default: HF_HUB_CACHE, else HF_HOME/hub, else "
                        "~/.cache/huggingface/hub)")
    client_args(p, node=True)
    return {"node": cmd_node, "pull": cmd_pull}


def add_runtime_actions(actions: argparse._SubParsersAction) -> dict[str, Handler]:
    """``modelcast runtime resolve|detect``: the node's side of runtime layers (see runtime_builder/cmd.py)."""
    a = actions.add_parser("resolve", help="have a node activate the runtime variant that fits it; prints the "
                                           "environment as export lines")
    a.add_argument("ref", help="NAME:TAG of a runtime index (or a runtime layer)")
    a.add_argument("--dry-run", action="store_true", help="only say which variant fits; pull no layer")
    a.add_argument("--python-abi", help="the workers' Python ABI, e.g. cp311 (default: the daemon's)")
    a.add_argument("--json", action="store_true", help="print the node's whole answer as JSON")
    client_args(a, node=True)
    a = actions.add_parser("detect", help="print this machine's accelerator as the node daemon sees it")
    a.add_argument("--root", type=Path, default=Path("/"), help="filesystem root to look in")
    return {"resolve": cmd_runtime_resolve, "detect": cmd_runtime_detect}


def cmd_node(args) -> int:
    if args.node_action:
        from .admin import run_action

        client = ClientConfig.from_env(node=args.node, ca=args.ca or args.daemon_ca)
        return run_action(args, client.node, ca=client.ca)
    from .api import serve

    if args.cache is None:
        raise ModelcastError("modelcast node needs --cache DIR to run the daemon")
    if args.token:
        log.warning("--token is on the command line, where ps shows it; pass it in env %s instead", ENV_TOKEN)
    client = ClientConfig.from_env(registry=args.registry, token=args.token, ca=args.daemon_ca)
    node_token = secret_file(args.node_token_file, "--node-token-file") or env_str(ENV_NODE_TOKEN)
    api_host, api_port = parse_hostport(args.api, what="--api")
    if not 0 < args.heartbeat_interval < args.heartbeat_ttl:
        raise ModelcastError(f"--heartbeat-interval {args.heartbeat_interval} must be positive and shorter than "
                             f"--heartbeat-ttl {args.heartbeat_ttl}, or the tracker drops this node between "
                             "heartbeats; try an interval of a third of the ttl")
    peer_host, peer_port = parse_hostport(args.peer_listen, what="--peer-listen")
    relay_host, relay_port = (parse_hostport(args.relay_listen, what="--relay-listen") if args.relay_listen
                              else (None, 0))
    serve(NodeConfig(registry=client.registry, cache_dir=args.cache, api_host=api_host, api_port=api_port,
                     peer_host=peer_host, peer_port=peer_port, zone=args.zone, token=client.token, node_token=node_token,
                     upload_limit=parse_size(args.upload_limit), download_limit=parse_size(args.download_limit),
                     webseed_grace_s=args.webseed_grace, quota=parse_size(args.quota), p2p=not args.no_p2p,
                     url_seed=not args.no_url_seed, accel_root=args.accel_root, heartbeat_interval_s=args.heartbeat_interval,
                     heartbeat_ttl_s=args.heartbeat_ttl, relay_host=relay_host, relay_port=relay_port,
                     relay_url=args.relay_url, hf_cache=hf_hub_cache(),
                     tls=TlsFiles.from_args(args.tls_cert, args.tls_key), ca=client.ca))
    return 0


def cmd_pull(args) -> int:
    from .client import pull_with_progress

    client = ClientConfig.from_env(node=args.node, ca=args.ca)
    Reference.parse(args.ref)
    hf = None
    if args.hf is not None:
        if args.no_wait:
            raise ModelcastError("--hf lays out a complete artifact: drop --no-wait")
        if args.hf:
            HfName.parse(args.hf)  # a bad repo id fails here, before any download
        # The cache of the user who runs this (their HF_HUB_CACHE), not the daemon's.
        hf = {"repo": args.hf, "cache": str((args.hf_cache or hf_hub_cache()).absolute())}
    elif args.hf_cache is not None:
        raise ModelcastError("--hf-cache goes with --hf [ORG/NAME]")
    status = asyncio.run(pull_with_progress(client.node, args.ref, wait=not args.no_wait,
                                            progress=sys.stderr.isatty(), hf=hf,
                                            ca=client.ca))
    if hf is not None:
        layout = status["hf"]
        print(f"{args.ref} is {layout['repo_id']} (revision {layout['revision']}"
              + (f", refs/{layout['ref']}" if layout.get("ref") else "") + f") in the Hugging Face cache "
              f"{layout['cache']}", file=sys.stderr)
        print(layout["snapshot"])
        return 0
    print(status.get("path") or status.get("state"))
    return 0


def cmd_runtime_resolve(args) -> int:
    from .runtime import RuntimeClient

    client = ClientConfig.from_env(node=args.node, ca=args.ca)
    Reference.parse(args.ref)

    async def run():
        async with RuntimeClient(client.node, ca=client.ca) as node:
            return await (node.resolve(args.ref) if args.dry_run else node.activate(args.ref, args.python_abi))

    answer = asyncio.run(run())
    print(f"# {args.ref}: variant {answer['variant']} for {answer['node']['description']} ({answer['reason']})",
          file=sys.stderr)
    if args.json or args.dry_run:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        for key, value in sorted(answer["env"].items()):
            print(f"export {key}='{value}'")
    return 0


def cmd_runtime_detect(args) -> int:
    from .runtime import detect_accelerator, this_interpreter

    accel = detect_accelerator(args.root)
    print(json.dumps({**accel.to_json(), "target": this_interpreter().describe()}, indent=2))
    return 0
