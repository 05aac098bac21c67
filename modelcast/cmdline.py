"""Command-line pieces every component's ``cmd`` module shares: pure argparse, no component, no I/O."""

from __future__ import annotations

import argparse
from typing import Callable

from modelcast.errors import ModelcastError

Handler = Callable[[argparse.Namespace], int]
"""Runs one parsed subcommand; returns the process exit code."""


def client_args(p: argparse.ArgumentParser, *, registry: bool = False, node: bool = False, token: bool = False) -> None:
    """Add the ``--registry``, ``--node``, ``--token`` and ``--ca`` options a client command takes."""
    if registry:
        p.add_argument("--registry", action="append", metavar="URL",
                       help="registry URL (env MODELCAST_REGISTRY); replicas: repeat the flag or separate URLs "
                            "with commas, requests fail over from one to the next")
    if node:
        p.add_argument("--node", help="node daemon URL (env MODELCAST_NODE)")
    if token:
        p.add_argument("--token", help="bearer token for writes (env MODELCAST_TOKEN)")
    if registry or node:
        ca_arg(p)


def ca_arg(p: argparse.ArgumentParser, what: str = "https:// registries and nodes", dest: str = "ca") -> None:
    """Add ``--ca FILE``: a CA trusted besides the system's roots."""
    p.add_argument("--ca", dest=dest, metavar="FILE", help=f"PEM file of the CA that signed the certificates of {what}, trusted "
                                                "besides the system's roots (env MODELCAST_CA)")


def tls_args(p: argparse.ArgumentParser, what: str) -> None:
    """Add ``--tls-cert FILE --tls-key FILE``: serve ``what`` over TLS."""
    p.add_argument("--tls-cert", metavar="FILE", help=f"PEM certificate chain: serve {what} over TLS (https://); "
                                                      "needs --tls-key (env MODELCAST_TLS_CERT)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert (env MODELCAST_TLS_KEY)")


def secret_file(path, flag: str) -> str | None:
    """The secret held by the file at ``path`` (its first line), or None without a path.

    Secrets come from files or the environment so that no ``ps`` shows them.
    """
    if path is None:
        return None
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise ModelcastError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from exc
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ModelcastError(f"{flag} {path} is empty; write the token on its first line")
    return secret


def parse_annotations(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; a malformed one is a one-line error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ModelcastError(f"annotation {item!r} is not KEY=VALUE")
        out[key] = value
    return out
