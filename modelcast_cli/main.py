"""The ``modelcast`` command: the roof over every component.

The only module that knows every component.  Each component owns the wiring of its own
subcommands (a ``cmd`` module: arguments, then a call into the component), as Kraken's
``*/cmd`` packages do; this module only assembles them into one parser and turns a
:class:`~modelcast.errors.ModelcastError` into one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from distributor import cmd as distributor_cmd
from modelcast import __version__
from modelcast.cmdline import Handler
from modelcast.errors import ModelcastError
from node_cache import cmd as node_cmd
from runtime_builder import cmd as runtime_cmd
from serve_glue import cmd as serve_cmd
from tracker import cmd as tracker_cmd


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The whole command line, and the handler of each subcommand (``runtime`` by action)."""
    parser = argparse.ArgumentParser(prog="modelcast",
                                     description="Publish models once, pull them everywhere over a private swarm.")
    parser.add_argument("--version", action="version", version=f"modelcast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Handler] = {}
    handlers.update(tracker_cmd.add_commands(sub))
    handlers.update(distributor_cmd.add_commands(sub))
    handlers.update(node_cmd.add_commands(sub))
    # One "runtime" group, two owners: the builder (build, export) and the node (resolve, detect).
    p = sub.add_parser("runtime", help="accelerator runtime layers: build, resolve on a node, export as OCI")
    actions = p.add_subparsers(dest="runtime_action", required=True, metavar="ACTION")
    runtime_actions = {**runtime_cmd.add_runtime_actions(actions), **node_cmd.add_runtime_actions(actions)}
    handlers["runtime"] = lambda args: runtime_actions[args.runtime_action](args)
    handlers.update(serve_cmd.add_commands(sub))
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except ModelcastError as exc:
        # One line, naming what was asked; no traceback for errors a user can act on.
        print(f"modelcast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
