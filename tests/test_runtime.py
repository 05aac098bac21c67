"""Runtime layers: spec, reproducible build, variant choice, node activation over the swarm, OCI export.

The end-to-end tests use a real onnxruntime: built from a cached wheelhouse (the
``wheelhouse`` and ``built_runtime`` fixtures of tests/conftest.py), published to a real
registry, pulled by real node daemons, and run in a fresh interpreter that has no
onnxruntime of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from examples.demo_model import expected_output, onnx_model_bytes
from modelcast.errors import InvalidManifest
from modelcast.runtime_index import (Accelerator, NoMatchingVariant, NodeTarget, RuntimeIndex, Variant,
                                     choose_variant)
from node_cache.runtime import RuntimeClient, activation_env, cuda_major_for_driver, detect_accelerator, unpack_layer
from runtime_builder.elf import needed_libraries
from runtime_builder.layer import BuildFailed, check_cuda_major
from runtime_builder.spec import InvalidSpec, RuntimeSpec, VariantSpec

from .helpers import CI_SPEC, TOKEN, registry_stats, run_cli

X = [1.0, 2.0, 3.0, 4.0]
RUN_MODEL = r"""
import json, sys
import numpy as np
import onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
y = sess.run(None, {"X": np.array([json.loads(sys.argv[2])], dtype=np.float32)})[0][0]
print(json.dumps({"file": ort.__file__, "version": ort.__version__, "y": [float(v) for v in y]}))
"""


# ---- pure parts -------------------------------------------------------------------------------
def test_spec_parses_and_rejects_what_it_cannot_build():
    spec = RuntimeSpec.load(CI_SPEC)
    assert [v.id for v in spec.variants] == ["cpu", "cuda13", "cann8.0"]
    assert spec.variant("cuda13").python_abi == "cp311"
    assert spec.layer_name(spec.variant("cann8.0")) == "ort/cann8.0"
    base = '[runtime]\nname="ort"\nversion="1"\npython="3.11"\nplatform="manylinux_2_28_x86_64"\n'
    bad = {
        "not toml": "not valid TOML",
        base: "at least one [[variant]]",
        base + '[[variant]]\naccelerator="tpu"\npackages=["x"]\n': "accelerator must be one of",
        base + '[[variant]]\naccelerator="cuda"\npackages=["x"]\n': "CUDA major version",
        base + '[[variant]]\naccelerator="cpu"\npackages=["--index-url=http://x y"]\n': "plain requirements",
        base + '[[variant]]\naccelerator="cpu"\npackages=["a"]\nplatform="win_amd64"\n': "Linux wheel platform",
        base.replace('"3.11"', '"2.7"') + '[[variant]]\naccelerator="cpu"\npackages=["a"]\n': "is not 3.N",
        base + '[[variant]]\naccelerator="cpu"\npackages=["a"]\n[[variant]]\naccelerator="cpu"\npackages=["b"]\n':
            "share accelerator",
    }
    for text, needle in bad.items():
        with pytest.raises(InvalidSpec, match=re.escape(needle)):
            RuntimeSpec.parse(text, "t.toml")


def _variant(accel: str, version: str = "", abi: str = "cp311", platform: str = "manylinux_2_28_x86_64") -> Variant:
    return Variant(accel, version, platform, abi, f"ort/{accel}{version}", "sha256:" + "ab" * 32, "cd" * 32, 1)


def test_choose_variant_by_accelerator_python_and_platform():
    index = RuntimeIndex("ort", "1.31.1", (_variant("cpu"), _variant("cuda", "12"), _variant("cuda", "13"),
                                          _variant("cann", "8.0")))
    node = NodeTarget("cp311", (2, 36), "x86_64")
    assert choose_variant(index, Accelerator("cuda", "13"), node).variant.id == "cuda13"
    assert choose_variant(index, Accelerator("cuda", "12"), node).variant.id == "cuda12"
    assert choose_variant(index, Accelerator("cuda", ""), node).variant.id == "cuda13"
    assert choose_variant(index, Accelerator("cann", "8.0.RC2"), node).variant.id == "cann8.0"
    assert choose_variant(index, Accelerator("cpu"), node).variant.id == "cpu"
    old = choose_variant(index, Accelerator("cuda", "11", driver="470.82"), node)
    assert old.variant.id == "cpu" and old.fallback and "no cuda variant fits" in old.reason
    with pytest.raises(NoMatchingVariant) as err:
        choose_variant(index, Accelerator("cann", "7.0", 2, "23.0.3"), node, cpu_fallback=False)
    msg = str(err.value)
    assert "offers cpu (cp311, manylinux_2_28_x86_64), cuda12" in msg and "cann8.0" in msg
    assert "2 Ascend NPUs, driver 23.0.3, CANN 7.0" in msg and "cp311, glibc 2.36, x86_64" in msg
    # A node with another Python, or a glibc older than the wheels need, gets nothing.
    with pytest.raises(NoMatchingVariant, match="runs cp312, glibc 2.36"):
        choose_variant(index, Accelerator("cpu"), NodeTarget("cp312", (2, 36), "x86_64"))
    with pytest.raises(NoMatchingVariant, match="glibc 2.17"):
        choose_variant(index, Accelerator("cpu"), NodeTarget("cp311", (2, 17), "x86_64"))
    with pytest.raises(NoMatchingVariant):
        choose_variant(index, Accelerator("cpu"), NodeTarget("cp311", (2, 36), "aarch64"))
    assert RuntimeIndex.from_bytes(index.canonical_bytes()) == RuntimeIndex(
        "ort", "1.31.1", tuple(sorted(index.variants, key=lambda v: v.id)))
    with pytest.raises(InvalidManifest, match="twice"):
        RuntimeIndex("ort", "1", (_variant("cpu"), _variant("cpu")))


def fake_nvidia_root(root: Path, driver: str = "580.65.06", gpus: int = 2) -> Path:
    (root / "proc/driver/nvidia").mkdir(parents=True)
    (root / "proc/driver/nvidia/version").write_text(
        f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Sun Jul 20 2025\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    (root / "dev").mkdir()
    for i in range(gpus):
        (root / f"dev/nvidia{i}").touch()
    (root / "dev/nvidiactl").touch()
    return root


def fake_ascend_root(root: Path, cann: str = "8.0.RC2", npus: int = 8) -> Path:
    (root / "dev").mkdir(parents=True)
    for i in range(npus):
        (root / f"dev/davinci{i}").touch()
    (root / "dev/davinci_manager").touch()
    (root / "usr/local/Ascend/driver").mkdir(parents=True)
    (root / "usr/local/Ascend/driver/version.info").write_text("Version=24.1.rc2\nascendhal_version=7.35.23\n")
    info = root / "usr/local/Ascend/ascend-toolkit/latest/x86_64-linux"
    info.mkdir(parents=True)
    (info / "ascend_toolkit_install.info").write_text(f"package_name=Ascend-cann-toolkit\nversion={cann}\n")
    return root


def test_detect_accelerator_on_faked_roots(tmp_path):
    nv = detect_accelerator(fake_nvidia_root(tmp_path / "nv"))
    assert (nv.kind, nv.version, nv.devices, nv.driver) == ("cuda", "13", 2, "580.65.06")
    assert detect_accelerator(fake_nvidia_root(tmp_path / "nv12", "535.104.05", 1)).version == "12"
    asc = detect_accelerator(fake_ascend_root(tmp_path / "asc"))
    assert (asc.kind, asc.version, asc.devices, asc.driver) == ("cann", "8.0.RC2", 8, "24.1.rc2")
    (tmp_path / "empty/dev").mkdir(parents=True)
    (tmp_path / "empty/dev/nvidiactl").touch()  # the control node alone is no GPU
    assert detect_accelerator(tmp_path / "empty").kind == "cpu"
    assert [cuda_major_for_driver(d) for d in ("590.1", "580.65.06", "575.57", "525.60.13", "470.82", "x")] == \
        ["13", "13", "12", "12", "11", ""]


# ---- building ----------------------------------------------------------------------------------
def test_cuda_and_cann_variants_hold_their_provider_libraries(built_runtime, tmp_path):
    out = built_runtime.out
    lines = {line.split()[0]: line for line in built_runtime.build_output.splitlines()[:-1] if line.strip()}
    assert set(lines) == {"cpu", "cuda13", "cann8.0", "index"}

    def names(vid):
        with tarfile.open(out / vid / "layer.tar") as tar:
            return {m.name for m in tar.getmembers()}

    capi = "site-packages/onnxruntime/capi/"
    cpu, cuda, cann = names("cpu"), names("cuda13"), names("cann8.0")
    assert capi + "libonnxruntime_providers_cuda.so" in cuda and capi + "libonnxruntime_providers_tensorrt.so" in cuda
    assert capi + "libonnxruntime_providers_cann.so" in cann
    assert not any("providers_cuda" in n or "providers_cann" in n for n in cpu)
    # The spec says CUDA 13: the provider library links the CUDA 13 runtime (the build checks it too).
    with tarfile.open(out / "cuda13" / "layer.tar") as tar:
        needed = needed_libraries(tar.extractfile(capi + "libonnxruntime_providers_cuda.so"))
    assert "libcudart.so.13" in needed and "libcublas.so.13" in needed
    site = tmp_path / "site-packages"
    with tarfile.open(out / "cuda13" / "layer.tar") as tar:
        tar.extract(capi + "libonnxruntime_providers_cuda.so", tmp_path, filter="data")
    check_cuda_major(RuntimeSpec.load(CI_SPEC).variant("cuda13"), site)
    wrong = VariantSpec("cuda", "12", ("onnxruntime-gpu==1.31.1",), "3.11", "manylinux_2_28_x86_64")
    with pytest.raises(BuildFailed, match="says CUDA 12 but onnxruntime/capi/libonnxruntime_providers_cuda.so links "
                                          "libcudart.so.13"):
        check_cuda_major(wrong, site)
    sizes = {vid: (out / vid / "layer.tar").stat().st_size for vid in ("cpu", "cuda13", "cann8.0")}
    print("layer sizes (MB):", {k: round(v / 1e6, 1) for k, v in sizes.items()},
          f"build of all three {built_runtime.seconds:.1f} s")
    for vid, accel, version in (("cpu", "cpu", ""), ("cuda13", "cuda", "13"), ("cann8.0", "cann", "8.0")):
        got = run_cli("inspect", f"ort/{vid}:1.31.1", "--registry", built_runtime.registry)
        assert got.returncode == 0, got.stderr
        manifest = json.loads(got.stdout)["manifest"]
        assert manifest["kind"] == "runtime"
        assert {k: manifest["annotations"][k] for k in ("accelerator", "accelerator_version", "platform",
                                                         "python_abi", "runtime", "version")} == {
            "accelerator": accel, "accelerator_version": version, "platform": "manylinux_2_28_x86_64",
            "python_abi": "cp311", "runtime": "ort", "version": "1.31.1"}
    got = run_cli("inspect", "ort:1.31.1", "--registry", built_runtime.registry)
    assert json.loads(got.stdout)["manifest"]["kind"] == "runtime-index"


def test_build_twice_gives_the_same_bytes_and_digests(built_runtime, wheelhouse, tmp_path):
    """A second build of the cpu variant, in another folder and under another tag: same layer, same digest."""
    first = {line.split()[0]: line.split()[-1] for line in built_runtime.build_output.splitlines()}
    t0 = time.monotonic()
    again = run_cli("runtime", "build", str(CI_SPEC), "--variant", "cpu", "--tag", "again", "--registry",
                    built_runtime.registry, "--origin", built_runtime.origin, "--token", TOKEN,
                    "--wheelhouse", str(wheelhouse), "--out", str(tmp_path / "again"), timeout=300)
    assert again.returncode == 0, again.stderr
    second = {line.split()[0]: line.split()[-1] for line in again.stdout.splitlines()}
    a, b = built_runtime.out / "cpu", tmp_path / "again" / "cpu"
    print(f"cpu rebuilt and published in {time.monotonic() - t0:.1f} s: {second['cpu']} == {first['cpu']}")
    assert second["cpu"] == first["cpu"]
    assert (a / "layer.tar").read_bytes() == (b / "layer.tar").read_bytes()
    assert (a / "layer.json").read_bytes() == (b / "layer.json").read_bytes()
    meta = json.loads((a / "layer.json").read_text())
    assert "onnxruntime==1.31.1" in meta["packages"] and any(p.startswith("numpy==") for p in meta["packages"])
    with tarfile.open(a / "layer.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.encode()) and names[0] == "site-packages"
    assert {m.mtime for m in members} == {0} and {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert {m.mode for m in members} <= {0o644, 0o755} and all(m.isfile() or m.isdir() for m in members)
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", "/INSTALLER", "/REQUESTED"))
                or n.startswith("site-packages/bin")]
    assert "site-packages/onnxruntime/capi/onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so" in names


# ---- on the node -------------------------------------------------------------------------------
def fresh_python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The base interpreter without site-packages (-S) and with nothing inherited but ``env``."""
    python = getattr(sys, "_base_executable", None) or sys.executable
    return subprocess.run([python, "-S", *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **env})


def test_two_nodes_activate_the_cpu_runtime_and_run_a_model(built_runtime, node_factory, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx_model_bytes())
    assert fresh_python({}, "-c", "import onnxruntime").returncode != 0, "the fresh interpreter has onnxruntime"
    nodes = [node_factory(built_runtime.registry, f"n{i}", host=f"127.0.0.{i + 2}") for i in range(2)]
    served0 = registry_stats(built_runtime.registry)["origin_bytes_served"]

    async def activate_all():
        clients = [RuntimeClient(n.url) for n in nodes]
        try:
            return await asyncio.gather(*(c.activate(built_runtime.ref) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    t0 = time.monotonic()
    answers = asyncio.run(activate_all())
    took = time.monotonic() - t0
    size = (built_runtime.out / "cpu" / "layer.tar").stat().st_size
    served = registry_stats(built_runtime.registry)["origin_bytes_served"] - served0
    print(f"2 nodes activated {size / 1e6:.1f} MB in {took:.1f} s; origin served {served / size:.2f} copies")
    assert served < 1.5 * size, f"origin served {served / size:.2f} copies of the layer to two nodes"
    for node, answer in zip(nodes, answers):
        layer = Path(answer["path"])
        assert answer["variant"] == "cpu" and answer["node"]["kind"] == "cpu" and not answer["fallback"]
        assert layer == node.cache / "layers" / "sha256" / answer["digest"].split(":")[1]
        assert not os.access(layer / "site-packages" / "onnxruntime" / "__init__.py", os.W_OK) or os.geteuid() == 0
        assert (layer.stat().st_mode & 0o222) == 0 and ((layer / "site-packages").stat().st_mode & 0o222) == 0
        env = answer["env"]
        assert env["PYTHONPATH"] == str(layer / "site-packages")
        assert str(layer / "site-packages/onnxruntime/capi") in env["LD_LIBRARY_PATH"].split(":")
        run = fresh_python(env, "-c", RUN_MODEL, str(model), json.dumps(X))
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["file"].startswith(str(layer)) and result["version"] == "1.31.1"
        assert result["y"] == pytest.approx(expected_output(X))
    # A second activation finds the layer unpacked: same path, at once.
    t0 = time.monotonic()
    out = run_cli("runtime", "resolve", built_runtime.ref, "--node", nodes[0].url)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 10
    exports = dict(re.findall(r"^export (\w+)='(.*)'$", out.stdout, re.M))
    assert exports["MODELCAST_RUNTIME_PATH"] == answers[0]["path"] and exports["MODELCAST_RUNTIME_VARIANT"] == "cpu"
    assert "variant cpu for no accelerator (cpu)" in out.stderr


def test_resolve_picks_cuda_and_cann_on_faked_roots(built_runtime, node_factory, tmp_path):
    roots = {"cuda13": fake_nvidia_root(tmp_path / "nv"), "cann8.0": fake_ascend_root(tmp_path / "asc"),
             "cpu": fake_nvidia_root(tmp_path / "old-nv", driver="470.82.01")}
    nodes = {}
    for want, root in roots.items():
        node = nodes[want] = node_factory(built_runtime.registry, f"node-{want}", "--accel-root", str(root))
        out = run_cli("runtime", "resolve", built_runtime.ref, "--dry-run", "--node", node.url)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer["variant"] == want, answer
        assert answer["layer"].startswith(f"ort/{want}@sha256:")
        if want == "cpu":
            assert answer["fallback"] and "CUDA up to 11" in answer["reason"]
    # Activation on the Ascend node unpacks the CANN layer: its provider is on the library path.
    answer = asyncio.run(_activate(nodes["cann8.0"].url, built_runtime.ref))
    assert answer["variant"] == "cann8.0" and answer["node"]["description"].startswith("8 Ascend NPUs")
    capi = Path(answer["path"]) / "site-packages/onnxruntime/capi"
    assert (capi / "libonnxruntime_providers_cann.so").is_file() and str(capi) in answer["env"]["LD_LIBRARY_PATH"]
    # Asking for a Python ABI the index does not offer fails with one line naming both sides.
    out = run_cli("runtime", "resolve", built_runtime.ref, "--python-abi", "cp312", "--node", nodes["cpu"].url)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "offers cann8.0 (cp311, manylinux_2_28_x86_64), cpu (cp311" in out.stderr
    assert "runs cp312" in out.stderr


async def _activate(node_url: str, ref: str) -> dict:
    async with RuntimeClient(node_url) as client:
        return await client.activate(ref)


def test_unpack_refuses_a_layer_escaping_its_folder(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "layer.json").write_text('{"env": {"PYTHONPATH": ["site-packages"]}}')
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    with tarfile.open(art / "layer.tar", "w") as tar:
        tar.add(evil, arcname="site-packages/../../../escaped.txt")
    with pytest.raises(Exception, match="unpack"):
        unpack_layer(art, tmp_path / "cache", "sha256:" + "0" * 64)
    assert not (tmp_path / "escaped.txt").exists()
    assert not list((tmp_path / "cache" / "layers" / "sha256").iterdir())
    with pytest.raises(InvalidManifest, match="leaves the layer"):
        activation_env(tmp_path, {"env": {"LD_LIBRARY_PATH": ["../../etc"]}}, "sha256:" + "0" * 64)


# ---- OCI ---------------------------------------------------------------------------------------
def test_oci_export_is_read_by_skopeo(built_runtime, tmp_path):
    oci = tmp_path / "oci"
    out = run_cli("runtime", "export", built_runtime.ref, "--oci", str(oci), "--registry", built_runtime.registry,
                  "--token", TOKEN, timeout=300)
    assert out.returncode == 0, out.stderr
    index = json.loads((oci / "index.json").read_text())
    by_name = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    assert set(by_name) == {"1.31.1-cpu", "1.31.1-cuda13", "1.31.1-cann8.0"}
    assert by_name["1.31.1-cuda13"]["annotations"]["io.modelcast.accelerator"] == "cuda"
    assert by_name["1.31.1-cuda13"]["annotations"]["io.modelcast.accelerator.version"] == "13"
    assert by_name["1.31.1-cann8.0"]["platform"] == {"os": "linux", "architecture": "amd64"}
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo is not installed (Debian package skopeo; `make system-tools` installs it as root)")
    for name, entry in by_name.items():
        got = subprocess.run([skopeo, "inspect", f"oci:{oci}:{name}"], capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr
        info = json.loads(got.stdout)
        assert info["Digest"] == entry["digest"] and info["Architecture"] == "amd64" and info["Os"] == "linux"
        assert info["Labels"]["io.modelcast.accelerator"] == entry["annotations"]["io.modelcast.accelerator"]
        assert "PYTHONPATH=/site-packages" in info["Env"]
        layer_sha = json.loads((oci / "blobs/sha256" / entry["digest"].split(":")[1]).read_text())["layers"][0]
        assert info["Layers"] == [layer_sha["digest"]]
