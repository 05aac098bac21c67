"""The errors middleware of the node's HTTP listeners (the local API and the relay)."""

from __future__ import annotations

import logging

from aiohttp import web

from modelcast.errors import ModelcastError, PullFailed, error_body

log = logging.getLogger("modelcast.node")


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Our errors become their JSON body and status; anything else a 500 with one log entry."""
    try:
        return await handler(request)
    except ModelcastError as exc:
        return web.json_response(error_body(exc), status=exc.http_status)
    except (web.HTTPException, ConnectionResetError):
        raise  # aiohttp answers the first; the second is a client gone (or closed for being slow)
    except Exception as exc:  # never let a bad request take the daemon down
        log.exception("unhandled error on %s", request.path)
        return web.json_response(error_body(PullFailed(f"internal error: {exc}")), status=500)
