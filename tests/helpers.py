"""The tests' one helpers module (fixtures live in conftest.py).

The tokens; running the real CLI; making models and hashing trees; reading a node's
metrics and a registry's stats; a real Prometheus and promtool; the registry tests'
artifact, built with the publisher's own torrent code; a throwaway CA for the TLS tests;
the runtime tests' spec and wheelhouse.  Starting a tracker or a node and waiting on a
condition are shipped in :mod:`harness` (the benchmarks and the demo use them too) and
re-exported here.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import random
import shutil
import subprocess
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_from_bytes

import xxhash

from adapters import torrent as lt_adapter
from adapters.origin import FileOrigin
from harness import (NodeProcess, ServiceProcess, TrackerProcess, free_port, modelcast_argv, start_node,  # noqa: F401
                     start_tracker, wait_until, wait_until_async)
from modelcast.config import ENV_WHEELHOUSE, TlsFiles, env_str
from modelcast.manifest import FileEntry, Manifest
from tracker.bencode import bdecode, bencode

ROOT = Path(__file__).resolve().parent.parent

TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Credentials of the test S3 server (moto); the registry gets them through its environment.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# -- the CLI, models, trees --------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(modelcast_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def make_model(root: Path, sizes: dict[str, int], seed: int = 1) -> Path:
    """Write files of the given sizes with seeded pseudo-random bytes."""
    rng = random.Random(seed)
    for rel, size in sizes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
    return root


async def pull_all(nodes, ref: str) -> list[dict]:
    """Pull ``ref`` on every node at once (each waits until its copy is verified); their final statuses."""
    import asyncio

    from node_cache.client import NodeClient

    clients = [NodeClient(n.url) for n in nodes]
    try:
        return await asyncio.gather(*(c.pull(ref, wait=True) for c in clients))
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): xxhash.xxh3_128_hexdigest(p.read_bytes())
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def publish(registry: str, path: Path, ref: str, origin: str, *extra: str) -> str:
    """``modelcast publish`` with the test token; returns the digest."""
    out = run_cli("publish", str(path), ref, "--registry", registry, "--origin", origin, "--token", TOKEN, *extra)
    assert out.returncode == 0, out.stderr
    digest = out.stdout.strip().splitlines()[-1]
    assert digest.startswith("sha256:") and len(digest) == 71, out.stdout
    return digest


# -- readers -----------------------------------------------------------------------------


def metric(node_url: str, name: str) -> float:
    """One unlabelled sample of a node's Prometheus metrics."""
    with urllib.request.urlopen(f"{node_url}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def registry_stats(registry: str, token: str | None = None) -> dict:
    req = urllib.request.Request(f"{registry}/v1/stats", headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


# -- Prometheus ----------------------------------------------------------------------------

# Debian's prometheus package ships both (the Makefile's system-tools step installs it).
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


class PrometheusProcess(ServiceProcess):
    """A real Prometheus server on its own port, config and data directory; ``query`` asks its HTTP API."""

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector (or scalar, as one sample) ``expr`` evaluates to now."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]


def start_prometheus(work_dir: Path, scrape_configs: list[dict], *, interval: str = "1s") -> PrometheusProcess:
    """Prometheus scraping ``scrape_configs`` every ``interval``, its config and TSDB under ``work_dir``.

    Never the packaged service's port (9090), config or data: a free port, files of its own.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "prometheus.yml"
    # JSON is YAML: no YAML library needed to write the config.
    config.write_text(json.dumps({"global": {"scrape_interval": interval, "scrape_timeout": interval,
                                             "evaluation_interval": interval},
                                  "scrape_configs": scrape_configs}, indent=2))
    port = free_port()
    svc = PrometheusProcess([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work_dir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            f"http://127.0.0.1:{port}/-/ready", work_dir / "prometheus.log", name="prometheus")
    svc.start(60)
    return svc


def promtool_check_metrics(text: bytes) -> str:
    """What ``promtool check metrics`` says of an exposition: "" when it passes, else its complaints."""
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)
    said = (out.stdout + out.stderr).decode(errors="replace").strip()
    return said or (f"promtool exited with code {out.returncode}" if out.returncode else "")


# -- the registry tests' artifact --------------------------------------------------------

PIECE = 256 * 1024


@dataclass
class Built:
    manifest: Manifest
    torrent: bytes
    root: Path  # parent dir holding <torrent_name>/<files>
    data: dict[str, bytes]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def body(self, origin: FileOrigin, tag: str | None = "v1", **over) -> dict:
        body = {"manifest": self.manifest.body(), "torrent": base64.b64encode(self.torrent).decode(),
                "origin": {"url": origin.url, "s3_endpoint": None}, "tag": tag}
        body.update(over)
        return body


def build_artifact(where: Path, name: str = "demo/model", files: dict[str, bytes] | None = None,
                   created: str = "2025-01-01T00:00:00Z", torrent_files: dict[str, int] | None = None,
                   symlink: str | None = None) -> Built:
    """Write files, make their private torrent as publish does (hybrid v1+v2), and a manifest.

    ``torrent_files`` makes the torrent describe other files than the manifest (zero-filled
    stand-ins of those sizes); ``symlink`` adds a symlink entry to the torrent, which no
    publisher makes: it is written into a v1 torrent's file list, and the manifest carries
    that torrent's info-hash, so only the symlink is wrong with it.
    """
    if files is None:
        rnd = random.Random(name)  # same name, same bytes: lets tests share a content key
        files = {"a.bin": rnd.randbytes(300_000), "sub/b.bin": rnd.randbytes(1234)}
    root = where / f"src-{abs(hash((name, created))) % 10**8}"
    for path, data in files.items():
        p = root / "model" / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    if torrent_files:
        entries = []
        for path, size in sorted(torrent_files.items()):
            stand_in = root / "torrent-only" / path
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_bytes(b"\0" * size)
            entries.append((path, str(stand_in), size))
    else:
        entries = [(path, str(root / "model" / path), len(data)) for path, data in sorted(files.items())]
    torrent = lt_adapter.build_torrent(entries, "model", PIECE, v1_only=symlink is not None)
    if symlink:
        meta = bdecode(torrent)
        meta[b"info"][b"files"].append({b"attr": b"l", b"length": 0, b"path": [symlink.encode()],
                                        b"symlink path": [b"a.bin"]})
        torrent = bencode(meta)
    manifest = Manifest(
        kind="model", name=name,
        files=tuple(FileEntry(p, len(d), xxhash.xxh3_128_hexdigest(d)) for p, d in sorted(files.items())),
        piece_length=PIECE, info_hash=lt_adapter.info_hashes(torrent), torrent_name="model",
        created=created, annotations={"framework": "test"},
    )
    return Built(manifest, torrent, root, files)


def upload(built: Built, origin: FileOrigin) -> None:
    for f in built.manifest.files:
        origin.put_blob(f.xxh3_128, built.root / "model" / f.path, f.size)


async def api_publish(client, built: Built, origin: FileOrigin, tag: str | None = "v1",
                      status: int | None = 201) -> dict:
    """``POST /v1/artifacts`` through an aiohttp test client; checks ``status`` unless None."""
    resp = await client.post("/v1/artifacts", json=built.body(origin, tag), headers=AUTH)
    body = await resp.json()
    if status is not None:
        assert resp.status == status, body
    return body


async def error_of(resp, status: int) -> dict:
    """The ``error`` object of a JSON error answer, after checking its status and shape."""
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]


def announce_from(tracker_url: str, source: str, query: str) -> dict:
    """``GET /announce?query`` sent from the local address ``source`` (e.g. 127.0.0.3); the decoded answer."""
    import http.client

    host, port = tracker_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/announce?" + query)
        return bdecode(conn.getresponse().read())
    finally:
        conn.close()


def announce_query(info_hash: bytes, n: int, **extra) -> str:
    """The query string of peer ``n``'s announce (port 7000 + n), every byte percent-encoded."""
    params = {"info_hash": info_hash, "peer_id": f"-MC0001-{n:012d}".encode(), "port": str(7000 + n),
              "uploaded": "0", "downloaded": "0", "left": "0", "compact": "1", **extra}
    return "&".join(f"{k}={quote_from_bytes(v if isinstance(v, bytes) else str(v).encode(), safe='')}"
                    for k, v in params.items())


async def bget(client, path: str) -> dict:
    """GET a tracker path and decode its bencoded answer."""
    resp = await client.get(path)
    assert resp.status == 200 and resp.content_type == "text/plain"
    return bdecode(await resp.read())


# -- a throwaway CA for the TLS tests ------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA (``ca``, PEM) and one server certificate it signed, with its key (``tls``)."""

    ca: Path
    tls: TlsFiles


def make_pki(where: Path, hosts: tuple[str, ...] = ("127.0.0.1",)) -> Pki:
    """Make a CA and a server certificate for ``hosts`` (IP addresses or DNS names), valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelcast test CA")])

    def builder(subject: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    ca = (builder(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), key.public_key())
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    where.mkdir(parents=True, exist_ok=True)
    pki = Pki(where / "ca.pem", TlsFiles(where / "server.pem", where / "server.key"))
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.tls.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    pki.tls.key.chmod(0o600)
    return pki


# -- the runtime tests' spec and wheelhouse ----------------------------------------------

CI_SPEC = ROOT / "runtime_builder" / "specs" / "ort-ci.toml"
PLATFORM = "manylinux_2_28_x86_64"
PYTHON = "3.11"
WHEELS = ("onnxruntime==1.31.1", "onnxruntime-gpu==1.31.1", "onnxruntime-cann==1.24.4")


def wheelhouse_dir() -> Path:
    return Path(env_str(ENV_WHEELHOUSE) or Path.home() / ".cache" / "modelcast" / "wheelhouse").expanduser()


def make_wheel(where: Path, name: str, version: str, files: dict[str, bytes] | None = None) -> Path:
    """A small pure-Python wheel (``py3-none-any``, so pip takes it for any target platform).

    ``files`` maps paths inside site-packages to their bytes (default: ``<name>/__init__.py``
    holding ``VERSION``).  Its RECORD hashes are true; its entries carry a fixed time.
    """
    dist = name.replace("-", "_")
    files = files or {f"{dist}/__init__.py": f"VERSION = {version!r}\n".encode()}
    info = f"{dist}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: modelcast-tests\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in sorted(files.items())] + [f"{info}/RECORD,,"]
    where.mkdir(parents=True, exist_ok=True)
    wheel = where / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in [*sorted(files.items()), (f"{info}/RECORD", ("\n".join(record) + "\n").encode())]:
            zf.writestr(zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return wheel


def relay_token(tracker: TrackerProcess, node_id: str, method: str, digest: str, path: str, first: int, last: int,
                now: float | None = None) -> str:
    """A relay token as the registry (SQLite, in ``tracker.data_dir``) issues it: for ``method`` (PUT/GET) of
    pieces holding bytes ``first..last`` of ``path`` ("<torrent_name>/<file>") at node ``node_id``."""
    import sqlite3
    import time

    from modelcast.relay_auth import make_token, node_relay_secret
    from tracker.store import DB_NAME

    with sqlite3.connect(Path(tracker.data_dir) / DB_NAME) as db:
        secret = bytes(db.execute("SELECT secret FROM registry_secrets WHERE name = 'relay'").fetchone()[0])
    return make_token(node_relay_secret(secret, node_id), method, node_id, digest, path, first, last,
                      time.time() if now is None else now)


def request_from(url: str, method: str, source: str, headers: dict[str, str], body: bytes | None = None
                 ) -> tuple[int, dict[str, str], bytes]:
    """``method url`` sent from the local address ``source`` (127.0.0.0/8 plays other machines): status, headers, body."""
    host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    try:
        conn.request(method, "/" + url.split("/", 3)[3], body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()
