"""The runtime spec: a TOML file naming a runtime and its accelerator variants.  Pure data.

Example (``runtime_builder/specs/ort.toml`` is the full one)::

    [runtime]
    name = "ort"                        # the index is published as ort:<version>
    version = "1.31.1"
    python = "3.11"                     # target interpreter of every variant
    platform = "manylinux_2_28_x86_64"  # target wheel platform of every variant

    [[variant]]
    accelerator = "cpu"
    packages = ["onnxruntime==1.31.1"]

    [[variant]]
    accelerator = "cuda"
    accelerator_version = "13"          # the CUDA major its libraries need
    packages = ["onnxruntime-gpu[cuda,cudnn]==1.31.1"]

A variant may override ``python`` and ``platform``.  Each variant is installed with its
dependencies for its target, so its layer is self-contained.

A ``cuda`` variant must link the CUDA runtime of the major it names: after installing, the
build reads the ELF ``NEEDED`` entries of every shared library and refuses the variant when
none links ``libcudart.so.N`` ("variant cuda13: no library in onnxruntime==1.31.1 links the
CUDA runtime (libcudart.so.N); is this a CUDA build?") or when one links another major
("variant cuda12 says CUDA 12 but <lib> links libcudart.so.13; set accelerator_version =
"13" or pin a build for CUDA 12").  Such a layer would be chosen for the wrong nodes and
fail only there.  A build registers nothing unless every variant built.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from modelcast.errors import BadRequest, ModelcastError
from modelcast.reference import validate_name, validate_tag
from modelcast.runtime_index import parse_platform, python_abi_for, validate_accelerator, variant_id

# A pip requirement without URLs, paths or options: "name[extras]==1.2" and the like.
REQUIREMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?"
                            r"\s*([<>=!~]=?[^\s;@]+(,\s*[<>=!~]=?[^\s,;@]+)*)?$")


class InvalidSpec(BadRequest):
    """A runtime spec is not valid TOML or misses or mistypes a field."""

    code = "invalid_spec"


@dataclass(frozen=True)
class VariantSpec:
    """One accelerator build of the runtime: what to install, for which interpreter and platform."""

    accelerator: str
    accelerator_version: str
    packages: tuple[str, ...]
    python: str
    platform: str

    @property
    def id(self) -> str:
        return variant_id(self.accelerator, self.accelerator_version)

    @property
    def python_abi(self) -> str:
        return python_abi_for(self.python)


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    version: str
    variants: tuple[VariantSpec, ...]

    def variant(self, vid: str) -> VariantSpec:
        for v in self.variants:
            if v.id == vid:
                return v
        raise BadRequest(f"runtime {self.name} has no variant {vid!r}; it has {', '.join(v.id for v in self.variants)}")

    def layer_name(self, variant: VariantSpec) -> str:
        """The artifact name of a variant's layer: ``ort/cuda13``."""
        return f"{self.name}/{variant.id}"

    @classmethod
    def parse(cls, text: str, source: str = "spec") -> "RuntimeSpec":
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidSpec(f"{source}: not valid TOML: {exc}") from exc
        rt = doc.get("runtime")
        if not isinstance(rt, dict):
            raise InvalidSpec(f"{source}: needs a [runtime] table with name, version, python and platform")

        def text_field(table: dict, key: str, where: str, default: str | None = None) -> str:
            value = table.get(key, default)
            if not isinstance(value, str) or (not value and default is None):
                raise InvalidSpec(f"{source}: {where} needs a string field {key!r}")
            return value

        try:
            name = validate_name(text_field(rt, "name", "[runtime]"))
            version = validate_tag(text_field(rt, "version", "[runtime]"))
            python = text_field(rt, "python", "[runtime]")
            platform = text_field(rt, "platform", "[runtime]")
            raw_variants = doc.get("variant")
            if not isinstance(raw_variants, list) or not raw_variants:
                raise InvalidSpec(f"{source}: needs at least one [[variant]] table")
            variants = []
            for i, v in enumerate(raw_variants, 1):
                where = f"[[variant]] #{i}"
                if not isinstance(v, dict):
                    raise InvalidSpec(f"{source}: {where} must be a table")
                unknown = set(v) - {"accelerator", "accelerator_version", "packages", "python", "platform"}
                if unknown:
                    raise InvalidSpec(f"{source}: {where} has unknown fields {sorted(unknown)}")
                accel = text_field(v, "accelerator", where)
                accel_version = str(v.get("accelerator_version", ""))
                validate_accelerator(accel, accel_version, where=where)
                packages = v.get("packages")
                if (not isinstance(packages, list) or not packages
                        or not all(isinstance(p, str) and REQUIREMENT_RE.match(p.strip()) for p in packages)):
                    raise InvalidSpec(f"{source}: {where} needs packages = [\"name==version\", ...] "
                                      "(plain requirements: no URLs, paths or pip options)")
                spec = VariantSpec(accelerator=accel, accelerator_version=accel_version,
                                   packages=tuple(p.strip() for p in packages),
                                   python=text_field(v, "python", where, python),
                                   platform=text_field(v, "platform", where, platform))
                python_abi_for(spec.python)
                parse_platform(spec.platform)
                variants.append(spec)
        except InvalidSpec:
            raise
        except ModelcastError as exc:
            raise InvalidSpec(f"{source}: {exc}") from exc
        keys = [(v.id, v.python, v.platform) for v in variants]
        if len(set(keys)) != len(keys):
            raise InvalidSpec(f"{source}: two variants share accelerator, python and platform")
        return cls(name=name, version=version, variants=tuple(variants))

    @classmethod
    def load(cls, path: Path) -> "RuntimeSpec":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidSpec(f"cannot read runtime spec {path}: {exc.strerror or exc}") from exc
        return cls.parse(text, str(path))
