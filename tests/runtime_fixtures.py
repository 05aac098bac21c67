"""Fixtures for the runtime-layer tests: a wheelhouse cached outside the repo, a built runtime.

The wheelhouse (``$MODELCAST_WHEELHOUSE``, default ``~/.cache/modelcast/wheelhouse``) holds
onnxruntime, onnxruntime-gpu and onnxruntime-cann with their dependencies for CPython 3.11
on manylinux_2_28_x86_64: about 325 MB, downloaded once, then every build is offline.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from modelcast.config import ENV_WHEELHOUSE, env_str
from modelcast.runtime_index import compatible_platforms
from harness.procs import ServiceProcess, free_port, modelcast_argv

from .conftest import S3_ENV
from .helpers import TOKEN, run_cli

ROOT = Path(__file__).resolve().parent.parent
CI_SPEC = ROOT / "runtime_builder" / "specs" / "ort-ci.toml"
PLATFORM = "manylinux_2_28_x86_64"
PYTHON = "3.11"
WHEELS = ("onnxruntime==1.31.1", "onnxruntime-gpu==1.31.1", "onnxruntime-cann==1.24.4")


def wheelhouse_dir() -> Path:
    return Path(env_str(ENV_WHEELHOUSE) or Path.home() / ".cache" / "modelcast" / "wheelhouse").expanduser()


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The cached wheelhouse; downloaded (with dependencies, for the target platform) only once."""
    where = wheelhouse_dir()
    key = hashlib.sha256(repr((WHEELS, PLATFORM, PYTHON)).encode()).hexdigest()[:16]
    done = where / f".complete-{key}"
    if not done.exists():
        where.mkdir(parents=True, exist_ok=True)
        platforms = [arg for tag in compatible_platforms(PLATFORM) for arg in ("--platform", tag)]
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                              "-d", str(where), "--only-binary=:all:", *platforms, "--python-version", PYTHON, "--implementation", "cp", *WHEELS], capture_output=True, text=True,
                             timeout=1800)
        if out.returncode != 0:
            pytest.fail(f"could not download the test wheelhouse into {where} (needs PyPI once; or set "
                        f"{ENV_WHEELHOUSE} to a directory holding {', '.join(WHEELS)} and their dependencies): "
                        f"{out.stderr.strip()[-1500:]}")
        done.write_text("\n".join(WHEELS) + "\n")
    return where


class BuiltRuntime:
    """A registry holding ort:1.31.1 built from the CI spec, and the kept layer artifacts."""

    def __init__(self, registry: str, origin: str, out: Path, index_digest: str, build_output: str,
                 tmp: Path, seconds: float):
        self.registry, self.origin, self.out = registry, origin, out
        self.index_digest, self.build_output, self.tmp, self.seconds = index_digest, build_output, tmp, seconds
        self.ref = "ort:1.31.1"


@pytest.fixture(scope="module")
def built_runtime(wheelhouse, tmp_path_factory):
    """A registry process and ``modelcast runtime build`` of the CI spec (cpu, cuda13, cann8.0) into it."""
    import time

    tmp = tmp_path_factory.mktemp("runtime")
    port = free_port()
    svc = ServiceProcess(
        modelcast_argv("tracker", "--listen", f"127.0.0.1:{port}", "--data", str(tmp / "registry"),
                       "--token", TOKEN),
        health_url=f"http://127.0.0.1:{port}/v1/health", log_path=tmp / "logs" / "tracker.log", env=S3_ENV,
        name="tracker")
    svc.start()
    registry = f"http://127.0.0.1:{port}"
    origin = (tmp / "origin").as_uri()
    t0 = time.monotonic()
    out = run_cli("runtime", "build", str(CI_SPEC), "--registry", registry, "--origin", origin, "--token", TOKEN,
                  "--wheelhouse", str(wheelhouse), "--out", str(tmp / "layers"), timeout=600)
    seconds = time.monotonic() - t0
    if out.returncode != 0:
        svc.stop()
        pytest.fail(f"runtime build failed: {out.stderr}")
    print(out.stdout, f"build of 3 variants took {seconds:.1f} s", sep="\n")
    try:
        yield BuiltRuntime(registry, origin, tmp / "layers", out.stdout.strip().splitlines()[-1], out.stdout, tmp,
                           seconds)
    finally:
        svc.stop()
