"""The ``modelcast`` command.  It parses arguments and wires objects together; nothing more."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from . import __version__
from .config import (ClientConfig, NodeConfig, PublishConfig, RuntimeBuildConfig, TrackerConfig, ENV_S3_ENDPOINT,
                     env_str, parse_hostport, parse_size)
from .config import ENV_READ_TOKEN, ENV_UPSTREAM_TOKEN
from .errors import ModelcastError
from .reference import Reference


def _client_args(p: argparse.ArgumentParser, *, registry: bool = False, node: bool = False, token: bool = False) -> None:
    if registry:
        p.add_argument("--registry", help="registry URL (env MODELCAST_REGISTRY)")
    if node:
        p.add_argument("--node", help="node daemon URL (env MODELCAST_NODE)")
    if token:
        p.add_argument("--token", help="bearer token for writes (env MODELCAST_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelcast", description="Publish models once, pull them everywhere over a private swarm.")
    parser.add_argument("--version", action="version", version=f"modelcast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tracker", help="run the registry and BitTorrent tracker")
    p.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT to serve on")
    p.add_argument("--data", required=True, type=Path, help="directory for the registry database")
    p.add_argument("--token", help="bearer token required for writes")
    p.add_argument("--read-token", help="bearer token required for reads (resolve, manifest, torrent, list, web seed); "
                                        "the write token reads too; announce and scrape stay open "
                                        "(env MODELCAST_READ_TOKEN)")
    p.add_argument("--upstream", metavar="URL", help="parent registry: references unknown here are pulled through "
                                                     "from it and kept (this registry serves its zone's swarm)")
    p.add_argument("--upstream-token", help="bearer token for reads at --upstream (env MODELCAST_UPSTREAM_TOKEN)")
    p.add_argument("--upstream-tag-ttl", type=float, default=TrackerConfig.upstream_tag_ttl_s,
                   help="seconds a tag pulled through from --upstream is served before it is checked there again")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL for s3:// origins (env MODELCAST_S3_ENDPOINT)")
    p.add_argument("--announce-interval", type=int, default=TrackerConfig.announce_interval_s)
    p.add_argument("--peer-ttl", type=float, default=TrackerConfig.peer_ttl_s,
                   help="seconds a peer without node heartbeats stays listed after its last announce")
    p.add_argument("--max-heartbeat-ttl", type=float, default=TrackerConfig.heartbeat_ttl_max_s,
                   help="cap on the ttl a node's heartbeat may ask for: a dead node is gone within this")
    p.add_argument("--udp-listen", metavar="HOST:PORT", help="also serve the BEP 15 UDP tracker on HOST:PORT")
    p.add_argument("--zone-gateways", type=int, default=TrackerConfig.zone_gateways, metavar="N",
                   help="per swarm, only each zone's first N peers (while their zone has others) are handed peers of "
                        "other zones; 0, the default: strict zones for node daemons, pieces cross zones through the "
                        "origin's relays; -1: no limit")

    p = sub.add_parser("publish", help="publish a model directory as an artifact")
    p.add_argument("path", type=Path)
    p.add_argument("ref", help="NAME:TAG")
    p.add_argument("--origin", required=True, help="file:///DIR or s3://BUCKET/PREFIX")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (env MODELCAST_S3_ENDPOINT)")
    p.add_argument("--kind", default="model", choices=["model", "runtime"])
    p.add_argument("--torrent", default="hybrid", choices=["hybrid", "v1"],
                   help="torrent format: hybrid v1+v2 (default), or v1 only for clients that cannot read v2 "
                        "(aria2 < 1.37)")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE")
    _client_args(p, registry=True, token=True)

    p = sub.add_parser("node", help="run the node cache daemon, or manage one (pin, unpin, ls, status, verify)")
    actions = p.add_subparsers(dest="node_action", metavar="[ACTION]")
    a = actions.add_parser("pin", help="pin an artifact so eviction never removes it")
    a.add_argument("ref")
    a.add_argument("--holder", default="cli", help="who holds the pin (each holder unpins its own)")
    _client_args(a, node=True)
    a = actions.add_parser("unpin", help="remove a pin")
    a.add_argument("ref")
    a.add_argument("--holder", help="remove only this holder's pin (default: all pins)")
    _client_args(a, node=True)
    a = actions.add_parser("ls", help="list the node's artifacts")
    a.add_argument("--pinned", action="store_true", help="only pinned artifacts")
    a.add_argument("--json", action="store_true")
    _client_args(a, node=True)
    a = actions.add_parser("status", help="live table of artifacts, progress and rates")
    a.add_argument("--once", action="store_true", help="print the table once and exit")
    a.add_argument("--interval", type=float, default=0.5)
    _client_args(a, node=True)
    a = actions.add_parser("verify", help="re-hash artifacts (all, or one) and repair what fails")
    a.add_argument("ref", nargs="?")
    _client_args(a, node=True)
    p.add_argument("--registry", help="registry URL (env MODELCAST_REGISTRY)")
    p.add_argument("--cache", type=Path, help="cache directory (required to run the daemon)")
    p.add_argument("--no-p2p", action="store_true", help="never use peers: fetch everything from the origin "
                                                          "(a baseline for benchmarks)")
    p.add_argument("--quota", default="0", help="cache quota (e.g. 50G); least recently used artifacts are "
                                                 "evicted to stay under it, 0 = none")
    p.add_argument("--api", default="127.0.0.1:7071", help="HOST:PORT of the local HTTP API")
    p.add_argument("--peer-listen", default="127.0.0.1:6881", help="HOST:PORT for BitTorrent peers")
    p.add_argument("--zone", default="default")
    p.add_argument("--relay-listen", metavar="HOST:PORT",
                   help="where nodes of other zones fetch and push pieces, as the origin directs (default: the "
                        "peer host, any free port)")
    p.add_argument("--relay-url", metavar="URL",
                   help="the URL other nodes reach the relay at, if not http://HOST:PORT of --relay-listen; '' = no "
                        "relay (this node's zone then takes its own copy from the origin)")
    p.add_argument("--token", help="bearer token for the registry (env MODELCAST_TOKEN); without it a registry "
                                   "with a token refuses this node's heartbeats")
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

    p = sub.add_parser("runtime", help="accelerator runtime layers: build, resolve on a node, export as OCI")
    actions = p.add_subparsers(dest="runtime_action", required=True, metavar="ACTION")
    a = actions.add_parser("build", help="build every variant of a runtime spec (TOML) and publish the layers "
                                         "and their index; the last stdout line is the index digest")
    a.add_argument("spec", type=Path)
    a.add_argument("--origin", required=True, help="file:///DIR or s3://BUCKET/PREFIX")
    a.add_argument("--s3-endpoint", help="S3 endpoint URL (env MODELCAST_S3_ENDPOINT)")
    a.add_argument("--wheelhouse", type=Path, help="install only from this directory of wheels (no network)")
    a.add_argument("--tag", help="tag of the index and layers (default: the spec's version)")
    a.add_argument("--variant", action="append", metavar="ID", help="build only this variant (cpu, cuda12, ...)")
    a.add_argument("--out", type=Path, help="keep the layer artifacts in this directory")
    _client_args(a, registry=True, token=True)
    a = actions.add_parser("resolve", help="have a node activate the runtime variant that fits it; prints the "
                                           "environment as export lines")
    a.add_argument("ref", help="NAME:TAG of a runtime index (or a runtime layer)")
    a.add_argument("--dry-run", action="store_true", help="only say which variant fits; pull no layer")
    a.add_argument("--python-abi", help="the workers' Python ABI, e.g. cp311 (default: the daemon's)")
    a.add_argument("--json", action="store_true", help="print the node's whole answer as JSON")
    _client_args(a, node=True)
    a = actions.add_parser("export", help="write a runtime's variants as an OCI image layout (skopeo reads it)")
    a.add_argument("ref", help="NAME:TAG of a runtime index")
    a.add_argument("--oci", required=True, type=Path, help="directory of the OCI image layout")
    _client_args(a, registry=True, token=True)
    a = actions.add_parser("detect", help="print this machine's accelerator as the node daemon sees it")
    a.add_argument("--root", type=Path, default=Path("/"), help="filesystem root to look in")

    p = sub.add_parser("pull", help="make an artifact warm on a node and print its local path")
    p.add_argument("ref")
    p.add_argument("--no-wait", action="store_true", help="start the pull and return at once")
    _client_args(p, node=True)

    p = sub.add_parser("ls", help="list artifacts in the registry")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    _client_args(p, registry=True, token=True)

    p = sub.add_parser("inspect", help="show an artifact's manifest")
    p.add_argument("ref")
    _client_args(p, registry=True, token=True)

    p = sub.add_parser("rm", help="delete a tag (NAME:TAG) or an artifact (DIGEST or NAME@DIGEST) from the registry; "
                                  "origin blobs are kept (other artifacts may share them)")
    p.add_argument("ref")
    p.add_argument("--force", action="store_true", help="delete an artifact even while tags point at it (they go too)")
    _client_args(p, registry=True, token=True)

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
    _client_args(a, node=True)

    p = sub.add_parser("prewarm", help="warm an artifact on many nodes in parallel before a rollout")
    p.add_argument("ref")
    p.add_argument("--nodes", help="comma-separated node daemon URLs (default: every Ray node, through Ray)")
    p.add_argument("--zone", help="only nodes in this zone")
    p.add_argument("--ray-address", help="Ray cluster to use without --nodes (default: auto)")
    p.add_argument("--pin", metavar="HOLDER", help="also pin it on every node for HOLDER")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per node")
    _client_args(p, token=True)
    return parser


def _parse_annotations(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ModelcastError(f"annotation {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def cmd_tracker(args) -> int:
    from tracker.server import serve

    host, port = parse_hostport(args.listen, what="--listen")
    udp_host, udp_port = parse_hostport(args.udp_listen, what="--udp-listen") if args.udp_listen else (None, None)
    serve(TrackerConfig(host=host, port=port, data_dir=args.data, token=args.token,
                        read_token=args.read_token or env_str(ENV_READ_TOKEN), upstream=args.upstream,
                        upstream_token=args.upstream_token or env_str(ENV_UPSTREAM_TOKEN),
                        upstream_tag_ttl_s=args.upstream_tag_ttl,
                        s3_endpoint=args.s3_endpoint or env_str(ENV_S3_ENDPOINT),
                        announce_interval_s=args.announce_interval, peer_ttl_s=args.peer_ttl,
                        heartbeat_ttl_max_s=args.max_heartbeat_ttl, zone_gateways=args.zone_gateways,
                        udp_host=udp_host, udp_port=udp_port))
    return 0


def cmd_publish(args) -> int:
    from distributor.publish import publish_sync

    client = ClientConfig.from_env(registry=args.registry, token=args.token)
    ref = Reference.parse(args.ref)
    if ref.tag is None:
        raise ModelcastError(f"publish needs NAME:TAG, got {args.ref!r}")
    cfg = PublishConfig(registry=client.registry, origin=args.origin,
                        s3_endpoint=args.s3_endpoint or env_str(ENV_S3_ENDPOINT), token=client.token,
                        torrent_format=args.torrent)
    result = publish_sync(args.path, ref, cfg, kind=args.kind, annotations=_parse_annotations(args.annotation),
                          progress=sys.stderr.isatty())
    print(result.digest)
    return 0


def cmd_node(args) -> int:
    if args.node_action:
        from node_cache.admin import run_action

        return run_action(args, ClientConfig.from_env(node=args.node).node)
    from node_cache.daemon import serve

    if args.cache is None:
        raise ModelcastError("modelcast node needs --cache DIR to run the daemon")
    client = ClientConfig.from_env(registry=args.registry, token=args.token)
    api_host, api_port = parse_hostport(args.api, what="--api")
    if not 0 < args.heartbeat_interval < args.heartbeat_ttl:
        raise ModelcastError(f"--heartbeat-interval {args.heartbeat_interval} must be positive and shorter than "
                             f"--heartbeat-ttl {args.heartbeat_ttl}, or the tracker drops this node between "
                             "heartbeats; try an interval of a third of the ttl")
    peer_host, peer_port = parse_hostport(args.peer_listen, what="--peer-listen")
    relay_host, relay_port = (parse_hostport(args.relay_listen, what="--relay-listen") if args.relay_listen
                              else (None, 0))
    serve(NodeConfig(registry=client.registry, cache_dir=args.cache, api_host=api_host, api_port=api_port,
                     peer_host=peer_host, peer_port=peer_port, zone=args.zone, token=client.token,
                     upload_limit=parse_size(args.upload_limit), download_limit=parse_size(args.download_limit),
                     webseed_grace_s=args.webseed_grace, quota=parse_size(args.quota), p2p=not args.no_p2p,
                     accel_root=args.accel_root, heartbeat_interval_s=args.heartbeat_interval,
                     heartbeat_ttl_s=args.heartbeat_ttl, relay_host=relay_host, relay_port=relay_port,
                     relay_url=args.relay_url))
    return 0


def cmd_runtime(args) -> int:
    if args.runtime_action == "build":
        from runtime_builder.build import build_and_publish
        from runtime_builder.spec import RuntimeSpec

        client = ClientConfig.from_env(registry=args.registry, token=args.token)
        spec = RuntimeSpec.load(args.spec)
        cfg = RuntimeBuildConfig.from_env(registry=client.registry, origin=args.origin, s3_endpoint=args.s3_endpoint,
                                          token=client.token, wheelhouse=args.wheelhouse, out_dir=args.out)
        result = asyncio.run(build_and_publish(spec, cfg, tag=args.tag, only=args.variant,
                                               report=lambda line: print(line, flush=True)))
        print(result.digest)
        return 0
    if args.runtime_action == "resolve":
        from node_cache.runtime import RuntimeClient

        client = ClientConfig.from_env(node=args.node)
        Reference.parse(args.ref)

        async def run():
            async with RuntimeClient(client.node) as node:
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
    if args.runtime_action == "export":
        from runtime_builder.oci import export_oci

        client = ClientConfig.from_env(registry=args.registry, token=args.token)
        for name, digest in asyncio.run(export_oci(args.ref, client.registry, client.token, args.oci)):
            print(f"oci:{args.oci}:{name} {digest}")
        return 0
    from node_cache.runtime import detect_accelerator, this_interpreter

    accel = detect_accelerator(args.root)
    print(json.dumps({**accel.to_json(), "target": this_interpreter().describe()}, indent=2))
    return 0


def cmd_pull(args) -> int:
    from node_cache.client import pull_with_progress

    client = ClientConfig.from_env(node=args.node)
    Reference.parse(args.ref)
    status = asyncio.run(pull_with_progress(client.node, args.ref, wait=not args.no_wait, progress=sys.stderr.isatty()))
    print(status.get("path") or status.get("state"))
    return 0


def cmd_ls(args) -> int:
    from tracker.client import RegistryClient

    client = ClientConfig.from_env(registry=args.registry, token=args.token)

    async def run():
        async with RegistryClient(client.registry, client.token) as reg:
            items, after = [], None
            while True:
                page = await reg.list_artifacts(name=args.name, limit=200, after=after)
                items.extend(page.get("artifacts", []))
                after = page.get("next")
                if not after:
                    return items

    items = asyncio.run(run())
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    print(f"{'NAME':30} {'TAGS':16} {'SIZE':>10}  {'DIGEST':19}  CREATED")
    for a in items:
        tags = ",".join(a.get("tags") or []) or "-"
        print(f"{a['name']:30} {tags:16} {_human(a['total_size']):>10}  {a['digest'][:19]}  {a.get('created', '')}")
    return 0


def cmd_inspect(args) -> int:
    from tracker.client import RegistryClient

    client = ClientConfig.from_env(registry=args.registry, token=args.token)

    async def run():
        async with RegistryClient(client.registry, client.token) as reg:
            return await reg.resolve(args.ref)

    digest, manifest = asyncio.run(run())
    print(json.dumps({"digest": digest, "manifest": manifest.body()}, indent=2, sort_keys=True))
    return 0


def cmd_rm(args) -> int:
    from tracker.client import RegistryClient

    client = ClientConfig.from_env(registry=args.registry, token=args.token)
    ref = Reference.parse(args.ref)

    async def run():
        async with RegistryClient(client.registry, client.token) as reg:
            if ref.tag is not None:
                return await reg.delete_tag(ref.name, ref.tag)
            return await reg.delete_artifact(ref.digest, force=args.force, name=ref.name)

    answer = asyncio.run(run())
    if ref.tag is not None:
        print(f"untagged {ref} (was {answer['digest']})")
    else:
        removed = answer.get("tags_removed") or []
        print(f"deleted {answer['name']}@{answer['digest']}"
              + (f" and its tags {', '.join(removed)}" if removed else ""))
    return 0


def cmd_ray(args) -> int:
    from serve_glue.launcher import start

    ray_args = args.ray_args[1:] if args.ray_args[:1] == ["--"] else args.ray_args
    plan = start(args.node, ray_args, accelerator=args.accelerator, zone=args.zone, preloaded=args.preload,
                 dry_run=args.dry_run)
    for key, value in sorted(plan.env.items()):
        print(f"export {key}='{value}'")
    print(" ".join(plan.argv))
    return 0


def cmd_prewarm(args) -> int:
    from serve_glue.prewarm import prewarm_nodes, prewarm_ray

    Reference.parse(args.ref)
    if args.nodes:
        urls = [u.strip() for u in args.nodes.split(",") if u.strip()]
        results = asyncio.run(prewarm_nodes(args.ref, urls, zone=args.zone, pin=args.pin,
                                            token=ClientConfig.from_env(token=args.token).token,
                                            deadline_s=args.timeout))
    else:
        results = prewarm_ray(args.ref, zone=args.zone, pin=args.pin, address=args.ray_address,
                              deadline_s=args.timeout)
    for r in results:
        where = f"peers {_human(r.bytes_from_peers)} origin {_human(r.bytes_from_origin)}" if r.ok else r.error
        print(f"{r.node:40} {'ok' if r.ok else 'FAILED':6} {r.seconds:8.2f} s  {where}")
    print(json.dumps({"ref": args.ref, "nodes": [r.to_json() for r in results]}))
    return 0 if results and all(r.ok for r in results) else 1


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


COMMANDS = {"tracker": cmd_tracker, "publish": cmd_publish, "node": cmd_node, "runtime": cmd_runtime, "pull": cmd_pull,
            "ls": cmd_ls, "inspect": cmd_inspect, "ray": cmd_ray, "prewarm": cmd_prewarm, "rm": cmd_rm}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ModelcastError as exc:
        # One line, naming what was asked; no traceback for errors a user can act on.
        print(f"modelcast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
