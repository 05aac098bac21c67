"""The registry + tracker application under its former module name.

It now lives in :mod:`tracker.app` (assembly and running), with its parts beside it:
:mod:`tracker.registry_api`, :mod:`tracker.webseed`, :mod:`tracker.endpoint`,
:mod:`tracker.liveness`, :mod:`tracker.auth` and the app keys in :mod:`tracker.state`.
Tests and tools that import ``make_app``, ``start_server``, ``serve`` or an app key
from here keep working.
"""

from .app import (CONFIG, FIRST_COPY, ORIGINS, STATS, STORE, SWARMS, TRACKER, UDP_TRACKER, UPSTREAM, WEBSEED_CACHE,
                  WRITE_LOCK, RunningServer, make_app, serve, start_server)

__all__ = [
    "CONFIG", "FIRST_COPY", "ORIGINS", "STATS", "STORE", "SWARMS", "TRACKER", "UDP_TRACKER", "UPSTREAM",
    "WEBSEED_CACHE", "WRITE_LOCK", "RunningServer", "make_app", "serve", "start_server",
]
