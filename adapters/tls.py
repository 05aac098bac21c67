"""TLS for modelcast's servers and clients: every ``ssl.SSLContext`` is made here.

Servers (the registry's one listening socket, a node's local API and relay listener) take
a certificate chain and key (:class:`~modelcast.config.TlsFiles`); clients trust the
system's roots plus, optionally, one CA file (``--ca`` / ``MODELCAST_CA``), so a fleet can
run on a private CA without touching the machines' trust stores.  Plain HTTP stays the
zero-configuration default: without these files nothing here is used.

libtorrent cannot be handed a context: it builds its own OpenSSL context for https
trackers when its session is made, and reads the CA file OpenSSL's ``SSL_CERT_FILE``
names at that moment (:func:`libtorrent_ca`).
"""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path
from typing import Iterator

from modelcast.config import TlsFiles
from modelcast.errors import BadRequest

__all__ = ["client_context", "connector_ssl", "describe_ssl_error", "libtorrent_ca", "server_context"]


def server_context(tls: TlsFiles | None) -> ssl.SSLContext | None:
    """The context a server listens with, or None for plain HTTP; a bad file is a one-line error."""
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2 at least, no client certificates
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except FileNotFoundError as exc:
        raise BadRequest(f"TLS: {exc.filename} does not exist; check --tls-cert and --tls-key") from None
    except (ssl.SSLError, OSError) as exc:
        raise BadRequest(f"TLS: cannot load the certificate {tls.cert} with the key {tls.key} "
                         f"({describe_ssl_error(exc)}); --tls-cert takes the PEM certificate chain, --tls-key its PEM private key") from None
    return ctx


def client_context(ca: Path | None) -> ssl.SSLContext:
    """A verifying client context: the system's roots, plus the certificates in ``ca`` if given."""
    ctx = ssl.create_default_context()
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except FileNotFoundError:
            raise BadRequest(f"--ca {ca} (env MODELCAST_CA) does not exist") from None
        except (ssl.SSLError, OSError) as exc:
            raise BadRequest(f"--ca {ca} (env MODELCAST_CA) holds no usable PEM certificate "
                             f"({describe_ssl_error(exc)})") from None
    return ctx


def connector_ssl(ca: Path | None) -> ssl.SSLContext | bool:
    """What aiohttp's ``TCPConnector(ssl=...)`` takes: True (its default verification) without a CA file."""
    return client_context(ca) if ca is not None else True


def describe_ssl_error(exc: BaseException | None) -> str:
    """A short reason for a TLS failure: OpenSSL's own words, without the C file and line.

    Follows aiohttp's wrappers (``os_error``, ``certificate_error``) and exception chains.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLCertVerificationError) and getattr(exc, "verify_message", None):
            return f"certificate verify failed: {exc.verify_message}"
        reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
        if isinstance(reason, str) and reason:
            return reason.lower().replace("_", " ")
        exc = (getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None)
               or exc.__cause__ or exc.__context__)
    return "TLS error"


@contextlib.contextmanager
def libtorrent_ca(ca: Path | None) -> Iterator[None]:
    """While a libtorrent session is made, have OpenSSL read ``ca`` as its default CA file.

    libtorrent validates https trackers (``validate_https_trackers``, on by default) against
    OpenSSL's default verify paths, which it loads when the session is constructed (and
    then the system bundle, /etc/ssl/certs/ca-certificates.crt, by name), and
    ``SSL_CERT_FILE`` names the default CA file.  The variable is restored at once, so
    Python's own contexts in this process (which read it when they are made) do not see it.
    """
    if ca is None:
        yield
        return
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(Path(ca).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = old
