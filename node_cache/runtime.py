"""Runtime layers on the node: detect the accelerator, pick a variant, unpack once, hand out the env.

``POST /v1/runtime/activate {"ref": "ort:1.31.1"}`` resolves the runtime index, picks the
variant that fits this node (:func:`modelcast.runtime_index.choose_variant`), pulls its
layer through the swarm like any artifact, unpacks it once into
``<cache>/layers/sha256/<hex>/`` (read-only, shared by every worker on the node) and
answers the environment that makes a fresh interpreter import the layer's packages::

    {"ref", "variant", "accelerator", "digest", "path", "env": {"PYTHONPATH", "LD_LIBRARY_PATH",
     "MODELCAST_RUNTIME_PATH", ...}, "node": {...}, "reason", "fallback"}

Path lists in ``env`` hold only the layer's folders: a caller prepends them to what the
process already has (serve_glue.spec.activation_env does).
``GET /v1/runtime/resolve?ref=`` only chooses (pulling the small index, not the layer), and
``GET /v1/runtime/accelerator`` says what the node has.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import platform
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from modelcast.errors import BadRequest, InvalidManifest, ModelcastError
from adapters.http import JsonClient
from adapters.http_server import MAX_JSON_BODY, read_json
from modelcast.runtime_index import (INDEX_FILE, LAYER_FILE, LAYER_META_FILE, Accelerator, Choice, NodeTarget,
                                     RuntimeIndex, Variant, choose_variant, variant_id)

from .unpack import unpack_tar

log = logging.getLogger("modelcast.node.runtime")

# Minimum Linux driver for each CUDA major (NVIDIA's CUDA toolkit / driver compatibility table).
CUDA_MIN_DRIVER = ((13, (580, 65)), (12, (525, 60)), (11, (450, 80)), (10, (410, 48)))
NVIDIA_VERSION_FILE = "proc/driver/nvidia/version"
ASCEND_DRIVER_FILE = "usr/local/Ascend/driver/version.info"
ASCEND_TOOLKIT_GLOB = "usr/local/Ascend/ascend-toolkit/latest/*/ascend_toolkit_install.info"


# ---- detection ------------------------------------------------------------------------------
def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cuda_major_for_driver(driver: str) -> str:
    """The highest CUDA major a Linux driver version runs: ``"580.65.06"`` -> ``"13"``."""
    nums = tuple(int(x) for x in re.findall(r"\d+", driver)[:2])
    for major, minimum in CUDA_MIN_DRIVER:
        if nums >= minimum:
            return str(major)
    return ""


def _nvml_cuda_version() -> tuple[str, int]:
    """(CUDA major, device count) from NVML, or ("", 0) when the library is not there."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return "", 0
        try:
            version, count = ctypes.c_int(0), ctypes.c_uint(0)
            if nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(version)) != 0:
                return "", 0
            nvml.nvmlDeviceGetCount_v2(ctypes.byref(count))
            return str(version.value // 1000), int(count.value)
        finally:
            nvml.nvmlShutdown()
    except (OSError, AttributeError):
        return "", 0


def detect_accelerator(root: Path = Path("/")) -> Accelerator:
    """What this node has.  ``root`` is where ``/proc``, ``/dev`` and ``/usr`` are (tests fake it).

    NVIDIA: ``/dev/nvidia<N>`` or the driver's ``/proc/driver/nvidia/version``; the CUDA major
    comes from NVML where it loads (real root only), else from the driver version.  Ascend:
    ``/dev/davinci<N>``; the CANN version from the toolkit's install info, the driver's from
    ``/usr/local/Ascend/driver/version.info``.  Otherwise cpu.
    """
    root = Path(root)
    gpus = [p for p in (root / "dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    nv_text = _read(root / NVIDIA_VERSION_FILE)
    if gpus or nv_text:
        m = re.search(r"Kernel Module(?: for [^ ]+)?\s+(\d+\.\d+(?:\.\d+)?)", nv_text)
        driver = m.group(1) if m else ""
        version, count, source = "", len(gpus), f"{root / NVIDIA_VERSION_FILE}" if nv_text else f"{root}/dev/nvidia*"
        if root == Path("/"):
            version, nvml_count = _nvml_cuda_version()
            if version:
                count, source = nvml_count or count, "NVML"
        if not version and driver:
            version = cuda_major_for_driver(driver)
        return Accelerator("cuda", version, count, driver, source)
    npus = [p for p in (root / "dev").glob("davinci*") if re.fullmatch(r"davinci\d+", p.name)]
    if npus:
        driver = ""
        m = re.search(r"^\s*Version\s*=\s*(\S+)", _read(root / ASCEND_DRIVER_FILE), re.M | re.I)
        if m:
            driver = m.group(1)
        version = ""
        for info in sorted(root.glob(ASCEND_TOOLKIT_GLOB)):
            m = re.search(r"^\s*version\s*=\s*(\S+)", _read(info), re.M | re.I)
            if m:
                version = m.group(1)
                break
        return Accelerator("cann", version, len(npus), driver, f"{root}/dev/davinci*")
    return Accelerator("cpu", source="no NVIDIA or Ascend device")


def this_interpreter() -> NodeTarget:
    """The Python ABI, glibc and machine of the running interpreter (the node's workers use the same)."""
    libc, version = platform.libc_ver()
    glibc = tuple(int(x) for x in version.split(".")[:2]) if libc == "glibc" and version else None
    return NodeTarget(f"cp{sys.version_info[0]}{sys.version_info[1]}", glibc, platform.machine())


# ---- unpacking --------------------------------------------------------------------------------
def layers_dir(cache_root: Path) -> Path:
    return Path(cache_root) / "layers" / "sha256"


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(p, 0o555 if st.st_mode & 0o111 else 0o444)
        os.chmod(dirpath, 0o555)


UNPACKED_RECORD = ".modelcast-unpacked.json"  # in the layer's folder: {"bytes", "files"}, written before the rename


def layer_path(cache_root: Path, digest: str) -> Path:
    return layers_dir(cache_root) / digest.split(":", 1)[1]


def unpack_reserve(artifact_dir: Path) -> int:
    """An upper bound of a layer's unpacked bytes, known before unpacking: a tar stores every byte of its files."""
    return sum(os.stat(Path(artifact_dir) / name).st_size for name in (LAYER_FILE, LAYER_META_FILE)) + 4096


def unpack_layer(artifact_dir: Path, cache_root: Path, digest: str) -> Path:
    """Unpack a runtime artifact's ``layer.tar`` once into ``layers/sha256/<hex>/``; return that path.

    Unpacking goes to a unique staging folder beside the destination, is fsynced and made
    read-only, then renamed into place: a crash never leaves a half-unpacked layer that
    looks complete, and two racing unpackers both end with the same complete folder.
    The unpacked size is recorded in the staging folder (:data:`UNPACKED_RECORD`) before
    the rename, so a complete layer always has its size; a staging folder a crash left
    behind is removed at the next start (:func:`scan_layers`).
    Members are checked one by one (:mod:`node_cache.unpack`): plain files and folders with
    safe names only, never written through a link; anything else is an IntegrityError and
    leaves nothing behind.
    """
    hexd = digest.split(":", 1)[1]
    dest = layers_dir(cache_root) / hexd
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f"{STAGING_PREFIX}{hexd}-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        written = unpack_tar(Path(artifact_dir) / LAYER_FILE, staging, f"cannot unpack the layer of {digest}",
                             reserved=frozenset({LAYER_META_FILE, UNPACKED_RECORD}))
        shutil.copyfile(Path(artifact_dir) / LAYER_META_FILE, staging / LAYER_META_FILE)
        written += (staging / LAYER_META_FILE).stat().st_size
        files = sum(len(names) for _, _, names in os.walk(staging))
        (staging / UNPACKED_RECORD).write_text(json.dumps({"bytes": written, "files": files}), encoding="utf-8")
        _make_read_only(staging)
        _fsync_dir(staging)
        try:
            os.rename(staging, dest)
        except OSError:
            if not dest.is_dir():  # not "someone else finished first"
                raise
        _fsync_dir(dest.parent)
    finally:
        if staging.exists():
            _remove_read_only(staging)
    return dest


STAGING_PREFIX = ".staging-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_read_only(path: Path) -> None:
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def unpacked_bytes(path: Path) -> int:
    """The unpacked size of the layer at ``path``: its record, or (a layer unpacked before records) a walk."""
    try:
        record = json.loads((Path(path) / UNPACKED_RECORD).read_text(encoding="utf-8"))
        if isinstance(record, dict) and isinstance(record.get("bytes"), int) and record["bytes"] >= 0:
            return record["bytes"]
    except (OSError, ValueError):
        pass
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def scan_layers(cache_root: Path) -> dict[str, int]:
    """Start-up: ``{digest: unpacked bytes}`` of every complete layer; staging folders a crash left are removed."""
    found: dict[str, int] = {}
    root = layers_dir(cache_root)
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        if entry.name.startswith(STAGING_PREFIX):
            log.warning("removing %s: a layer whose unpacking did not finish", entry)
            _remove_read_only(entry)
        elif re.fullmatch(r"[0-9a-f]{64}", entry.name) and entry.is_dir() and not entry.is_symlink():
            found["sha256:" + entry.name] = unpacked_bytes(entry)
    return found


def remove_layer(cache_root: Path, trash_dir: Path, digest: str) -> bool:
    """Delete an unpacked layer: rename it into ``trash_dir`` (it is no longer complete), then delete it."""
    src = layer_path(cache_root, digest)
    trash = Path(trash_dir) / f"layer-{src.name}.{time.time_ns()}"
    try:
        os.rename(src, trash)
    except FileNotFoundError:
        return False
    _remove_read_only(trash)
    return True


def read_layer_meta(path: Path) -> dict:
    try:
        meta = json.loads((Path(path) / LAYER_META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidManifest(f"runtime layer at {path} has no readable {LAYER_META_FILE}: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("env"), dict):
        raise InvalidManifest(f"runtime layer at {path}: {LAYER_META_FILE} has no \"env\" object")
    return meta


def activation_env(layer: Path, meta: dict, digest: str) -> dict[str, str]:
    """The environment that makes a fresh interpreter use the layer at ``layer``."""
    env: dict[str, str] = {}
    for key, rels in sorted(meta["env"].items()):
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key) or not isinstance(rels, list):
            raise InvalidManifest(f"runtime layer {digest}: bad env entry {key!r}")
        paths = []
        for rel in rels:
            p = (layer / rel).resolve()
            if not isinstance(rel, str) or not p.is_relative_to(layer.resolve()):
                raise InvalidManifest(f"runtime layer {digest}: env path {rel!r} leaves the layer")
            paths.append(str(p))
        if paths:
            env[key] = ":".join(paths)
    env["MODELCAST_RUNTIME_PATH"] = str(layer)
    env["MODELCAST_RUNTIME_DIGEST"] = digest
    env["MODELCAST_RUNTIME_VARIANT"] = variant_id(str(meta.get("accelerator", "cpu")),
                                                  str(meta.get("accelerator_version", "")))
    return env


# ---- the daemon side ------------------------------------------------------------------------
class RuntimeActivator:
    """Activation on one node daemon: uses only its ``pull``, ``cfg`` and ``store``."""

    def __init__(self, daemon):
        self.daemon = daemon
        self._locks: dict[str, asyncio.Lock] = {}

    async def _warm(self, ref: str):
        """Pull ``ref`` through the daemon's swarm machinery and wait until it is verified."""
        job = await self.daemon.pull(ref)
        await job.wait()
        if job.state != "ready":
            raise job.error or ModelcastError(f"pull of {ref} did not finish")
        return job

    async def choose(self, ref: str, python_abi: str | None = None) -> tuple[Choice, Accelerator, str]:
        """Pick the variant for this node; returns (choice, accelerator, ref of the layer)."""
        target = this_interpreter()
        if python_abi:
            if not re.fullmatch(r"cp3\d{1,2}", python_abi):
                raise BadRequest(f"python_abi {python_abi!r} is not like cp311")
            target = NodeTarget(python_abi, target.glibc, target.machine)
        accel = await asyncio.to_thread(detect_accelerator, self.daemon.cfg.accel_root)
        job = await self._warm(ref)
        manifest = job.manifest
        if manifest.kind == "runtime-index":
            data = await asyncio.to_thread((Path(job.path) / INDEX_FILE).read_bytes)
            index = RuntimeIndex.from_bytes(data)
        elif manifest.kind == "runtime":
            # A single layer named directly: it is its own one-variant index.
            a = manifest.annotations
            index = RuntimeIndex(manifest.name, a.get("version", "direct"), (Variant(
                accelerator=a.get("accelerator", "cpu"), accelerator_version=a.get("accelerator_version", ""),
                platform=a.get("platform", ""), python_abi=a.get("python_abi", ""), name=manifest.name,
                digest=job.digest, layer_sha256=a.get("layer_sha256", "0" * 64), size=manifest.total_size),))
        else:
            raise BadRequest(f"{ref} is a {manifest.kind} artifact, not a runtime or runtime index")
        choice = choose_variant(index, accel, target)
        if choice.fallback:
            log.warning("runtime %s: %s", ref, choice.reason)
        return choice, accel, choice.variant.ref

    async def activate(self, ref: str, python_abi: str | None = None) -> dict:
        choice, accel, layer_ref = await self.choose(ref, python_abi)
        job = await self._warm(layer_ref)
        if job.manifest.kind != "runtime":
            raise InvalidManifest(f"{layer_ref} listed by {ref} is a {job.manifest.kind} artifact, not a runtime")
        lock = self._locks.setdefault(job.digest, asyncio.Lock())
        async with lock:
            # Room in the quota first (the unpacked tree counts with its artifact), then unpack.
            path = await self.daemon.upkeep.unpack_layer(job)
        meta = await asyncio.to_thread(read_layer_meta, path)
        return {"ref": ref, "variant": choice.variant.id, "accelerator": choice.variant.accelerator,
                "digest": job.digest, "path": str(path), "env": activation_env(path, meta, job.digest),
                "node": accel.to_json(), "reason": choice.reason, "fallback": choice.fallback,
                "packages": meta.get("packages", [])}


def add_runtime_routes(app: web.Application, daemon_key: web.AppKey) -> None:
    """Register ``/v1/runtime/*`` on a node daemon's app; the daemon is ``app[daemon_key]``."""

    made: list[RuntimeActivator] = []

    def activator(request: web.Request) -> RuntimeActivator:
        # Made on first use: the daemon enters the app in its cleanup_ctx, after the routes.
        if not made:
            made.append(RuntimeActivator(request.app[daemon_key]))
        return made[0]

    async def body_of(request: web.Request) -> dict:
        example = '{"ref": "name:tag", "python_abi": "cp311"}'
        body = await read_json(request, MAX_JSON_BODY, "request body", example)
        if not isinstance(body, dict) or not isinstance(body.get("ref"), str):
            raise BadRequest(f'body needs a string field "ref": {example}')
        return body

    async def handle_activate(request: web.Request) -> web.Response:
        body = await body_of(request)
        return web.json_response(await activator(request).activate(body["ref"], body.get("python_abi")))

    async def handle_resolve(request: web.Request) -> web.Response:
        ref = request.query.get("ref")
        if not ref:
            raise BadRequest("runtime resolve needs ?ref=NAME:TAG")
        choice, accel, layer_ref = await activator(request).choose(ref, request.query.get("python_abi"))
        return web.json_response({"ref": ref, "variant": choice.variant.id, "layer": layer_ref,
                                  "digest": choice.variant.digest, "size": choice.variant.size,
                                  "node": accel.to_json(), "reason": choice.reason, "fallback": choice.fallback})

    async def handle_accelerator(request: web.Request) -> web.Response:
        accel = await asyncio.to_thread(detect_accelerator, request.app[daemon_key].cfg.accel_root)
        return web.json_response({**accel.to_json(), "target": this_interpreter().describe()})

    app.router.add_post("/v1/runtime/activate", handle_activate)
    app.router.add_get("/v1/runtime/resolve", handle_resolve)
    app.router.add_get("/v1/runtime/accelerator", handle_accelerator)


# ---- client ---------------------------------------------------------------------------------
class RuntimeClient(JsonClient):
    """The runtime part of a node daemon's API (the CLI uses it; serve_glue has its own)."""

    service = "node daemon"

    async def activate(self, ref: str, python_abi: str | None = None) -> dict:
        body = {"ref": ref, **({"python_abi": python_abi} if python_abi else {})}
        # Lasts as long as the layer's download: no client-side timeout.
        return await self.request("POST", "/v1/runtime/activate", json=body, what=f"activate runtime {ref}",
                                  timeout_s=None)

    async def resolve(self, ref: str) -> dict:
        return await self.request("GET", f"/v1/runtime/resolve?ref={quote(ref, safe='')}",
                                  what=f"resolve runtime {ref}", timeout_s=None)

    async def accelerator(self) -> dict:
        return await self.request("GET", "/v1/runtime/accelerator", what="node accelerator")
