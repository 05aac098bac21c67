"""``modelcast publish``: only argument parsing and wiring; the work is in :mod:`distributor.publish`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelcast.cmdline import Handler, client_args, parse_annotations
from modelcast.config import ENV_S3_ENDPOINT, TORRENT_FORMATS, ClientConfig, PublishConfig, env_str
from modelcast.errors import ModelcastError
from modelcast.reference import Reference


def add_commands(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add this component's subcommands to ``sub``; return their handlers by name."""
    p = sub.add_parser("publish", help="publish a model directory as an artifact")
    p.add_argument("path", type=Path)
    p.add_argument("ref", help="NAME:TAG")
    p.add_argument("--origin", required=True, help="file:///DIR or s3://BUCKET/PREFIX")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (env MODELCAST_S3_ENDPOINT)")
    p.add_argument("--kind", default="model", choices=["model", "runtime"])
    p.add_argument("--torrent", default=PublishConfig.torrent_format, choices=TORRENT_FORMATS,
                   help="torrent format: v1 (default: SHA-1 pieces, every BitTorrent client reads it, and each node "
                        "hashes a byte once), or hybrid v1+v2 (SHA-256 merkle trees too, for v2 clients; every node "
                        "then hashes each byte twice, and aria2 < 1.37 cannot join)")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--hf-repo", metavar="ORG/NAME[@REVISION]",
                   help="record this Hugging Face repo (and revision) in the manifest, for `modelcast pull --hf`; "
                        "a snapshot folder of a hub cache (…/models--ORG--NAME/snapshots/<commit>) is recognised "
                        "without it")
    client_args(p, registry=True, token=True)
    return {"publish": cmd_publish}


def cmd_publish(args) -> int:
    from .hf_snapshot import hf_source
    from .publish import publish_sync

    client = ClientConfig.from_env(registry=args.registry, token=args.token, ca=args.ca)
    ref = Reference.parse(args.ref)
    if ref.tag is None:
        raise ModelcastError(f"publish needs NAME:TAG, got {args.ref!r}")
    cfg = PublishConfig(registry=client.registry, origin=args.origin,
                        s3_endpoint=args.s3_endpoint or env_str(ENV_S3_ENDPOINT), token=client.token,
                        torrent_format=args.torrent, ca=client.ca)
    hf = hf_source(args.path, args.hf_repo)
    if hf is not None:
        print(f"publishing {args.path} as Hugging Face repo {hf.repo_id}"
              + (f" at {hf.commit}" if hf.commit else "") + (f" (refs/{hf.ref})" if hf.ref else ""), file=sys.stderr)
    annotations = {**(hf.annotations() if hf else {}), **parse_annotations(args.annotation)}
    result = publish_sync(args.path, ref, cfg, kind=args.kind, annotations=annotations,
                          progress=sys.stderr.isatty(), link_root=hf.repo_dir if hf else None)
    print(result.digest)
    return 0
