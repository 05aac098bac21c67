"""Build the full CUDA variant of ``specs/ort.toml`` and check it; run it where there is a GPU.

``make runtime-cuda-full`` (outside ``make test``: the nvidia-* wheels are over 1 GB)::

    python -m runtime_builder.check_cuda [--wheelhouse DIR] [--out DIR]

1. installs and packs the ``cuda13`` variant (onnxruntime-gpu with its CUDA 13 and cuDNN
   wheels) for manylinux_2_28_x86_64 / CPython 3.11, as ``modelcast runtime build`` does;
2. checks that every library the CUDA provider links is in the layer's library folders,
   except the driver's ``libcuda.so.1`` and the C/C++ runtime the node has;
3. on a machine with an NVIDIA GPU, unpacks the layer and has a fresh interpreter run the
   demo ONNX model on ``CUDAExecutionProvider``; elsewhere it says the run was not checked.

Prints human lines, then a JSON line with the figures; exits non-zero on a failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .elf import needed_libraries
from .layer import SITE, build_variant
from .spec import RuntimeSpec

SPEC = Path(__file__).resolve().parent / "specs" / "ort.toml"
# Provided by the node: the NVIDIA driver and the C/C++ runtime of any manylinux system.
FROM_THE_NODE = {"libcuda.so.1", "libdl.so.2", "librt.so.1", "libpthread.so.0", "libstdc++.so.6", "libm.so.6",
                 "libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2"}
RUN_ON_GPU = r"""
import json, sys
import numpy as np
import onnxruntime as ort
sys.path.insert(0, sys.argv[3])
from demo_model import expected_output, onnx_model_bytes
x = [1.0, 2.0, 3.0, 4.0]
sess = ort.InferenceSession(onnx_model_bytes(), providers=["CUDAExecutionProvider"])
y = sess.run(None, {"X": np.array([x], dtype=np.float32)})[0][0].tolist()
print(json.dumps({"providers": sess.get_providers(), "y": y, "expected": expected_output(x),
                  "device": ort.get_device(), "file": ort.__file__}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheelhouse", type=Path, help="install from these wheels only (default: the package index)")
    ap.add_argument("--out", type=Path, help="keep the layer here (default: a temporary directory)")
    args = ap.parse_args(argv)
    spec = RuntimeSpec.load(SPEC)
    variant = spec.variant("cuda13")
    out = args.out or Path(tempfile.mkdtemp(prefix="modelcast-cuda-full-"))
    t0 = time.monotonic()
    layer = build_variant(spec, variant, out, wheelhouse=args.wheelhouse)
    print(f"built {variant.id}: {layer.size / 1e9:.2f} GB layer in {time.monotonic() - t0:.1f} s "
          f"(install {layer.install_s:.1f} s, pack {layer.pack_s:.1f} s); sha256 {layer.sha256}")
    print("packages:", " ".join(layer.packages))

    # Unpack (as a node does) and check the provider's links against the layer's library folders.
    from node_cache.runtime import activation_env, detect_accelerator, read_layer_meta, unpack_layer

    digest = "sha256:" + layer.sha256
    unpacked = unpack_layer(layer.path, out / "node-cache", digest)
    env = activation_env(unpacked, read_layer_meta(unpacked), digest)
    lib_dirs = [Path(d) for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    provider = unpacked / SITE / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so"
    with open(provider, "rb") as f:
        needed = needed_libraries(f)
    missing = [lib for lib in needed if lib not in FROM_THE_NODE and not any((d / lib).exists() for d in lib_dirs)]
    print(f"CUDA provider links {len(needed)} libraries; in the layer: "
          f"{', '.join(lib for lib in needed if lib not in FROM_THE_NODE)}; missing: {', '.join(missing) or 'none'}")
    figures = {"variant": variant.id, "layer_bytes": layer.size, "sha256": layer.sha256,
               "install_s": round(layer.install_s, 1), "pack_s": round(layer.pack_s, 1),
               "packages": list(layer.packages), "missing_libraries": missing, "gpu_checked": False}

    accel = detect_accelerator()
    if accel.kind != "cuda":
        print(f"no NVIDIA GPU here ({accel.describe()}): the run on CUDAExecutionProvider was not checked")
    else:
        examples = Path(__file__).resolve().parent.parent / "examples"
        run = subprocess.run([sys.executable, "-S", "-c", RUN_ON_GPU, "", "", str(examples)], capture_output=True,
                             text=True, timeout=600, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})
        if run.returncode != 0:
            print(f"the layer failed on {accel.describe()}: {run.stderr.strip()[-2000:]}")
            figures["gpu_error"] = run.stderr.strip()[-500:]
        else:
            got = json.loads(run.stdout.strip().splitlines()[-1])
            ok = got["providers"][0] == "CUDAExecutionProvider" and all(
                abs(a - b) < 1e-4 for a, b in zip(got["y"], got["expected"]))
            print(f"on {accel.describe()}: providers {got['providers']}, output {got['y']} "
                  f"(expected {got['expected']}): {'ok' if ok else 'WRONG'}")
            figures.update(gpu_checked=ok, gpu=accel.describe(), providers=got["providers"])
    print(json.dumps(figures))
    failed = bool(missing) or (accel.kind == "cuda" and not figures["gpu_checked"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
