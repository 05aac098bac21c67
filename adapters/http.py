"""The aiohttp client side of modelcast's JSON APIs: one place that translates failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from modelcast.errors import ModelcastError, Unreachable, from_error_body
from modelcast.wire import bearer

from .tls import connector_ssl, describe_ssl_error


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


class JsonClient:
    """A small aiohttp client for one modelcast service, translating failures at one place.

    ``ca``: a CA file trusted besides the system's roots, for an https:// service signed
    by a private CA (``--ca``, env MODELCAST_CA).
    """

    service = "service"

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 30.0,
                 session: aiohttp.ClientSession | None = None, ca: Path | None = None,
                 local_host: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.local_host = local_host  # requests leave from this address (None: any)
        self.token = token
        self.ca = ca
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._own_session = session is None

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
        url = self.base_url + path
        headers = {**bearer(self.token), **kwargs.pop("headers", {})}
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
        try:
            async with self._sess().request(method, url, headers=headers, timeout=timeout, **kwargs) as resp:
                await raise_for_answer(resp, what)
                return await resp.read() if raw else await resp.json(content_type=None)
        except ModelcastError:
            raise
        except (aiohttp.ClientSSLError, aiohttp.ServerDisconnectedError) as exc:
            if isinstance(exc, aiohttp.ServerDisconnectedError) and not self.base_url.startswith("http:"):
                raise Unreachable(f"{what}: {self.service} at {self.base_url} is unreachable ({exc})") from exc
            raise Unreachable(f"{what}: {tls_failure(exc, self.service, self.base_url)}") from exc
        except (aiohttp.ClientConnectionError, aiohttp.InvalidURL, TimeoutError, OSError) as exc:
            raise Unreachable(f"{what}: {self.service} at {self.base_url} is unreachable ({exc.__class__.__name__}: {exc})") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ContentTypeError, ValueError) as exc:
            raise Unreachable(f"{what}: {self.service} at {self.base_url} sent a malformed answer: {exc}") from exc
