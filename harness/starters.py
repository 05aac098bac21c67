"""Start a registry/tracker or a node daemon as a real process, the one place that spells their flags.

The tests, the benchmarks, the demo and :class:`serve_glue.testing.LocalFleet` all start
their services here, so a new required flag or a changed default is changed once.  Every
address is chosen free on its host unless given; every process logs to a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from modelcast.config import ENV_READ_TOKEN, ENV_TOKEN, TlsFiles

from .procs import ServiceProcess, free_port, modelcast_argv


def hostport(host: str, port: int) -> str:
    """``HOST:PORT`` as the command line takes it (``[v6]:PORT`` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tls_argv(tls: TlsFiles | None, ca: Path | None) -> list[str]:
    """The ``--tls-cert``/``--tls-key`` and ``--ca`` flags of a server."""
    return ([*(["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)] if tls else []),
             *(["--ca", str(ca)] if ca else [])])


class TrackerProcess(ServiceProcess):
    """A ``modelcast tracker`` process; ``url`` is the base of its registry API and its announce URL."""

    def __init__(self, argv: list[str], *, host: str, port: int, data_dir: Path, log_path: Path,
                 env: Mapping[str, str], name: str, tls: bool = False, ca: Path | None = None):
        url = f"{'https' if tls else 'http'}://{hostport(host, port)}"
        super().__init__(argv, f"{url}/v1/health", log_path, dict(env), name, url=url, ca=ca)
        self.host, self.port, self.data_dir = host, port, data_dir


class NodeProcess(ServiceProcess):
    """A ``modelcast node`` process; ``url`` is its local API, ``cache`` its cache directory."""

    def __init__(self, argv: list[str], *, host: str, api_port: int, peer_port: int, cache: Path, log_path: Path,
                 env: Mapping[str, str], name: str, tls: bool = False, ca: Path | None = None):
        url = f"{'https' if tls else 'http'}://{hostport(host, api_port)}"
        super().__init__(argv, f"{url}/v1/health", log_path, dict(env), name, url=url, ca=ca)
        self.host, self.api_port, self.peer_port, self.cache = host, api_port, peer_port, cache


def start_tracker(work_dir: Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                  read_token: str | None = None, data_dir: Path | None = None, extra: Sequence[str] = (),
                  log_path: Path | None = None, env: Mapping[str, str] | None = None, name: str = "tracker",
                  start: bool = True, timeout_s: float = 30.0, tls: TlsFiles | None = None,
                  ca: Path | None = None) -> TrackerProcess:
    """A registry/tracker on ``host`` (``port`` 0: a free one), its data in ``work_dir/registry``.

    ``token`` guards writes, ``read_token`` reads (given through the environment, where
    ``ps`` cannot read it); ``extra`` are more ``modelcast tracker`` flags.  The log goes to
    ``work_dir/logs/<name>.log`` unless ``log_path`` says otherwise.  With ``start=False``
    the process is only prepared: its URL is known, ``.start()`` runs it (and runs it again
    after a ``.stop()``, on the same port and data).  ``tls`` serves https (``url`` is then
    https://), ``ca`` is the CA its clients (and the health check) trust.
    """
    work_dir = Path(work_dir)
    port = port or free_port(host)
    data_dir = Path(data_dir) if data_dir is not None else work_dir / "registry"
    argv = ["tracker", "--listen", hostport(host, port), "--data", str(data_dir), *tls_argv(tls, ca)]
    # Through the environment, where `ps` cannot read them (DESIGN.md, security model).
    env = {**(env or {}), **({ENV_TOKEN: token} if token else {}), **({ENV_READ_TOKEN: read_token} if read_token else {})}
    svc = TrackerProcess(modelcast_argv(*argv, *extra), host=host, port=port, data_dir=data_dir,
                         log_path=Path(log_path) if log_path else work_dir / "logs" / f"{name}.log", env=env, name=name,
                         tls=tls is not None, ca=ca)
    if start:
        svc.start(timeout_s)
    return svc


def start_node(work_dir: Path, registry: str, name: str = "node", *, host: str = "127.0.0.1",
               zone: str | None = None, token: str | None = None, cache: Path | None = None, api_port: int = 0,
               peer_port: int = 0, extra: Sequence[str] = (), log_path: Path | None = None,
               env: Mapping[str, str] | None = None, start: bool = True, timeout_s: float = 30.0,
               tls: TlsFiles | None = None, ca: Path | None = None) -> NodeProcess:
    """A node daemon of ``registry`` on ``host``: local API and peer listener on free ports unless given.

    Its cache is ``work_dir/<name>`` and its log ``work_dir/logs/<name>.log`` unless
    ``cache``/``log_path`` say otherwise; ``token`` (the registry's, through the
    environment) lets it heartbeat; ``extra`` are more ``modelcast node`` flags.  ``tls``
    serves its API and relay listener over https; ``ca`` is the CA it trusts for the
    registry and other nodes (and the one the health check trusts).
    """
    work_dir = Path(work_dir)
    api_port = api_port or free_port(host)
    peer_port = peer_port or free_port(host)
    cache = Path(cache) if cache is not None else work_dir / name
    argv = ["node", "--registry", registry, "--cache", str(cache), "--api", hostport(host, api_port),
            "--peer-listen", hostport(host, peer_port), *(["--zone", zone] if zone else []), *tls_argv(tls, ca)]
    env = {**(env or {}), **({ENV_TOKEN: token} if token else {})}
    svc = NodeProcess(modelcast_argv(*argv, *extra), host=host, api_port=api_port, peer_port=peer_port, cache=cache,
                      log_path=Path(log_path) if log_path else work_dir / "logs" / f"{name}.log", env=env, name=name,
                      tls=tls is not None, ca=ca)
    if start:
        svc.start(timeout_s)
    return svc
