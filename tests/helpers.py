"""Helpers for the end-to-end tests: run the real CLI and real node daemons."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import xxhash

from harness.procs import ServiceProcess, free_port, modelcast_argv

TOKEN = "secret"


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(modelcast_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def make_model(root: Path, sizes: dict[str, int], seed: int = 1) -> Path:
    """Write files of the given sizes with seeded pseudo-random bytes."""
    import random

    rng = random.Random(seed)
    for rel, size in sizes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): xxhash.xxh3_128_hexdigest(p.read_bytes())
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def publish(registry: str, path: Path, ref: str, origin: str, *extra: str) -> str:
    out = run_cli("publish", str(path), ref, "--registry", registry, "--origin", origin, "--token", TOKEN, *extra)
    assert out.returncode == 0, out.stderr
    digest = out.stdout.strip().splitlines()[-1]
    assert digest.startswith("sha256:") and len(digest) == 71, out.stdout
    return digest


def start_node(tmp: Path, registry: str, name: str, host: str = "127.0.0.1", zone: str = "default",
               *extra: str, log_dir: Path | None = None) -> ServiceProcess:
    api = free_port(host)
    svc = ServiceProcess(
        modelcast_argv("node", "--registry", registry, "--cache", str(tmp / name), "--api", f"{host}:{api}",
                       "--peer-listen", f"{host}:{free_port(host)}", "--zone", zone, *extra),
        f"http://{host}:{api}/v1/health", (log_dir or tmp / "logs") / f"{name}.log", name=name)
    svc.start()
    svc.url = f"http://{host}:{api}"
    svc.cache = tmp / name
    return svc


def metric(node_url: str, name: str) -> float:
    with urllib.request.urlopen(f"{node_url}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def registry_stats(registry: str) -> dict:
    import json

    with urllib.request.urlopen(f"{registry}/v1/stats", timeout=5) as resp:
        return json.load(resp)
