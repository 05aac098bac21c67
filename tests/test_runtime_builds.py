"""Runtime builds that are reproducible anywhere and all or nothing.

Small pure-Python wheels (tests/helpers.make_wheel) stand in for onnxruntime: pip installs
them for the spec's target like any wheel, so a build takes seconds.  Real registries in
real processes, the real CLI.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from runtime_builder.layer import pip_error

from .helpers import TOKEN, make_wheel, run_cli, start_tracker, wait_until

SPEC = """
[runtime]
name = "tokpart"
version = "1.0"
python = "3.11"
platform = "manylinux_2_28_x86_64"

[[variant]]
accelerator = "cpu"
packages = ["tokpart==1.0"]

[[variant]]
accelerator = "cann"
accelerator_version = "8.0"
packages = ["{second}"]
"""


def _spec(tmp_path: Path, second: str) -> tuple[Path, Path]:
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "tokpart", "1.0")
    make_wheel(wheels, "tokpart-cann", "1.0", {"tokpart_cann/__init__.py": b"PROVIDER = 'CANN'\n",
                                               "tokpart_cann/libs/libtokcann.so": b"\0" * 1000})
    spec = tmp_path / "tokpart.toml"
    spec.write_text(SPEC.replace("{second}", second))
    return spec, wheels


def _build(spec: Path, wheels: Path, registry: str, origin: Path, out: Path):
    return run_cli("runtime", "build", str(spec), "--registry", registry, "--origin", origin.as_uri(),
                   "--token", TOKEN, "--wheelhouse", str(wheels), "--out", str(out), timeout=300)


def _digests(stdout: str) -> dict[str, str]:
    """``{"cpu": digest, "cann8.0": digest, "index": digest}`` from the build's report lines."""
    return {words[0]: words[-1] for words in map(str.split, stdout.splitlines())
            if len(words) > 1 and words[-1].startswith("sha256:")}


def _listed(registry: str) -> list[dict]:
    with urllib.request.urlopen(f"{registry}/v1/artifacts?limit=100", timeout=10) as resp:
        return json.load(resp)["artifacts"]


def test_one_spec_built_into_two_registries_gets_the_same_digests(tmp_path):
    spec, wheels = _spec(tmp_path, "tokpart-cann==1.0")
    first_reg = start_tracker(tmp_path / "a", token=TOKEN)
    second_reg = start_tracker(tmp_path / "b", token=TOKEN)
    try:
        first = _build(spec, wheels, first_reg.url, tmp_path / "origin-a", tmp_path / "out-a")
        assert first.returncode == 0, first.stderr
        # The second build publishes in a later second: a clock inside the digested bytes would show.
        done = int(time.time())
        wait_until(lambda: int(time.time()) > done, 5, 0.05, "the wall clock to pass a second")
        second = _build(spec, wheels, second_reg.url, tmp_path / "origin-b", tmp_path / "out-b")
        assert second.returncode == 0, second.stderr
        a, b = _digests(first.stdout), _digests(second.stdout)
        print("registry A:", a, "registry B:", b, sep="\n")
        assert set(a) == {"cpu", "cann8.0", "index"} and a == b
        assert first.stdout.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1] == a["index"]
        for variant in ("cpu", "cann8.0"):
            assert (tmp_path / "out-a" / variant / "layer.tar").read_bytes() == \
                (tmp_path / "out-b" / variant / "layer.tar").read_bytes()
        # Each registry keeps its own publish time beside the manifest, not in it.
        for reg in (first_reg, second_reg):
            by_name = {item["name"]: item for item in _listed(reg.url)}
            assert {n: i["digest"] for n, i in by_name.items()} == \
                {"tokpart": a["index"], "tokpart/cpu": a["cpu"], "tokpart/cann8.0": a["cann8.0"]}
            assert all(i["created"].endswith("Z") for i in by_name.values())
            with urllib.request.urlopen(f"{reg.url}/v1/artifacts/{a['index']}", timeout=10) as resp:
                assert b"created" not in resp.read()
    finally:
        first_reg.stop()
        second_reg.stop()


def test_a_spec_whose_second_variant_fails_registers_nothing(tracker, tmp_path):
    spec, wheels = _spec(tmp_path, "tokpart-cann==9.9")  # no such version in the wheelhouse
    out = _build(spec, wheels, tracker.url, tmp_path / "origin", tmp_path / "out")
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()  # one line, no traceback, no pip warnings
    assert line.startswith("modelcast runtime: error: pip could not install tokpart-cann==9.9 for variant cann8.0")
    assert "No matching distribution found for tokpart-cann==9.9" in line and "WARNING" not in line
    assert "nothing of tokpart:1.0 was registered" in line
    assert "tokpart/cpu" not in out.stdout
    assert _listed(tracker.url) == []
    gone = run_cli("inspect", "tokpart/cpu:1.0", "--registry", tracker.url)
    assert gone.returncode == 1 and "not found" in gone.stderr


def test_pip_errors_are_kept_and_its_warnings_dropped():
    stderr = ("WARNING: The directory '/root/.cache/pip' or its parent directory is not owned or is not writable "
              "by the current user. The cache has been disabled.\n"
              "WARNING: Running pip as the 'root' user can result in broken permissions\n"
              "ERROR: Could not find a version that satisfies the requirement x==9 (from versions: 1.0)\n"
              "ERROR: No matching distribution found for x==9\n")
    assert pip_error(stderr) == ("Could not find a version that satisfies the requirement x==9 (from versions: "
                                 "1.0); No matching distribution found for x==9")
    assert pip_error("WARNING: w\nTraceback (most recent call last):\n  boom\nOSError: disk full\n") == \
        "Traceback (most recent call last): | boom | OSError: disk full"
