"""Install a variant's packages for its target platform and pack them as a reproducible layer.

A layer is an uncompressed tar whose single top folder is ``site-packages/``: what
``pip install --target`` produced for the variant's platform and Python, dependencies
included, so the layer is self-contained.  Reproducible: entries sorted by path, every
timestamp ``SOURCE_DATE_EPOCH`` (0 by default), owner 0:0 with empty names, modes 0644 or
0755, and pip's run-dependent byproducts removed, so the same wheels give the same bytes.

Uncompressed, because wheels are already zip-compressed on the index but their contents
(shared libraries) are what the node needs: gzip would cost more CPU on every node than it
saves on a LAN, and the piece hashes already guard the bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from struct import error as struct_error
import time
from dataclasses import dataclass
from pathlib import Path

from modelcast.errors import ModelcastError
from modelcast.manifest import canonical_json
from modelcast.runtime_index import LAYER_FILE, LAYER_META_FILE, compatible_platforms

from .elf import NotElf, needed_libraries
from .spec import RuntimeSpec, VariantSpec

SITE = "site-packages"
LAYER_SCHEMA_VERSION = 1
# pip writes these per run (installer name, the "requested" marker, a source URL): they
# would make two builds of the same wheels differ, and a read-only layer needs none of them.
RUN_BYPRODUCTS = ("INSTALLER", "REQUESTED", "direct_url.json")


class BuildFailed(ModelcastError, RuntimeError):
    """A variant could not be installed or packed."""

    code = "build_failed"
    http_status = 500


@dataclass(frozen=True)
class BuiltLayer:
    """A variant's layer artifact directory (``layer.tar`` + ``layer.json``) and its figures."""

    variant: VariantSpec
    path: Path  # the artifact directory
    sha256: str  # hex sha256 of layer.tar (the OCI diff_id)
    size: int
    packages: tuple[str, ...]
    env: dict
    install_s: float
    pack_s: float

    @property
    def tar(self) -> Path:
        return self.path / LAYER_FILE


def pip_install(variant: VariantSpec, target: Path, *, wheelhouse: Path | None, timeout_s: float) -> None:
    """Install ``variant.packages`` with dependencies into ``target`` for the variant's platform.

    ``--platform``/``--python-version``/``--only-binary=:all:`` let a CPU machine install
    the CUDA and CANN builds.  With a wheelhouse pip runs ``--isolated --no-index``: only
    those wheels, no network, no pip configuration of this machine.
    """
    platforms = [arg for tag in compatible_platforms(variant.platform) for arg in ("--platform", tag)]
    argv = [sys.executable, "-m", "pip", "install", "--target", str(target), *platforms,
            "--python-version", variant.python, "--implementation", "cp", "--abi", variant.python_abi,
            "--only-binary=:all:", "--no-compile", "--disable-pip-version-check", "--no-warn-script-location",
            "--quiet"]
    if wheelhouse is not None:
        if not Path(wheelhouse).is_dir():
            raise BuildFailed(f"wheelhouse {wheelhouse} is not a directory")
        argv += ["--isolated", "--no-index", "--find-links", str(wheelhouse)]
    argv += list(variant.packages)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise BuildFailed(f"pip install of {' '.join(variant.packages)} for {variant.id} took over "
                          f"{timeout_s:.0f} s") from exc
    if out.returncode != 0:
        tail = pip_error(out.stderr)
        where = f"wheelhouse {wheelhouse}" if wheelhouse else "the package index"
        raise BuildFailed(f"pip could not install {' '.join(variant.packages)} for variant {variant.id} "
                          f"({variant.python_abi}, {variant.platform}) from {where}: {tail}")


def pip_error(stderr: str) -> str:
    """The lines of pip's stderr that say why it failed, as one line.

    pip prints its ``ERROR:`` lines last, after whatever ``WARNING:`` lines this machine's
    setup provokes (running as root, an unwritable cache, …); those say nothing about the
    spec, so only the errors are kept.  Without an ``ERROR:`` line (pip crashed), the last
    lines that are not warnings.
    """
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln[len("ERROR:"):].strip() for ln in lines if ln.startswith("ERROR:")]
    if errors:
        return "; ".join(dict.fromkeys(errors))
    kept = [ln for ln in lines if not ln.startswith(("WARNING:", "DEPRECATION:", "[notice]"))]
    return " | ".join(kept[-8:]) or "pip exited with an error and printed no reason"


def normalize_tree(site: Path) -> None:
    """Remove what differs between two installs of the same wheels, or what a layer must not hold."""
    # Console scripts carry the building interpreter's path in their #! line.
    shutil.rmtree(site / "bin", ignore_errors=True)
    for dirpath, dirnames, filenames in os.walk(site):
        if "__pycache__" in dirnames:
            shutil.rmtree(Path(dirpath) / "__pycache__")
            dirnames.remove("__pycache__")
        for name in filenames:
            if name.endswith(".pyc"):
                os.unlink(Path(dirpath) / name)
    for info in site.glob("*.dist-info"):
        removed = {f"{info.name}/{name}" for name in RUN_BYPRODUCTS}
        for name in RUN_BYPRODUCTS:
            (info / name).unlink(missing_ok=True)
        record = info / "RECORD"
        if record.exists():
            # Keep RECORD true to the layer: drop the scripts (../../bin/...) and byproducts.
            lines = record.read_text(encoding="utf-8").splitlines()
            kept = [ln for ln in lines if not ln.startswith("../") and ln.split(",", 1)[0] not in removed]
            record.write_text("\n".join(kept) + "\n", encoding="utf-8")


def installed_packages(site: Path) -> tuple[str, ...]:
    """``("numpy==2.4.6", "onnxruntime==1.31.1", ...)`` from the dist-info folders."""
    out = []
    for info in sorted(site.glob("*.dist-info")):
        name, _, version = info.name[: -len(".dist-info")].rpartition("-")
        out.append(f"{name.replace('_', '-').lower()}=={version}")
    return tuple(sorted(out))


def library_dirs(site: Path) -> list[str]:
    """Folders (relative to the layer root) holding shared libraries loaded by name.

    ``libcudart.so.13``, ``libonnxruntime.so.1.31.1``: the NVIDIA wheels' ``lib/`` folders and
    onnxruntime's ``capi/``.  Python extension modules (``*.cpython-311-*.so``) are found
    through ``sys.path`` and need no entry.
    """
    dirs = set()
    for dirpath, _, filenames in os.walk(site):
        if any(n.startswith("lib") and (n.endswith(".so") or ".so." in n) for n in filenames):
            dirs.add(Path(dirpath).relative_to(site.parent).as_posix())
    return sorted(dirs)


def cuda_majors_linked(site: Path) -> dict[str, str]:
    """``{library: CUDA major}`` for each shared library in ``site`` that links ``libcudart.so.<major>``."""
    found = {}
    for dirpath, _, filenames in os.walk(site):
        for name in filenames:
            if name.startswith("lib") and (name.endswith(".so") or ".so." in name):
                path = Path(dirpath) / name
                try:
                    with open(path, "rb") as f:
                        needed = needed_libraries(f)
                except (NotElf, OSError, struct_error):
                    continue
                for lib in needed:
                    if lib.startswith("libcudart.so."):
                        found[path.relative_to(site).as_posix()] = lib.split(".")[2]
    return found


def check_cuda_major(variant: VariantSpec, site: Path) -> None:
    """Fail a cuda variant whose libraries link another CUDA major than the spec names.

    Such a layer would be chosen for the wrong nodes and fail only there, on a GPU.
    """
    if variant.accelerator != "cuda":
        return
    linked = cuda_majors_linked(site)
    wrong = {lib: major for lib, major in linked.items() if major != variant.accelerator_version}
    if not linked:
        raise BuildFailed(f"variant {variant.id}: no library in {' '.join(variant.packages)} links the CUDA "
                          "runtime (libcudart.so.N); is this a CUDA build?")
    if wrong:
        lib, major = sorted(wrong.items())[0]
        raise BuildFailed(f"variant {variant.id} says CUDA {variant.accelerator_version} but {lib} links "
                          f"libcudart.so.{major}; set accelerator_version = \"{major}\" or pin a build for CUDA "
                          f"{variant.accelerator_version}")


def write_layer(root: Path, out: Path, mtime: int) -> tuple[str, int]:
    """Write ``root/site-packages`` as a reproducible tar at ``out``; return (sha256 hex, size)."""
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root / SITE):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            entries.append((p.relative_to(root).as_posix(), p))
    entries.append((SITE, root / SITE))
    entries.sort(key=lambda e: e[0].encode("utf-8"))
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in entries:
            st = os.lstat(path)
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if os.path.isdir(path) and not os.path.islink(path):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif os.path.isfile(path) and not os.path.islink(path):
                info.size = st.st_size
                info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                # Wheels cannot hold links or special files; one here means something else wrote it.
                raise BuildFailed(f"{name} is a link or special file; a layer holds only files and folders")
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    size = tmp.stat().st_size
    os.replace(tmp, out)
    return h.hexdigest(), size


def build_variant(spec: RuntimeSpec, variant: VariantSpec, out_dir: Path, *, wheelhouse: Path | None = None,
                  source_date_epoch: int = 0, timeout_s: float = 1800.0) -> BuiltLayer:
    """Install and pack one variant into ``out_dir/<variant id>/`` (``layer.tar``, ``layer.json``)."""
    art = Path(out_dir) / variant.id
    work = Path(out_dir) / f".work-{variant.id}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(art, ignore_errors=True)
    art.mkdir(parents=True)
    try:
        t0 = time.monotonic()
        pip_install(variant, work / SITE, wheelhouse=wheelhouse, timeout_s=timeout_s)
        normalize_tree(work / SITE)
        check_cuda_major(variant, work / SITE)
        t1 = time.monotonic()
        sha, size = write_layer(work, art / LAYER_FILE, source_date_epoch)
        packages = installed_packages(work / SITE)
        env = {"PYTHONPATH": [SITE], "LD_LIBRARY_PATH": library_dirs(work / SITE)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "schema_version": LAYER_SCHEMA_VERSION, "runtime": spec.name, "version": spec.version,
        "variant": variant.id, "accelerator": variant.accelerator,
        "accelerator_version": variant.accelerator_version, "platform": variant.platform,
        "python": variant.python, "python_abi": variant.python_abi, "requirements": list(variant.packages),
        "packages": list(packages), "layer": {"file": LAYER_FILE, "sha256": sha, "size": size},
        # Paths relative to the unpacked layer; a node makes them absolute (node_cache/runtime.py).
        "env": env,
    }
    (art / LAYER_META_FILE).write_bytes(canonical_json(meta) + b"\n")
    return BuiltLayer(variant=variant, path=art, sha256=sha, size=size, packages=packages, env=env,
                      install_s=t1 - t0, pack_s=time.monotonic() - t1)
