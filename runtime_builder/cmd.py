"""``modelcast runtime build|export``: only argument parsing and wiring; the work is in :mod:`runtime_builder.build`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from modelcast.cmdline import Handler, client_args
from modelcast.config import ClientConfig, RuntimeBuildConfig


def add_runtime_actions(actions: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add the builder's actions of ``modelcast runtime`` to ``actions``; return their handlers by name."""
    a = actions.add_parser("build", help="build every variant of a runtime spec (TOML) and publish the layers "
                                         "and their index; the last stdout line is the index digest")
    a.add_argument("spec", type=Path)
    a.add_argument("--origin", required=True, help="file:///DIR or s3://BUCKET/PREFIX")
    a.add_argument("--s3-endpoint", help="S3 endpoint URL (env MODELCAST_S3_ENDPOINT)")
    a.add_argument("--wheelhouse", type=Path, help="install only from this directory of wheels (no network)")
    a.add_argument("--tag", help="tag of the index and layers (default: the spec's version)")
    a.add_argument("--variant", action="append", metavar="ID", help="build only this variant (cpu, cuda12, ...)")
    a.add_argument("--out", type=Path, help="keep the layer artifacts in this directory")
    client_args(a, registry=True, token=True)
    a = actions.add_parser("export", help="write a runtime's variants as an OCI image layout (skopeo reads it)")
    a.add_argument("ref", help="NAME:TAG of a runtime index")
    a.add_argument("--oci", required=True, type=Path, help="directory of the OCI image layout")
    client_args(a, registry=True, token=True)
    return {"build": cmd_build, "export": cmd_export}


def cmd_build(args) -> int:
    from .build import build_and_publish
    from .spec import RuntimeSpec

    client = ClientConfig.from_env(registry=args.registry, token=args.token, ca=args.ca)
    spec = RuntimeSpec.load(args.spec)
    cfg = RuntimeBuildConfig.from_env(registry=client.registry, origin=args.origin, s3_endpoint=args.s3_endpoint,
                                      token=client.token, wheelhouse=args.wheelhouse, out_dir=args.out,
                                      ca=client.ca)
    result = asyncio.run(build_and_publish(spec, cfg, tag=args.tag, only=args.variant,
                                           report=lambda line: print(line, flush=True)))
    print(result.digest)
    return 0


def cmd_export(args) -> int:
    from .oci import export_oci

    client = ClientConfig.from_env(registry=args.registry, token=args.token, ca=args.ca)
    for name, digest in asyncio.run(export_oci(args.ref, client.registry, client.token, args.oci, ca=client.ca)):
        print(f"oci:{args.oci}:{name} {digest}")
    return 0
