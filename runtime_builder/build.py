"""``modelcast runtime build``: build every variant of a spec, publish each layer, then the index."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from distributor.publish import publish
from modelcast.config import PublishConfig, RuntimeBuildConfig
from modelcast.errors import ModelcastError
from modelcast.reference import Reference, validate_tag
from modelcast.runtime_index import (ANN_ACCELERATOR, ANN_ACCELERATOR_VERSION, ANN_LAYER_SHA256, ANN_PLATFORM,
                                     ANN_PYTHON_ABI, ANN_RUNTIME, ANN_VERSION, INDEX_FILE, RuntimeIndex, Variant)
from tracker.client import RegistryClient

from .layer import BuildFailed, BuiltLayer, build_variant
from .spec import RuntimeSpec

log = logging.getLogger("modelcast.runtime")


@dataclass(frozen=True)
class PublishedVariant:
    layer: BuiltLayer
    variant: Variant  # as listed in the index
    publish_s: float


@dataclass(frozen=True)
class BuildResult:
    ref: str  # name:tag of the index
    digest: str  # of the runtime-index artifact
    index: RuntimeIndex
    variants: tuple[PublishedVariant, ...]
    seconds: float


def layer_annotations(spec: RuntimeSpec, layer: BuiltLayer) -> dict[str, str]:
    v = layer.variant
    return {ANN_RUNTIME: spec.name, ANN_VERSION: spec.version, ANN_ACCELERATOR: v.accelerator,
            ANN_ACCELERATOR_VERSION: v.accelerator_version, ANN_PLATFORM: v.platform, ANN_PYTHON_ABI: v.python_abi,
            ANN_LAYER_SHA256: layer.sha256}


async def build_and_publish(spec: RuntimeSpec, cfg: RuntimeBuildConfig, *, tag: str | None = None,
                            only: list[str] | None = None, report=None) -> BuildResult:
    """Build each variant (or those in ``only``), publish each as kind ``runtime``, then the index.

    All or nothing: every variant is built first and nothing is registered unless all of
    them built; if registering fails part way, the artifacts this build added are deleted
    again.  Layers are published as ``<name>/<variant id>:<tag>`` (``ort/cuda13:1.31.1``);
    the index as ``<name>:<tag>``.  ``report`` is called with a line per finished step.
    """
    t0 = time.monotonic()
    tag = validate_tag(tag or spec.version)
    variants = [spec.variant(v) for v in only] if only else list(spec.variants)
    pub_cfg = PublishConfig(registry=cfg.registry, origin=cfg.origin, s3_endpoint=cfg.s3_endpoint, token=cfg.token,
                            ca=cfg.ca)
    out_dir = cfg.out_dir or Path(tempfile.mkdtemp(prefix="modelcast-runtime-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    say = report or (lambda line: log.info("%s", line))
    async with RegistryClient(cfg.registry, cfg.token, ca=cfg.ca) as registry:
        # A wrong token or a dead registry should fail now, not after minutes of pip.
        await registry.check_write_access(f"runtime build {spec.name}:{tag}")
    try:
        layers = []
        for vs in variants:
            try:
                layers.append(await asyncio.to_thread(build_variant, spec, vs, out_dir, wheelhouse=cfg.wheelhouse,
                                                      source_date_epoch=cfg.source_date_epoch,
                                                      timeout_s=cfg.pip_timeout_s))
            except BuildFailed as exc:
                raise BuildFailed(f"{exc} (nothing of {spec.name}:{tag} was registered)") from exc
        published, index, digest = await _register(spec, tag, layers, pub_cfg, say)
    finally:
        if cfg.out_dir is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    return BuildResult(ref=f"{spec.name}:{tag}", digest=digest, index=index, variants=tuple(published),
                       seconds=time.monotonic() - t0)


async def _register(spec: RuntimeSpec, tag: str, layers: list[BuiltLayer], pub_cfg: PublishConfig,
                    say) -> tuple[list[PublishedVariant], RuntimeIndex, str]:
    """Publish every built layer, then the index (its digest is returned last).

    On a failure, the artifacts this call added to the registry are deleted again.
    """
    added: list[tuple[str, str]] = []  # (name, digest) of artifacts new to the registry
    published: list = []
    try:
        for layer in layers:
            vs, t1 = layer.variant, time.monotonic()
            name = spec.layer_name(vs)
            result = await publish(layer.path, Reference(name, tag, None), pub_cfg, kind="runtime",
                                   annotations=layer_annotations(spec, layer))
            if result.created:
                added.append((name, result.digest))
            entry = Variant(accelerator=vs.accelerator, accelerator_version=vs.accelerator_version,
                            platform=vs.platform, python_abi=vs.python_abi, name=name, digest=result.digest,
                            layer_sha256=layer.sha256, size=layer.size)
            published.append(PublishedVariant(layer, entry, time.monotonic() - t1))
            say(f"{vs.id:10} {layer.size / 1e6:9.1f} MB  install {layer.install_s:6.1f} s  pack {layer.pack_s:5.1f} s"
                f"  publish {time.monotonic() - t1:5.1f} s  {name}:{tag} {result.digest}")
        index = RuntimeIndex(spec.name, spec.version, tuple(p.variant for p in published))
        index_dir = layers[0].path.parent / ".index"
        shutil.rmtree(index_dir, ignore_errors=True)
        index_dir.mkdir()
        (index_dir / INDEX_FILE).write_bytes(index.canonical_bytes() + b"\n")
        result = await publish(index_dir, Reference(spec.name, tag, None), pub_cfg, kind="runtime-index",
                               annotations={ANN_RUNTIME: spec.name, ANN_VERSION: spec.version,
                                            "variants": ",".join(sorted(p.variant.id for p in published))})
        say(f"{'index':10} {spec.name}:{tag} {result.digest}")
    except BaseException:
        await _unregister(pub_cfg, added)
        raise
    return published, index, result.digest


async def _unregister(pub_cfg: PublishConfig, added: list[tuple[str, str]]) -> None:
    """Delete the artifacts (and their tags) a failed build registered; never raises."""
    if not added:
        return
    try:
        async with RegistryClient(pub_cfg.registry, pub_cfg.token, ca=pub_cfg.ca) as registry:
            for name, digest in added:
                try:
                    await registry.delete_artifact(digest, force=True, name=name)
                except ModelcastError as exc:
                    log.warning("could not delete %s (%s) after the failed build: %s; delete it with "
                                "modelcast rm", name, digest, exc)
    except ModelcastError as exc:
        log.warning("could not delete %s after the failed build: %s", ", ".join(n for n, _ in added), exc)
