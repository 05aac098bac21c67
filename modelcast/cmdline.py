"""Command-line pieces every component's ``cmd`` module shares: pure argparse, no component, no I/O."""

from __future__ import annotations

import argparse
from typing import Callable

from modelcast.errors import ModelcastError

Handler = Callable[[argparse.Namespace], int]
"""Runs one parsed subcommand; returns the process exit code."""


def client_args(p: argparse.ArgumentParser, *, registry: bool = False, node: bool = False, token: bool = False) -> None:
    """Add the ``--registry``, ``--node`` and ``--token`` options a client command takes."""
    if registry:
        p.add_argument("--registry", help="registry URL (env MODELCAST_REGISTRY)")
    if node:
        p.add_argument("--node", help="node daemon URL (env MODELCAST_NODE)")
    if token:
        p.add_argument("--token", help="bearer token for writes (env MODELCAST_TOKEN)")


def parse_annotations(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; a malformed one is a one-line error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ModelcastError(f"annotation {item!r} is not KEY=VALUE")
        out[key] = value
    return out
