"""Typed configuration, with every default and every environment variable in one place.

Environment variables are read only here, through the checked helpers below, and only
when a config is built (never at import time), so tests can set them per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadRequest

ENV_REGISTRY = "MODELCAST_REGISTRY"
ENV_NODE = "MODELCAST_NODE"
ENV_TOKEN = "MODELCAST_TOKEN"
ENV_READ_TOKEN = "MODELCAST_READ_TOKEN"  # modelcast tracker --read-token
# Node enrolment (tracker/liveness.py): a node presents it at its first heartbeat, which
# binds its node id to its own key.  The registry reads it, and so does modelcast node.
ENV_NODE_TOKEN = "MODELCAST_NODE_TOKEN"
# The file in a registry's data dir holding the node token it made itself (mode 0600).
NODE_TOKEN_FILE = "node-token"
ENV_UPSTREAM_TOKEN = "MODELCAST_UPSTREAM_TOKEN"  # modelcast tracker --upstream-token
ENV_S3_ENDPOINT = "MODELCAST_S3_ENDPOINT"
ENV_DB = "MODELCAST_DB"  # modelcast tracker --db
ENV_REPLICAS = "MODELCAST_REPLICAS"  # modelcast tracker --replica, comma-separated
ENV_WHEELHOUSE = "MODELCAST_WHEELHOUSE"
ENV_SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"  # the reproducible-builds convention for fixed timestamps
# Where huggingface_hub keeps its cache, in the order it reads them (huggingface_hub/constants.py).
ENV_HF_HUB_CACHE = "HF_HUB_CACHE"
ENV_HF_HUB_CACHE_OLD = "HUGGINGFACE_HUB_CACHE"
ENV_HF_HOME = "HF_HOME"
ENV_XDG_CACHE_HOME = "XDG_CACHE_HOME"
# TLS: a server's certificate chain and key (PEM), and the CA file (PEM) a client trusts
# besides the system's roots (a private CA that signed the registry's and nodes' certificates).
ENV_TLS_CERT = "MODELCAST_TLS_CERT"  # modelcast tracker|node --tls-cert
ENV_TLS_KEY = "MODELCAST_TLS_KEY"  # modelcast tracker|node --tls-key
ENV_CA = "MODELCAST_CA"  # --ca on every client command, the node daemon and the registry (for --upstream)

DEFAULT_REGISTRY = "http://127.0.0.1:7070"
DEFAULT_NODE = "http://127.0.0.1:7071"


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise BadRequest(f"environment variable {name}={raw!r} is not a number") from None


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache this process's huggingface_hub would use (absolute).

    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``: the library's order.
    """
    explicit = env_str(ENV_HF_HUB_CACHE) or env_str(ENV_HF_HUB_CACHE_OLD)
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser().absolute()
    home = env_str(ENV_HF_HOME) or os.path.join(env_str(ENV_XDG_CACHE_HOME) or os.path.expanduser("~/.cache"),
                                                "huggingface")
    return (Path(os.path.expandvars(home)).expanduser() / "hub").absolute()


def is_wildcard(host: str) -> bool:
    """Whether a listen host means every interface (so it names no one address)."""
    return host in ("", "0.0.0.0", "::")


def parse_hostport(text: str, *, what: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) for a listen address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BadRequest(f"{what} {text!r} is not HOST:PORT")
    host = host.strip("[]")
    port_i = int(port)
    if not 0 <= port_i <= 65535:
        raise BadRequest(f"{what} {text!r}: port out of range")
    return host, port_i


def env_path(name: str) -> Path | None:
    value = env_str(name)
    return Path(value) if value else None


@dataclass(frozen=True)
class TlsFiles:
    """A server's TLS certificate chain and private key (PEM files); serving TLS needs both."""

    cert: Path
    key: Path

    @classmethod
    def from_args(cls, cert: str | Path | None, key: str | Path | None) -> "TlsFiles | None":
        """The pair from ``--tls-cert``/``--tls-key`` (or MODELCAST_TLS_CERT/_KEY); None: plain HTTP."""
        cert = cert or env_str(ENV_TLS_CERT)
        key = key or env_str(ENV_TLS_KEY)
        if not cert and not key:
            return None
        if not cert or not key:
            given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
            raise BadRequest(f"{given} needs {missing} too (env {ENV_TLS_CERT} and {ENV_TLS_KEY}): TLS takes the "
                             "certificate chain and its private key")
        return cls(Path(cert), Path(key))


def ca_from_args(ca: str | Path | None) -> Path | None:
    """The CA file a client trusts besides the system's roots: ``--ca``, else MODELCAST_CA, else none."""
    return Path(ca) if ca else env_path(ENV_CA)


def parse_size(text: str) -> int:
    """Parse sizes like ``500M``, ``20GiB``, ``1.5G`` or plain bytes."""
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
             "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
    s = text.strip().lower()
    num = s.rstrip("abgikmt")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise BadRequest(f"size {text!r} is not a number with an optional unit (K, M, G, T)") from None
    if unit not in units or value < 0:
        raise BadRequest(f"size {text!r} has an unknown unit {unit!r}")
    return int(value * units[unit])


def registry_urls(text: str) -> str:
    """``text`` (URLs of registry replicas, comma-separated) normalised: no blanks, no final slashes."""
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    if not urls:
        raise BadRequest(f"no registry URL in {text!r}")
    return ",".join(urls)


@dataclass(frozen=True)
class ClientConfig:
    """What the CLI needs to talk to a registry and a node daemon."""

    registry: str = DEFAULT_REGISTRY
    node: str = DEFAULT_NODE
    token: str | None = None
    timeout_s: float = 30.0
    # A CA file trusted besides the system's roots, for https:// registries and nodes.
    ca: Path | None = None

    @classmethod
    def from_env(cls, registry: str | list[str] | None = None, node: str | None = None, token: str | None = None,
                 ca: str | Path | None = None) -> "ClientConfig":
        """``registry``: one URL, several comma-separated, or a list (``--registry`` repeated): replicas."""
        if isinstance(registry, (list, tuple)):
            registry = ",".join(registry)
        return cls(
            registry=registry_urls(registry or env_str(ENV_REGISTRY, DEFAULT_REGISTRY)),
            node=(node or env_str(ENV_NODE, DEFAULT_NODE)).rstrip("/"),
            token=token or env_str(ENV_TOKEN),
            ca=ca_from_args(ca),
        )


@dataclass(frozen=True)
class TrackerConfig:
    """The registry and BitTorrent tracker service."""

    host: str = "127.0.0.1"
    port: int = 7070
    data_dir: Path = Path("./modelcast-registry")
    # The registry database: None keeps SQLite in data_dir; a postgresql://USER@HOST:PORT/DB
    # URL keeps it in PostgreSQL, which replicas of the registry can share.
    db: str | None = None
    # Where swarms, node liveness and the allow-list live: None in process, or redis://HOST:PORT/DB
    # (--swarm-store, env MODELCAST_SWARM_STORE): shared by every replica (tracker/swarm_redis.py).
    swarm_store: str | None = None
    token: str | None = None
    # Announce interval handed to clients.  Short, because a private swarm is small
    # and a stale peer list costs a whole fan-out; see README "Tuning".
    announce_interval_s: int = 30
    min_announce_interval_s: int = 5
    # A peer that has not announced for this long is dropped from every peer list
    # (clients without node heartbeats: aria2, or nodes the registry refused).
    peer_ttl_s: float = 90.0
    # Node liveness: a heartbeat that names no ttl gets the default; a longer one is cut
    # to the cap, so a node that dies can never linger in peer lists for longer.
    heartbeat_ttl_default_s: float = 3.0
    heartbeat_ttl_max_s: float = 30.0
    # How often expiry runs.  It looks only at what is due, so a short period is cheap,
    # and it bounds how late a dead node leaves the peer lists (ttl + this).
    expiry_interval_s: float = 0.25
    default_numwant: int = 50
    max_numwant: int = 200
    # Per swarm, each zone's first N peers are its gateways, the only ones handed peers of
    # other zones (while their zone has other peers).  0: none, strict zones; pieces cross
    # zones only as the origin's first-copy gate relays them (tracker/firstcopy.py), about
    # one copy in all.  -1: no limit, every node links across zones.
    zone_gateways: int = 0
    s3_endpoint: str | None = None
    # BEP 15 UDP tracker: None = off, 0 = an ephemeral port (tests); udp_host None = host.
    udp_port: int | None = None
    udp_host: str | None = None
    # Reads (resolve, manifest, torrent, list, web seed) need this token or the write
    # token when set; None = reads are open.  Announce and scrape stay open either way:
    # BitTorrent clients send no headers, and only published info-hashes are accepted.
    read_token: str | None = None
    # Node enrolment: a heartbeat that binds a new node id to its key needs this token
    # (or the write token) as its bearer.  node_token_loopback_free: nodes on this machine
    # (loopback) enrol without it, as when the registry made the token itself and no
    # operator set one (zero-config); False when the operator set one.
    node_token: str | None = None
    node_token_loopback_free: bool = False
    # Federation (tracker/federation.py): the parent registry this zone pulls unknown
    # references through from, the token it needs there, and how long a pulled tag is
    # served before it is checked at the parent again.
    upstream: str | None = None
    upstream_token: str | None = None
    upstream_tag_ttl_s: float = 30.0
    # Peer entries (tracker/peer_policy.py): the proxies whose ip= is believed (addresses
    # or CIDRs), and the addresses that may announce role=origin.  Empty: nobody.
    trusted_proxies: tuple[str, ...] = ()
    origin_seeds: tuple[str, ...] = ()
    # S3 endpoints a publish may name besides s3_endpoint: the registry signs requests to
    # them with its credentials, so they are its operator's choice, not a publisher's.
    allowed_s3_endpoints: tuple[str, ...] = ()
    # S3 origins: a node that accepts redirects gets a presigned URL for exactly the range
    # it asked, valid this long, instead of bytes streamed through the registry.  0: off.
    presign_ttl_s: int = 30
    # TLS on the one listening socket (registry API, web seed and tracker); None: plain HTTP.
    tls: TlsFiles | None = None
    # The CA trusted besides the system's roots when this registry is a client (of --upstream).
    ca: Path | None = None
    # The public base URLs of every replica of this registry (--replica, env MODELCAST_REPLICAS):
    # the torrents it serves list each one's /announce in their announce-list (BEP 12).
    replicas: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeConfig:
    """The node daemon."""

    registry: str = DEFAULT_REGISTRY
    cache_dir: Path = Path("./modelcast-cache")
    api_host: str = "127.0.0.1"
    api_port: int = 7071
    peer_host: str = "127.0.0.1"
    peer_port: int = 6881
    zone: str = "default"
    token: str | None = None
    # The registry's node enrolment token (env MODELCAST_NODE_TOKEN), sent with the first heartbeat.
    node_token: str | None = None
    # Seconds without useful peer progress before the origin web seed is used.
    webseed_grace_s: float = 1.0
    upload_limit: int = 0  # bytes/s, 0 = unlimited
    download_limit: int = 0
    peer_connections: int = 200
    # One heartbeat per node keeps all its swarm entries alive; the tracker drops every
    # entry of a node whose heartbeat is older than heartbeat_ttl_s (a node that died).
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 3.0
    quota: int = 0  # bytes; 0 = no quota
    # Off: no tracker, no peers; every byte from the origin (the baseline of benchmarks/fanout.py).
    p2p: bool = True
    # A lone node lets libtorrent fetch from the registry's web seed itself (a BEP 19 URL seed:
    # the bytes never pass through Python); off: the node's own range requests always.
    url_seed: bool = True
    # The relay listener: nodes of other zones fetch and push pieces there, as the origin
    # directs (tracker/firstcopy.py).  Host None: the peer host; port 0: any free port.
    relay_host: str | None = None
    relay_port: int = 0
    # The URL others reach the relay at, if not http://HOST:PORT of the listener (NAT);
    # "": no relay (this node's zone then takes its own copy from the origin).
    relay_url: str | None = None
    # Where accelerator detection looks for /proc/driver/nvidia, /dev/davinci* and driver
    # version files; tests point it at a faked tree (node_cache/runtime.py).
    accel_root: Path = Path("/")
    # The Hugging Face hub cache a layout goes to when a request names none (the daemon's
    # own HF_HUB_CACHE, see hf_hub_cache()); None: a request must name one.
    hf_cache: Path | None = None
    # TLS on the local API and the relay listener (whose advertised URL is then https://).
    tls: TlsFiles | None = None
    # The CA trusted besides the system's roots for the registry (API, web seed, tracker
    # announces) and other nodes' relay listeners.
    ca: Path | None = None


# What `modelcast publish --torrent` makes (PublishConfig.torrent_format): a v1 torrent, or a
# hybrid v1+v2 one.
TORRENT_FORMATS = ("v1", "hybrid")


@dataclass(frozen=True)
class PublishConfig:
    """One publish run."""

    registry: str = DEFAULT_REGISTRY
    origin: str = ""
    s3_endpoint: str | None = None
    token: str | None = None
    # xxh3 threads.  One: it reads the files in the order the piece hashing does (largest
    # first), so on a cold page cache it is the hashing's read-ahead; two spread the disk
    # over a file the hashing reaches later, and left the hashing waiting (cold 2 GiB
    # publish: 0.51-0.56 of two cores' hashing rate with two, 0.69-0.76 with one).
    hash_workers: int = 1
    upload_workers: int = 8
    # "v1" (the default) or "hybrid" (v1 + v2).  A node checks every piece against every hash
    # family its torrent has: a hybrid torrent costs each node SHA-1 and SHA-256 of every
    # byte, about half its CPU per byte received (issue #13: fan-out to 16 nodes on 2 cores,
    # efficiency 0.62-0.64 hybrid, 0.73-0.78 v1).  v1 is also the kind every BitTorrent
    # client reads (aria2 < 1.37 computes a wrong info-hash for hybrid torrents).
    torrent_format: str = "v1"  # one of TORRENT_FORMATS
    ca: Path | None = None  # trusted besides the system's roots for an https:// registry


@dataclass(frozen=True)
class RuntimeBuildConfig:
    """One ``modelcast runtime build``: where layers are published and where packages come from."""

    registry: str = DEFAULT_REGISTRY
    origin: str = ""
    s3_endpoint: str | None = None
    token: str | None = None
    # A directory of wheels: pip installs only from it, offline.  None: pip's configured index.
    wheelhouse: Path | None = None
    # Where layer artifacts are written (kept); None: a temporary directory, removed after publish.
    out_dir: Path | None = None
    # Timestamp of every layer entry: the same inputs give the same bytes and digest.
    source_date_epoch: int = 0
    pip_timeout_s: float = 1800.0
    ca: Path | None = None  # trusted besides the system's roots for an https:// registry

    @classmethod
    def from_env(cls, **kwargs) -> "RuntimeBuildConfig":
        raw = env_str(ENV_SOURCE_DATE_EPOCH, "0")
        if not raw.isdigit():
            raise BadRequest(f"environment variable {ENV_SOURCE_DATE_EPOCH}={raw!r} is not a whole number of seconds")
        if kwargs.get("s3_endpoint") is None:
            kwargs["s3_endpoint"] = env_str(ENV_S3_ENDPOINT)
        return cls(source_date_epoch=int(raw), **kwargs)
