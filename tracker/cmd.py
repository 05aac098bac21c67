"""``modelcast tracker`` (run the registry and tracker) and the registry client commands ``ls``, ``inspect``, ``rm``,
``status``.

Only argument parsing and wiring; the work is in :mod:`tracker.app` and :mod:`tracker.client`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from modelcast.cmdline import Handler, ca_arg, client_args, secret_file, tls_args
from modelcast.config import (ENV_DB, ENV_NODE_TOKEN, ENV_REPLICAS, ENV_READ_TOKEN, ENV_TOKEN, ENV_S3_ENDPOINT,
                              ENV_UPSTREAM_TOKEN, ClientConfig, NODE_TOKEN_FILE, TlsFiles, TrackerConfig, ca_from_args,
                              env_str, parse_hostport)
from modelcast.errors import ModelcastError
from modelcast.reference import Reference
from tracker.swarmstore import ENV_SWARM_STORE, validate_swarm_store
from modelcast.units import human_bytes

log = logging.getLogger("modelcast.tracker")


def add_commands(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add this component's subcommands to ``sub``; return their handlers by name."""
    p = sub.add_parser("tracker", help="run the registry and BitTorrent tracker")
    p.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT to serve on")
    p.add_argument("--swarm-store", metavar="URL",
                   help="keep swarms, node liveness and the allow-list in Redis at redis://HOST:PORT/DB, shared by "
                        "every replica (env MODELCAST_SWARM_STORE); default: in this process")
    p.add_argument("--data", type=Path, help="directory for the registry's SQLite database (without --db)")
    p.add_argument("--db", metavar="URL", help="keep the registry's state in PostgreSQL at postgresql://USER@HOST:PORT/DB "
                                             "instead of SQLite in --data (env MODELCAST_DB; give a password "
                                             "through MODELCAST_DB, PGPASSWORD or ~/.pgpass, not here)")
    p.add_argument("--token", help="bearer token required for writes; prefer env MODELCAST_TOKEN or --token-file, "
                                   "which `ps` cannot read")
    p.add_argument("--token-file", type=Path, help="file holding the write token (one line)")
    p.add_argument("--read-token", help="bearer token required for reads (resolve, manifest, torrent, list, web seed); "
                                        "the write token reads too; announce and scrape stay open "
                                        "(env MODELCAST_READ_TOKEN)")
    p.add_argument("--node-token", help="token a node must present at its first heartbeat to enrol (bind its node "
                                        "id to its key); prefer env MODELCAST_NODE_TOKEN or --node-token-file, "
                                        "which `ps` cannot read.  Without one the registry makes one in --data "
                                        "(node-token, mode 0600) and nodes on this machine enrol without it")
    p.add_argument("--node-token-file", type=Path, help="file holding the node enrolment token (one line)")
    p.add_argument("--upstream", metavar="URL", help="parent registry: references unknown here are pulled through "
                                                     "from it and kept (this registry serves its zone's swarm)")
    p.add_argument("--upstream-token", help="bearer token for reads at --upstream (env MODELCAST_UPSTREAM_TOKEN)")
    p.add_argument("--upstream-tag-ttl", type=float, default=TrackerConfig.upstream_tag_ttl_s,
                   help="seconds a tag pulled through from --upstream is served before it is checked there again")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL for s3:// origins (env MODELCAST_S3_ENDPOINT)")
    p.add_argument("--allow-s3-endpoint", action="append", default=[], metavar="URL",
                   help="another S3 endpoint a publish may name (repeatable); any other is refused")
    p.add_argument("--presign-ttl", type=int, default=TrackerConfig.presign_ttl_s, metavar="SECONDS",
                   help="S3 origins: nodes get presigned URLs valid this long for the ranges the first-copy gate "
                        "admits, instead of bytes through the registry; 0 streams every byte through the registry")
    p.add_argument("--announce-interval", type=int, default=TrackerConfig.announce_interval_s)
    p.add_argument("--peer-ttl", type=float, default=TrackerConfig.peer_ttl_s,
                   help="seconds a peer without node heartbeats stays listed after its last announce")
    p.add_argument("--max-heartbeat-ttl", type=float, default=TrackerConfig.heartbeat_ttl_max_s,
                   help="cap on the ttl a node's heartbeat may ask for: a dead node is gone within this")
    p.add_argument("--udp-listen", metavar="HOST:PORT", help="also serve the BEP 15 UDP tracker on HOST:PORT")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                   help="a proxy whose announces' ip= is believed (repeatable); from anyone else ip= is ignored and "
                        "the peer is listed at the address its request came from")
    p.add_argument("--origin-seed", action="append", default=[], metavar="ADDR",
                   help="an address allowed to announce role=origin (repeatable); nobody else may claim it")
    p.add_argument("--zone-gateways", type=int, default=TrackerConfig.zone_gateways, metavar="N",
                   help="per swarm, only each zone's first N peers (while their zone has others) are handed peers of "
                        "other zones; 0, the default: strict zones for node daemons, pieces cross zones through the "
                        "origin's relays; -1: no limit")
    p.add_argument("--replica", action="append", default=[], metavar="URL",
                   help="public base URL of a replica of this registry, this one included (repeatable; env "
                        "MODELCAST_REPLICAS, comma-separated): served torrents list every replica's /announce in "
                        "their announce-list, so BitTorrent clients fail over between them")
    tls_args(p, "the registry, web seed and tracker (one port)")
    ca_arg(p, "--upstream")

    p = sub.add_parser("ls", help="list artifacts in the registry")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    client_args(p, registry=True, token=True)

    p = sub.add_parser("inspect", help="show an artifact's manifest")
    p.add_argument("ref")
    client_args(p, registry=True, token=True)

    p = sub.add_parser("rm", help="delete a tag (NAME:TAG) or an artifact (DIGEST or NAME@DIGEST) from the registry; "
                                  "origin blobs are kept (other artifacts may share them)")
    p.add_argument("ref")
    p.add_argument("--force", action="store_true", help="delete an artifact even while tags point at it (they go too)")
    client_args(p, registry=True, token=True)

    p = sub.add_parser("status", help="live table of one artifact's rollout across the fleet, as the registry "
                                      "hears it from the nodes' heartbeats; waits until every node is done")
    p.add_argument("ref", help="NAME:TAG, NAME@DIGEST or DIGEST")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    client_args(p, registry=True, token=True)

    p = sub.add_parser("node-token", help="print the node enrolment token of the registry with data dir --data "
                                          "(made, mode 0600, if it has none yet); give it to nodes of other "
                                          "machines in env MODELCAST_NODE_TOKEN or --node-token-file")
    p.add_argument("--data", type=Path, required=True, help="the registry's --data directory")
    return {"tracker": cmd_tracker, "node-token": cmd_node_token, "ls": cmd_ls, "inspect": cmd_inspect, "rm": cmd_rm, "status": cmd_status}


def node_token_of(data_dir: Path) -> str:
    """The node token kept in a registry's data dir, made (random, mode 0600) if it has none."""
    path = Path(data_dir) / NODE_TOKEN_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return secret_file(path, "node token file")
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    except OSError as exc:
        raise ModelcastError(f"cannot keep the node token in {path}: {exc.strerror or exc}") from exc
    return secret_file(path, "node token file")


def cmd_node_token(args) -> int:
    print(node_token_of(args.data))
    return 0


def cmd_tracker(args) -> int:
    from .app import serve

    host, port = parse_hostport(args.listen, what="--listen")
    udp_host, udp_port = parse_hostport(args.udp_listen, what="--udp-listen") if args.udp_listen else (None, None)
    for flag, env in (("token", ENV_TOKEN), ("read_token", ENV_READ_TOKEN), ("node_token", ENV_NODE_TOKEN)):
        if getattr(args, flag):
            log.warning("--%s is on the command line, where ps shows it to every user of this machine; "
                        "pass it in env %s%s instead", flag.replace("_", "-"), env,
                        "" if flag == "read_token" else f" or --{flag.replace('_', '-')}-file")
    token = args.token or secret_file(args.token_file, "--token-file") or env_str(ENV_TOKEN)
    node_token = (args.node_token or secret_file(args.node_token_file, "--node-token-file")
                  or env_str(ENV_NODE_TOKEN))
    loopback_free = node_token is None
    if node_token is None:
        node_token = node_token_of(args.data) if args.data is not None else secrets.token_urlsafe(32)
    db = args.db or env_str(ENV_DB)
    if args.data is None and not db:
        raise ModelcastError("modelcast tracker needs --data DIR (SQLite) or --db postgresql://USER@HOST:PORT/DB "
                             f"(or env {ENV_DB})")
    if args.db and urlsplit(args.db).password:
        log.warning("the database password in --db is on the command line, where ps shows it; "
                    "pass the URL in env %s, or the password in PGPASSWORD or ~/.pgpass", ENV_DB)
    replicas = [u for arg in (args.replica or [env_str(ENV_REPLICAS) or ""]) for u in arg.split(",")]
    replicas = tuple(dict.fromkeys(u.strip().rstrip("/") for u in replicas if u.strip()))
    for url in replicas:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ModelcastError(f"--replica {url!r} is not an http(s)://HOST:PORT URL")
    swarm_store = validate_swarm_store(args.swarm_store or env_str(ENV_SWARM_STORE))
    serve(TrackerConfig(host=host, port=port, replicas=replicas, swarm_store=swarm_store,
                        data_dir=args.data or TrackerConfig.data_dir, db=db, token=token,
                        node_token=node_token, node_token_loopback_free=loopback_free,
                        read_token=args.read_token or env_str(ENV_READ_TOKEN), upstream=args.upstream,
                        upstream_token=args.upstream_token or env_str(ENV_UPSTREAM_TOKEN),
                        upstream_tag_ttl_s=args.upstream_tag_ttl,
                        s3_endpoint=args.s3_endpoint or env_str(ENV_S3_ENDPOINT),
                        announce_interval_s=args.announce_interval, peer_ttl_s=args.peer_ttl,
                        heartbeat_ttl_max_s=args.max_heartbeat_ttl, zone_gateways=args.zone_gateways,
                        trusted_proxies=tuple(args.trusted_proxy), origin_seeds=tuple(args.origin_seed),
                        allowed_s3_endpoints=tuple(args.allow_s3_endpoint), presign_ttl_s=max(0, args.presign_ttl),
                        udp_host=udp_host, udp_port=udp_port,
                        tls=TlsFiles.from_args(args.tls_cert, args.tls_key), ca=ca_from_args(args.ca)))
    return 0


def cmd_ls(args) -> int:
    from .client import RegistryClient

    client = ClientConfig.from_env(registry=args.registry, token=args.token, ca=args.ca)

    async def run():
        async with RegistryClient(client.registry, client.token, ca=client.ca) as reg:
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
        print(f"{a['name']:30} {tags:16} {human_bytes(a['total_size']):>10}  {a['digest'][:19]}  {a.get('created', '')}")
    return 0


def cmd_inspect(args) -> int:
    from .client import RegistryClient

    client = ClientConfig.from_env(registry=args.registry, token=args.token, ca=args.ca)

    async def run():
        async with RegistryClient(client.registry, client.token, ca=client.ca) as reg:
            return await reg.resolve(args.ref)

    digest, manifest = asyncio.run(run())
    print(json.dumps({"digest": digest, "manifest": manifest.body()}, indent=2, sort_keys=True))
    return 0


def cmd_rm(args) -> int:
    from .client import RegistryClient

    client = ClientConfig.from_env(registry=args.registry, token=args.token, ca=args.ca)
    ref = Reference.parse(args.ref)

    async def run():
        async with RegistryClient(client.registry, client.token, ca=client.ca) as reg:
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


def cmd_status(args) -> int:
    from .status import watch

    client = ClientConfig.from_env(registry=args.registry, token=args.token)
    Reference.parse(args.ref)
    if not args.interval > 0:
        raise ModelcastError(f"--interval {args.interval} must be a positive number of seconds")
    return asyncio.run(watch(client.registry, client.token, args.ref, once=args.once, interval=args.interval))
