"""``modelcast runtime export NAME:TAG --oci DIR``: a runtime index as an OCI image layout.

One image manifest per variant, each with one layer (the variant's ``layer.tar``, whose
sha256 is already its diff_id) and a config whose ``Env`` activates it; ``index.json``
lists them with their platform (os, architecture) and the accelerator in annotations,
and names each ``<tag>-<variant id>`` (``oci:DIR:1.31.1-cuda13`` for skopeo).
Bytes come from the registry's web-seed endpoint and are checked against the manifest's
xxh3 and the index's sha256 before they are renamed into ``blobs/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import quote

import aiohttp
import xxhash

from modelcast.errors import BadRequest, IntegrityError, InvalidManifest, Unreachable
from adapters.http import raise_for_answer
from modelcast.wire import bearer
from modelcast.manifest import Manifest
from modelcast.reference import Reference
from modelcast.runtime_index import INDEX_FILE, LAYER_FILE, LAYER_META_FILE, RuntimeIndex, parse_platform
from adapters.tls import connector_ssl
from tracker.client import RegistryClient

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
ANN_PREFIX = "io.modelcast."
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}
CHUNK = 4 << 20


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class _Layout:
    """Writes blobs into an OCI image layout directory, each by a temp name and a rename."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> dict:
        hexd = hashlib.sha256(data).hexdigest()
        dest = self.blobs / hexd
        if not dest.exists():
            tmp = dest.with_name(f".{hexd}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        return {"digest": f"sha256:{hexd}", "size": len(data)}

    def finish(self, manifests: list[dict]) -> None:
        (self.root / "oci-layout").write_bytes(_json_bytes({"imageLayoutVersion": "1.0.0"}))
        tmp = self.root / ".index.json.tmp"
        tmp.write_bytes(_json_bytes({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}))
        os.replace(tmp, self.root / "index.json")


async def _fetch(http: aiohttp.ClientSession, registry: RegistryClient, token: str | None, digest: str,
                 manifest: Manifest, path: str, dest: Path | None) -> tuple[bytes | None, str, int]:
    """Fetch one file of an artifact; to ``dest`` (returns sha256 hex, size) or into memory."""
    entry = next((f for f in manifest.files if f.path == path), None)
    if entry is None:
        raise InvalidManifest(f"{manifest.name} ({digest}) has no file {path!r}")
    url = registry.webseed_url(digest) + quote(manifest.torrent_name) + "/" + quote(path)
    sha, xxh, size, parts = hashlib.sha256(), xxhash.xxh3_128(), 0, []
    out = open(dest, "wb") if dest is not None else None
    try:
        async with http.get(url, headers=bearer(token)) as resp:
            await raise_for_answer(resp, f"fetch {path} of {manifest.name}")
            async for chunk in resp.content.iter_chunked(CHUNK):
                sha.update(chunk)
                xxh.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
                else:
                    parts.append(chunk)
    except aiohttp.ClientError as exc:
        raise Unreachable(f"fetch {path} of {manifest.name} from {registry.base_url}: {exc}") from exc
    finally:
        if out is not None:
            out.close()
    if size != entry.size or xxh.hexdigest() != entry.xxh3_128:
        raise IntegrityError(f"{path} of {manifest.name} ({digest}) does not match its manifest "
                             f"({size} bytes received, {entry.size} expected)")
    return (b"".join(parts) if out is None else None), sha.hexdigest(), size


async def export_oci(ref: str, registry_url: str, token: str | None, out_dir: Path,
                     only: list[str] | None = None, ca: Path | None = None) -> list[tuple[str, str]]:
    """Export the runtime index ``ref`` (or the variants in ``only``) to ``out_dir``.

    Returns ``[(reference name, manifest digest), ...]``, one per variant.
    """
    parsed = Reference.parse(ref)
    layout = _Layout(out_dir)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with (RegistryClient(registry_url, token, ca=ca) as registry,
                aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=connector_ssl(ca))) as http):
        index_digest, index_manifest = await registry.resolve(ref)
        if index_manifest.kind != "runtime-index":
            raise BadRequest(f"{ref} is a {index_manifest.kind} artifact; export needs a runtime index")
        data, _, _ = await _fetch(http, registry, token, index_digest, index_manifest, INDEX_FILE, None)
        index = RuntimeIndex.from_bytes(data)
        tag = parsed.tag or index.version
        variants = [v for v in index.variants if not only or v.id in only]
        if not variants:
            raise BadRequest(f"{ref} has no variant {', '.join(only or [])}; it has "
                             f"{', '.join(v.id for v in index.variants)}")
        entries, answer = [], []
        for v in variants:
            digest, manifest = await registry.resolve(v.ref)
            meta_bytes, _, _ = await _fetch(http, registry, token, digest, manifest, LAYER_META_FILE, None)
            meta = json.loads(meta_bytes)
            tmp = layout.blobs / f".{v.layer_sha256}.tmp"
            _, sha, size = await _fetch(http, registry, token, digest, manifest, LAYER_FILE, tmp)
            if sha != v.layer_sha256:
                tmp.unlink(missing_ok=True)
                raise IntegrityError(f"layer of {v.ref} hashes to sha256:{sha}, the index says "
                                     f"sha256:{v.layer_sha256}")
            os.replace(tmp, layout.blobs / sha)
            _, arch = parse_platform(v.platform)
            env = [f"{k}={':'.join('/' + p for p in paths)}" for k, paths in sorted(meta.get("env", {}).items())
                   if paths]
            annotations = {
                "org.opencontainers.image.ref.name": f"{tag}-{v.id}",
                "org.opencontainers.image.title": f"{index.name} {index.version} {v.id}",
                "org.opencontainers.image.version": index.version,
                f"{ANN_PREFIX}runtime": index.name, f"{ANN_PREFIX}accelerator": v.accelerator,
                f"{ANN_PREFIX}accelerator.version": v.accelerator_version, f"{ANN_PREFIX}platform": v.platform,
                f"{ANN_PREFIX}python.abi": v.python_abi, f"{ANN_PREFIX}artifact": v.ref,
            }
            platform = {"os": "linux", "architecture": ARCH.get(arch, arch)}
            # No "created" field: the same layer exports to the same image digest.
            config = layout.put(_json_bytes({
                **platform, "config": {"Env": env, "Labels": {k: a for k, a in annotations.items()
                                                               if k.startswith(ANN_PREFIX)}},
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha}"]}}))
            image = layout.put(_json_bytes({
                "schemaVersion": 2, "mediaType": MT_MANIFEST, "config": {"mediaType": MT_CONFIG, **config},
                "layers": [{"mediaType": MT_LAYER, "digest": f"sha256:{sha}", "size": size}],
                "annotations": annotations}))
            entries.append({"mediaType": MT_MANIFEST, **image, "platform": platform, "annotations": annotations})
            answer.append((annotations["org.opencontainers.image.ref.name"], image["digest"]))
        layout.finish(entries)
    return answer
