"""The aiohttp client side of modelcast's JSON APIs: one place that translates failures."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiohttp

from modelcast.errors import ModelcastError, Unreachable, from_error_body
from modelcast.wire import bearer

from .tls import connector_ssl, describe_ssl_error

log = logging.getLogger("modelcast.http")


async def raise_for_answer(resp: aiohttp.ClientResponse, what: str) -> None:
    """Turn a non-2xx answer from a modelcast service into the matching ModelcastError."""
    if resp.status < 400:
        return
    text = await resp.text(errors="replace")
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = None
    raise from_error_body(body, resp.status, f"{what}: HTTP {resp.status} {text[:200]}", context=what)


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: a trusted certificate, for another name.
HOST_MISMATCH = (62, 64)


def tls_failure(exc: aiohttp.ClientSSLError | aiohttp.ServerDisconnectedError, service: str, base_url: str) -> str:
    """One line on a failed TLS connection (or a plain one the server dropped), saying what to do."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        if getattr(exc.certificate_error, "verify_code", None) in HOST_MISMATCH:
            return (f"{service} at {base_url} presented a certificate for another name "
                    f"({describe_ssl_error(exc.certificate_error)}); use a URL with a name or address the "
                    "certificate lists")
        return (f"{service} at {base_url} presented a certificate this client does not trust "
                f"({describe_ssl_error(exc.certificate_error)}); pass --ca FILE (env MODELCAST_CA) with the CA "
                "that signed it")
    if isinstance(exc, aiohttp.ClientSSLError):
        return (f"TLS with {service} at {base_url} failed ({describe_ssl_error(exc)}); if it serves plain HTTP, "
                "use an http:// URL")
    return (f"{service} at {base_url} closed the connection without an answer; if it serves TLS "
            "(--tls-cert), use an https:// URL")


def split_urls(urls: str | list[str] | tuple[str, ...]) -> list[str]:
    """The service URLs in ``urls``: a list, or one string of comma-separated URLs; each without its final /."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [u.strip().rstrip("/") for u in items if u and u.strip()]
    if not out:
        raise ModelcastError(f"no service URL in {urls!r}")
    return out


# How long one attempt may spend connecting before the next replica is tried: a replica
# that is down refuses at once, one whose machine is gone does not answer at all.
CONNECT_TIMEOUT_S = 0.8


class JsonClient:
    """A small aiohttp client for one modelcast service, translating failures at one place.

    ``base_url`` may name several replicas of the service (a list, or comma-separated):
    every request goes to the current one; on a connection error, a timeout or a 5xx
    answer (503 Unavailable from a replica whose database is down included) the same
    request is sent to the next, and that one stays current.  Only when every replica
    failed does the request fail, with the last replica's error.

    ``ca``: a CA file trusted besides the system's roots, for an https:// service signed
    by a private CA (``--ca``, env MODELCAST_CA).
    """

    service = "service"

    def __init__(self, base_url: str | list[str], token: str | None = None, timeout_s: float = 30.0,
                 session: aiohttp.ClientSession | None = None, ca: Path | None = None,
                 local_host: str | None = None):
        self.base_urls = split_urls(base_url)
        self._current = 0
        self.failovers = 0
        self.local_host = local_host  # requests leave from this address (None: any)
        self.token = token
        self.ca = ca
        self._timeout = aiohttp.ClientTimeout(total=timeout_s,
                                              sock_connect=CONNECT_TIMEOUT_S if len(self.base_urls) > 1 else None)
        self._session = session
        self._own_session = session is None

    @property
    def base_url(self) -> str:
        """The replica requests go to now."""
        return self.base_urls[self._current]

    def replicas(self) -> list[str]:
        """Every replica, the current one first, then the others in their given order."""
        n = len(self.base_urls)
        return [self.base_urls[(self._current + i) % n] for i in range(n)]

    def failed(self, base_url: str) -> None:
        """``base_url`` failed (a connection error or a 5xx): if it is current, the next replica becomes current."""
        if len(self.base_urls) > 1 and self.base_url == base_url:
            self._current = (self._current + 1) % len(self.base_urls)
            self.failovers += 1
            log.info("%s at %s failed; using %s from now on", self.service, base_url, self.base_url)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout,
                                                  connector=aiohttp.TCPConnector(
                                                      ssl=connector_ssl(self.ca),
                                                      local_addr=(self.local_host, 0) if self.local_host else None))
        return self._session

    async def request(self, method: str, path: str, *, what: str, raw: bool = False,
                      timeout_s: float | None = None, **kwargs) -> Any:
        """Send one request, to each replica in turn until one answers without a 5xx."""
        last: ModelcastError | None = None
        for base in self.replicas():
            try:
                return await self._request_once(base, method, path, what=what, raw=raw, timeout_s=timeout_s,
                                                **kwargs)
            except _ReplicaFailed as exc:
                last = exc.error
                self.failed(base)
        assert last is not None
        raise last

    async def _request_once(self, base: str, method: str, path: str, *, what: str, raw: bool,
                            timeout_s: float | None, **kwargs) -> Any:
        url = base + path
        headers = {**bearer(self.token), **kwargs.pop("headers", {})}
        timeout = None
        if timeout_s is not None:
            timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._timeout.sock_connect)
        try:
            async with self._sess().request(method, url, headers=headers, timeout=timeout, **kwargs) as resp:
                try:
                    await raise_for_answer(resp, what)
                except ModelcastError as exc:
                    if resp.status >= 500:
                        raise _ReplicaFailed(exc) from exc
                    raise
                return await resp.read() if raw else await resp.json(content_type=None)
        except (ModelcastError, _ReplicaFailed):
            raise
        except (aiohttp.ClientSSLError, aiohttp.ServerDisconnectedError) as exc:
            if isinstance(exc, aiohttp.ServerDisconnectedError) and not base.startswith("http:"):
                raise _ReplicaFailed(Unreachable(f"{what}: {self.service} at {base} is unreachable ({exc})")) from exc
            if isinstance(exc, aiohttp.ServerDisconnectedError):
                raise _ReplicaFailed(Unreachable(f"{what}: {tls_failure(exc, self.service, base)}")) from exc
            raise Unreachable(f"{what}: {tls_failure(exc, self.service, base)}") from exc
        except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
            raise _ReplicaFailed(Unreachable(
                f"{what}: {self.service} at {base} is unreachable ({exc.__class__.__name__}: {exc})")) from exc
        except aiohttp.InvalidURL as exc:
            raise Unreachable(f"{what}: {self.service} at {base} is unreachable ({exc.__class__.__name__}: {exc})") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ContentTypeError, ValueError) as exc:
            raise _ReplicaFailed(Unreachable(f"{what}: {self.service} at {base} sent a malformed answer: {exc}")) from exc


class _ReplicaFailed(Exception):
    """One replica failed in a way the next may not (carries the error to raise if every one fails)."""

    def __init__(self, error: ModelcastError):
        super().__init__(str(error))
        self.error = error
