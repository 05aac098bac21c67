"""One exception tree for modelcast.

Every error a user can meet derives from :class:`ModelcastError` and also from the
built-in exception it resembles, so callers may catch either.  Foreign exceptions
(botocore, libtorrent, aiohttp) are translated at one boundary with ``raise ... from``.
"""

from __future__ import annotations

import math


class ModelcastError(Exception):
    """Root of every modelcast error.  ``code`` is the stable name used on the wire."""

    code = "error"
    http_status = 500


class InvalidReference(ModelcastError, ValueError):
    """A string is not a valid ``name:tag``, ``name@sha256:<hex>`` or ``sha256:<hex>``."""

    code = "invalid_reference"
    http_status = 400


class InvalidManifest(ModelcastError, ValueError):
    """A manifest is malformed, fails its digest, or names a path outside the artifact."""

    code = "invalid_manifest"
    http_status = 400


class UnsafePath(InvalidManifest):
    """A file path is absolute, climbs out with ``..``, or is a link leaving the artifact."""

    code = "unsafe_path"


class BadRequest(ModelcastError, ValueError):
    """A request body or parameter is malformed."""

    code = "bad_request"
    http_status = 400


class TooLarge(BadRequest):
    """A request body over what its route reads (HTTP 413)."""

    code = "too_large"
    http_status = 413


class Busy(ModelcastError, RuntimeError):
    """A server at one of its bounds (connections, waiting requests); retry later (HTTP 503)."""

    code = "busy"
    http_status = 503


class ArtifactNotFound(ModelcastError, LookupError):
    """A reference or digest is unknown to the registry or the cache."""

    code = "not_found"
    http_status = 404


class Unauthorized(ModelcastError, PermissionError):
    """A write (or read) needs a bearer token and none, or a wrong one, was given."""

    code = "unauthorized"
    http_status = 401


class Conflict(ModelcastError, ValueError):
    """A write conflicts with what is stored (e.g. a digest whose bytes differ)."""

    code = "conflict"
    http_status = 409


class Unreachable(ModelcastError, ConnectionError):
    """A service (registry, node daemon, origin) could not be reached."""

    code = "unreachable"
    http_status = 502


class Unavailable(ModelcastError, ConnectionError):
    """A service is up but cannot answer now (its database is unreachable); retry after ``retry_after_s``.

    Servers answer it with HTTP 503 and a ``Retry-After`` header.
    """

    code = "unavailable"
    http_status = 503
    retry_after_s: float = 1.0


class OriginError(ModelcastError, OSError):
    """The origin store failed to read or write bytes."""

    code = "origin_error"
    http_status = 502


class IntegrityError(ModelcastError, ValueError):
    """Bytes on disk or on the wire do not match their recorded hash."""

    code = "integrity_error"
    http_status = 500


class PullFailed(ModelcastError, RuntimeError):
    """A node could not make an artifact warm."""

    code = "pull_failed"
    http_status = 500


class DiskFull(PullFailed):
    """The cache's filesystem filled up during a download."""

    code = "disk_full"
    http_status = 507


class QuotaExceeded(PullFailed):
    """The artifact cannot fit in the cache quota even after evicting all it may."""

    code = "quota_exceeded"
    http_status = 507


class RemoteError(ModelcastError):
    """A service answered with an error body; ``code`` and ``http_status`` mirror it."""

    def __init__(self, message: str, code: str = "error", http_status: int = 500):
        super().__init__(message)
        self.code = code
        self.http_status = http_status


_BY_CODE: dict[str, type[ModelcastError]] = {
    cls.code: cls
    for cls in (
        InvalidReference,
        InvalidManifest,
        UnsafePath,
        BadRequest,
        TooLarge,
        Busy,
        ArtifactNotFound,
        Unauthorized,
        Conflict,
        Unreachable,
        Unavailable,
        OriginError,
        IntegrityError,
        PullFailed,
        DiskFull,
        QuotaExceeded,
    )
}


def error_body(exc: ModelcastError) -> dict:
    """The JSON body every modelcast HTTP API sends for an error."""
    return {"error": {"code": exc.code, "message": str(exc)}}


def retry_after(exc: ModelcastError) -> dict[str, str]:
    """The ``Retry-After`` header an answer of ``exc`` carries (503 Unavailable), else none."""
    seconds = getattr(exc, "retry_after_s", None)
    return {"Retry-After": str(max(1, math.ceil(seconds)))} if seconds is not None else {}


def from_error_body(body: object, http_status: int, fallback: str, context: str | None = None) -> ModelcastError:
    """Rebuild the matching exception from an error body sent by a modelcast service.

    ``context`` (what the caller asked, e.g. "publish demo/m:v1") leads the message
    unless the service already said it, so the user sees what failed and why.
    """
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", "error"))
        message = str(body["error"].get("message", fallback))
        if context and context not in message:
            message = f"{context}: {message}"
        cls = _BY_CODE.get(code)
        if cls is not None:
            return cls(message)
        return RemoteError(message, code, http_status)
    return RemoteError(fallback, "error", http_status)
