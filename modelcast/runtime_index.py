"""Runtime index, accelerators and variant choice: pure data and pure functions, no I/O.

A runtime (say ``ort:1.31.1``) is built once per accelerator.  Each build is a layer
artifact of kind ``runtime``; a ``runtime-index`` artifact lists them, each with its
accelerator (``cpu``, ``cuda`` + CUDA major, ``cann`` + CANN version), platform tag,
Python ABI and layer digest: an OCI image index with the accelerator as one more
dimension.  A node picks the variant that fits its hardware with :func:`choose_variant`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import ArtifactNotFound, InvalidManifest
from .manifest import canonical_json
from .reference import validate_digest, validate_name, validate_tag

INDEX_SCHEMA_VERSION = 1
INDEX_FILE = "index.json"  # the one file of a runtime-index artifact
LAYER_FILE = "layer.tar"  # a runtime artifact: the layer ...
LAYER_META_FILE = "layer.json"  # ... and what it holds and how to activate it
ACCELERATORS = ("cpu", "cuda", "cann")
ABI_RE = re.compile(r"^cp3\d{1,2}$")
PLATFORM_RE = re.compile(r"^(manylinux_(\d+)_(\d+)|manylinux(1|2010|2014)|linux)_([a-z0-9_]+)$")
_LEGACY_MANYLINUX = {"1": (2, 5), "2010": (2, 12), "2014": (2, 17)}
# Annotations a runtime layer artifact carries (the index repeats them per variant).
ANN_RUNTIME = "runtime"
ANN_VERSION = "version"
ANN_ACCELERATOR = "accelerator"
ANN_ACCELERATOR_VERSION = "accelerator_version"
ANN_PLATFORM = "platform"
ANN_PYTHON_ABI = "python_abi"
ANN_LAYER_SHA256 = "layer_sha256"


class NoMatchingVariant(ArtifactNotFound):
    """No variant of a runtime index fits this node's accelerator, Python or platform."""


def variant_id(accelerator: str, accelerator_version: str = "") -> str:
    """``cpu``, ``cuda13``, ``cann8.0``: the short name of a variant (and of its layer artifact)."""
    return accelerator if accelerator == "cpu" else f"{accelerator}{accelerator_version}"


def validate_accelerator(accelerator: str, version: str, *, where: str) -> None:
    if accelerator not in ACCELERATORS:
        raise InvalidManifest(f"{where}: accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    if accelerator == "cpu" and version:
        raise InvalidManifest(f"{where}: a cpu variant has no accelerator version (got {version!r})")
    if accelerator == "cuda" and not re.fullmatch(r"\d{1,3}", version or ""):
        raise InvalidManifest(f"{where}: a cuda variant needs its CUDA major version, e.g. \"12\" (got {version!r})")
    if accelerator == "cann" and not re.fullmatch(r"\d+(\.[0-9A-Za-z]+)*", version or ""):
        raise InvalidManifest(f"{where}: a cann variant needs its CANN version, e.g. \"8.0\" (got {version!r})")


def parse_platform(tag: str) -> tuple[tuple[int, int] | None, str]:
    """``manylinux_2_28_x86_64`` -> ((2, 28), "x86_64"); ``linux_x86_64`` -> (None, "x86_64")."""
    m = PLATFORM_RE.match(tag or "")
    if not m:
        raise InvalidManifest(f"platform {tag!r} is not a Linux wheel platform tag such as manylinux_2_28_x86_64")
    if m.group(2):
        glibc: tuple[int, int] | None = (int(m.group(2)), int(m.group(3)))
    elif m.group(4):
        glibc = _LEGACY_MANYLINUX[m.group(4)]
    else:
        glibc = None
    return glibc, m.group(5)


def compatible_platforms(tag: str) -> list[str]:
    """Every wheel platform tag a ``tag`` machine runs, newest first (for ``pip --platform``).

    pip takes ``--platform manylinux_2_28_x86_64`` literally and would refuse a wheel tagged
    only ``manylinux2014_x86_64`` (glibc 2.17), which runs on that machine just as well.
    """
    glibc, arch = parse_platform(tag)
    if glibc is None or glibc[0] != 2:
        return [tag]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc[1], 4, -1)]
    tags += [f"manylinux{alias}_{arch}" for alias, need in sorted(_LEGACY_MANYLINUX.items(), key=lambda kv: kv[1],
                                                                   reverse=True) if need <= glibc]
    return tags


def python_abi_for(version: str) -> str:
    """``"3.11"`` -> ``"cp311"``."""
    m = re.fullmatch(r"3\.(\d{1,2})", version or "")
    if not m:
        raise InvalidManifest(f"python version {version!r} is not 3.N")
    return f"cp3{m.group(1)}"


@dataclass(frozen=True)
class Accelerator:
    """What a node has: ``cpu``, ``cuda`` (version: highest CUDA major its driver runs) or ``cann``.

    ``version`` is empty when the device is there but its version could not be read.
    """

    kind: str = "cpu"
    version: str = ""
    devices: int = 0
    driver: str = ""
    source: str = ""  # how it was found, for messages

    def describe(self) -> str:
        if self.kind == "cpu":
            return "no accelerator (cpu)"
        what = {"cuda": "NVIDIA GPU", "cann": "Ascend NPU"}[self.kind]
        parts = [f"{self.devices} {what}{'s' if self.devices != 1 else ''}" if self.devices else what]
        if self.driver:
            parts.append(f"driver {self.driver}")
        if self.kind == "cuda":
            parts.append(f"CUDA up to {self.version}" if self.version else "CUDA version unknown")
        else:
            parts.append(f"CANN {self.version}" if self.version else "CANN version unknown")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {"kind": self.kind, "version": self.version, "devices": self.devices, "driver": self.driver,
                "source": self.source, "description": self.describe()}


@dataclass(frozen=True)
class NodeTarget:
    """The interpreter and OS that will run the layer: Python ABI, glibc version, machine."""

    python_abi: str
    glibc: tuple[int, int] | None
    machine: str

    def describe(self) -> str:
        libc = f"glibc {self.glibc[0]}.{self.glibc[1]}" if self.glibc else "no glibc"
        return f"{self.python_abi}, {libc}, {self.machine}"

    def runs(self, platform: str) -> bool:
        """True if a layer built for ``platform`` runs here (manylinux rules: glibc at least as new)."""
        need, arch = parse_platform(platform)
        if arch != self.machine:
            return False
        if need is None:  # plain linux_<arch>: built on a machine like this one
            return True
        return self.glibc is not None and self.glibc >= need


@dataclass(frozen=True)
class Variant:
    """One build of a runtime: its accelerator, platform and ABI, and its layer artifact."""

    accelerator: str
    accelerator_version: str
    platform: str
    python_abi: str
    name: str  # layer artifact name, e.g. "ort/cuda13"
    digest: str  # layer artifact digest
    layer_sha256: str  # sha256 of layer.tar: the OCI diff_id
    size: int  # bytes of layer.tar

    def __post_init__(self) -> None:
        validate_accelerator(self.accelerator, self.accelerator_version, where=f"variant {self.name!r}")
        parse_platform(self.platform)
        if not ABI_RE.match(self.python_abi):
            raise InvalidManifest(f"variant {self.name!r}: python_abi must look like cp311, got {self.python_abi!r}")
        validate_name(self.name)
        validate_digest(self.digest)
        if not re.fullmatch(r"[0-9a-f]{64}", self.layer_sha256):
            raise InvalidManifest(f"variant {self.name!r}: layer_sha256 must be 64 lowercase hex digits")
        if not isinstance(self.size, int) or self.size < 0:
            raise InvalidManifest(f"variant {self.name!r}: size must be a non-negative integer")

    @property
    def id(self) -> str:
        return variant_id(self.accelerator, self.accelerator_version)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.digest}"

    def describe(self) -> str:
        return f"{self.id} ({self.python_abi}, {self.platform})"

    def to_json(self) -> dict:
        return {"accelerator": self.accelerator, "accelerator_version": self.accelerator_version,
                "platform": self.platform, "python_abi": self.python_abi, "name": self.name, "digest": self.digest,
                "layer_sha256": self.layer_sha256, "size": self.size, "id": self.id}


@dataclass(frozen=True)
class RuntimeIndex:
    """All the variants of one runtime version; published as ``index.json`` of a runtime-index artifact."""

    name: str
    version: str
    variants: tuple[Variant, ...]
    schema_version: int = INDEX_SCHEMA_VERSION

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_tag(self.version)
        if self.schema_version != INDEX_SCHEMA_VERSION:
            raise InvalidManifest(f"unsupported runtime index schema version {self.schema_version!r}")
        if not self.variants:
            raise InvalidManifest(f"runtime index {self.name}:{self.version} lists no variants")
        keys = [(v.id, v.python_abi, v.platform) for v in self.variants]
        if len(set(keys)) != len(keys):
            raise InvalidManifest(f"runtime index {self.name}:{self.version} lists a variant twice")

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "name": self.name, "version": self.version,
                "variants": [v.to_json() for v in sorted(self.variants, key=lambda v: (v.id, v.python_abi,
                                                                                        v.platform))]}

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def describe(self) -> str:
        return ", ".join(v.describe() for v in self.variants)

    @classmethod
    def from_json(cls, obj: Any) -> "RuntimeIndex":
        if not isinstance(obj, dict):
            raise InvalidManifest("runtime index must be a JSON object")
        try:
            variants = tuple(
                Variant(accelerator=v["accelerator"], accelerator_version=v.get("accelerator_version", ""),
                        platform=v["platform"], python_abi=v["python_abi"], name=v["name"], digest=v["digest"],
                        layer_sha256=v["layer_sha256"], size=v["size"])
                for v in obj["variants"])
            return cls(name=obj["name"], version=obj["version"], variants=variants,
                       schema_version=obj["schema_version"])
        except (KeyError, TypeError) as exc:
            raise InvalidManifest(f"runtime index is missing or mistypes a field: {exc}") from exc

    @classmethod
    def from_bytes(cls, data: bytes) -> "RuntimeIndex":
        try:
            return cls.from_json(json.loads(data.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidManifest(f"runtime index is not valid UTF-8 JSON: {exc}") from exc


def _version_key(version: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.]", version))


def _cann_fits(offered: str, node: str) -> bool:
    """CANN ``8.0`` fits a node with toolkit ``8.0.RC2``: the variant's version is a prefix of the node's."""
    o, n = offered.lower().split("."), node.lower().split(".")
    return n[:len(o)] == o


@dataclass(frozen=True)
class Choice:
    variant: Variant
    reason: str
    fallback: bool = False


def choose_variant(index: RuntimeIndex, accel: Accelerator, target: NodeTarget, *,
                   cpu_fallback: bool = True) -> Choice:
    """The variant of ``index`` that fits a node with ``accel`` running ``target``.

    On an NVIDIA node: the cuda variant with the highest CUDA major the driver runs.  On an
    Ascend node: the cann variant whose version matches the node's CANN toolkit (the
    newest, when the node's version is unknown).  With ``cpu_fallback`` an accelerator node
    with no fitting variant gets the cpu variant, and the choice says so.  Raises
    :class:`NoMatchingVariant` naming what the index offers and what the node has.
    """
    runnable = [v for v in index.variants if v.python_abi == target.python_abi and target.runs(v.platform)]
    best: Variant | None = None
    if accel.kind == "cuda":
        fits = [v for v in runnable if v.accelerator == "cuda"
                and (not accel.version or int(v.accelerator_version) <= int(accel.version))]
        best = max(fits, key=lambda v: int(v.accelerator_version), default=None)
    elif accel.kind == "cann":
        fits = [v for v in runnable if v.accelerator == "cann"
                and (not accel.version or _cann_fits(v.accelerator_version, accel.version))]
        best = max(fits, key=lambda v: _version_key(v.accelerator_version), default=None)
    if best is not None:
        return Choice(best, f"{best.id} fits {accel.describe()}")
    cpu = next((v for v in runnable if v.accelerator == "cpu"), None)
    if cpu is not None and (accel.kind == "cpu" or cpu_fallback):
        if accel.kind == "cpu":
            return Choice(cpu, "cpu variant for a node without accelerator")
        return Choice(cpu, f"no {accel.kind} variant fits {accel.describe()}; falling back to cpu", fallback=True)
    raise NoMatchingVariant(
        f"no variant of {index.name}:{index.version} fits this node: the index offers {index.describe()}; "
        f"the node has {accel.describe()} and runs {target.describe()}; build a matching variant "
        "(modelcast runtime build) or run it on a node that has one of those")
