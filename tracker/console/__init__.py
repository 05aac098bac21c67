"""The registry's console under ``/ui``: server-rendered pages, one script and one stylesheet from the package.

See :mod:`tracker.console.views` for the routes and :mod:`tracker.console.access` for who may read.
"""

from .views import add_console_routes

__all__ = ["add_console_routes"]
