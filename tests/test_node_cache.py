"""A node cache you can trust: quota, pins, crashes, corruption, hostile peers, full disks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .helpers import (free_port, make_model, metric, publish, registry_stats, run_cli, start_node, tree_hashes,
                      wait_until)

MiB = 1 << 20
HERE = Path(__file__).resolve().parent


def status(node_url: str) -> dict:
    with urllib.request.urlopen(f"{node_url}/v1/artifacts", timeout=5) as resp:
        return json.load(resp)


def job(node_url: str, digest: str) -> dict | None:
    return next((a for a in status(node_url)["artifacts"] if a["digest"] == digest), None)


def complete_dirs(cache: Path) -> list[Path]:
    return sorted((cache / "artifacts" / "sha256").iterdir())


def _publish_many(tracker, tmp_path, sizes: dict[str, int]) -> dict[str, str]:
    out = {}
    for i, (name, size) in enumerate(sizes.items()):
        model = make_model(tmp_path / "src" / name, {"weights.bin": size}, seed=i + 10)
        out[name] = publish(tracker.url, model, f"q/{name}:v1", (tmp_path / "origin").as_uri())
    return out


def test_quota_evicts_least_recently_used_never_pinned_and_refuses_what_cannot_fit(tracker, node_factory,
                                                                                   tmp_path):
    d = _publish_many(tracker, tmp_path, {"a": 8 * MiB, "b": 8 * MiB, "c": 8 * MiB, "huge": 30 * MiB})
    node = node_factory(tracker.url, "n", "--quota", "20M")
    assert run_cli("node", "pin", "q/a:v1", "--node", node.url).returncode == 0
    for ref in ("q/a:v1", "q/b:v1"):
        assert run_cli("pull", ref, "--node", node.url).returncode == 0
    # Recency is the wall clock: once it is past b's stamp, using a again makes a the more recent.
    b_used = job(node.url, d["b"])["last_used"]
    wait_until(lambda: time.time() > b_used, 5, 0.01, "the clock to pass b's last use")
    assert run_cli("pull", "q/a:v1", "--node", node.url).returncode == 0  # a is now the most recent
    # c does not fit next to a and b: b (unpinned, least recently used) goes, a (pinned) stays.
    assert run_cli("pull", "q/c:v1", "--node", node.url).returncode == 0
    held = {p.name for p in complete_dirs(node.cache)}
    assert held == {d["a"].split(":")[1], d["c"].split(":")[1]}
    assert metric(node.url, "modelcast_node_evictions_total") == 1
    # 30 MiB can never fit in 20 MiB: refused at once with the sizes, nothing evicted.
    t0 = time.monotonic()
    out = run_cli("pull", "q/huge:v1", "--node", node.url)
    assert out.returncode != 0 and time.monotonic() - t0 < 5
    assert "30.0 MiB" in out.stderr and "20.0 MiB" in out.stderr and "unpin" in out.stderr, out.stderr
    assert {p.name for p in complete_dirs(node.cache)} == held
    ls = run_cli("node", "ls", "--pinned", "--node", node.url)
    assert "q/a" in ls.stdout and "q/c" not in ls.stdout and "cli" in ls.stdout
    # Unpinned, a is fair game: b comes back in a's place (a is older than c).
    assert run_cli("node", "unpin", "q/a:v1", "--node", node.url).returncode == 0
    assert run_cli("pull", "q/b:v1", "--node", node.url).returncode == 0
    assert {p.name for p in complete_dirs(node.cache)} == {d["b"].split(":")[1], d["c"].split(":")[1]}
    # Pins survive a restart.
    assert run_cli("node", "pin", "q/c:v1", "--holder", "ray", "--node", node.url).returncode == 0
    node.stop()
    node.start()
    assert job(node.url, d["c"])["pinned_by"] == ["ray"]


def test_sigkill_at_any_moment_never_shows_a_half_artifact_and_resume_fetches_nothing_twice(
        tracker, node_factory, tmp_path):
    size = 24 * MiB
    model = make_model(tmp_path / "m", {"weights.bin": size - 5000, "model.onnx": 5000})
    digest = publish(tracker.url, model, "crash/m:v1", (tmp_path / "origin").as_uri())
    node = node_factory(tracker.url, "n", "--download-limit", "6M")
    source = tree_hashes(model)
    served_before = registry_stats(tracker.url)["origin_bytes_served"]
    run_cli("pull", "crash/m:v1", "--no-wait", "--node", node.url)
    for fraction in (0.2, 0.5, 0.8):
        kept = wait_until(lambda: (j := job(node.url, digest)) and j["done_bytes"] >= fraction * size
                          and j["done_bytes"], 60, message=f"{fraction:.0%} done")
        node.kill()
        served_at_kill = registry_stats(tracker.url)["origin_bytes_served"]
        # Never complete before every file verified: whatever is complete is whole.
        for path in complete_dirs(node.cache):
            assert tree_hashes(path) == source
        node.start()  # resumes on its own
    path = Path(wait_until(lambda: (j := job(node.url, digest)) and j["state"] == "ready" and j["path"],
                           60, message="ready after restarts"))
    assert tree_hashes(path) == source
    # What was verified before the last kill was not fetched again; the slack is what was
    # in flight (requested, not yet verified) when the node died: 4 requests of 1.5 MiB.
    fetched_after = registry_stats(tracker.url)["origin_bytes_served"] - served_at_kill
    assert fetched_after <= size - kept + 7 * MiB, (fetched_after, size - kept)
    # In all: the artifact once, plus at most what was in flight at each of the three kills
    # (the registry counts an answer's bytes when its headers go out). A fixed 1.6x bound
    # failed once under load at 1.63x, within this one.
    assert registry_stats(tracker.url)["origin_bytes_served"] - served_before <= size + 3 * 7 * MiB


def test_sigterm_saves_resume_data_and_exits_within_5s(tracker, node_factory, tmp_path):
    size = 24 * MiB
    model = make_model(tmp_path / "m", {"weights.bin": size})
    digest = publish(tracker.url, model, "term/m:v1", (tmp_path / "origin").as_uri())
    node = node_factory(tracker.url, "n", "--download-limit", "6M")
    run_cli("pull", "term/m:v1", "--no-wait", "--node", node.url)
    wait_until(lambda: (j := job(node.url, digest)) and j["done_bytes"] >= size / 3, 60, message="a third done")
    served = registry_stats(tracker.url)["origin_bytes_served"]
    t0 = time.monotonic()
    code = node.stop(timeout_s=10)
    assert time.monotonic() - t0 < 5 and code == 0
    assert (node.cache / "resume" / "sha256" / digest.split(":")[1]).exists()
    assert (node.cache / "state" / "clean_stop").exists()
    node.start()
    wait_until(lambda: (j := job(node.url, digest)) and j["state"] == "ready", 60, message="ready after restart")
    # The resume data written at stop was trusted: only what was missing came again.
    refetched = registry_stats(tracker.url)["origin_bytes_served"] - served
    assert refetched <= size * 2 / 3 + 8 * MiB, refetched


def test_corruption_is_caught_at_start_and_by_verify_and_repaired_from_the_swarm(tracker, node_factory,
                                                                                  tmp_path):
    model = make_model(tmp_path / "m", {"weights.bin": 16 * MiB, "config.json": 300})
    digest = publish(tracker.url, model, "rot/m:v1", (tmp_path / "origin").as_uri())
    seed = node_factory(tracker.url, "seed", host="127.0.0.2")
    node = node_factory(tracker.url, "n", host="127.0.0.3")
    for n in (seed, node):
        assert run_cli("pull", "rot/m:v1", "--node", n.url).returncode == 0
    path = node.cache / "artifacts" / "sha256" / digest.split(":")[1]
    weights = path / "weights.bin"

    def flip(at: int, keep_mtime: bool) -> None:
        st = weights.stat()
        os.chmod(weights, 0o644)
        with open(weights, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.chmod(weights, 0o444)
        if keep_mtime:
            os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))

    # 1. Changed while the daemon was down: the cheap start-up check (size, mtime) sees it.
    node.stop()
    flip(5 * MiB, keep_mtime=False)
    node.start()
    wait_until(lambda: (j := job(node.url, digest)) and j["state"] == "ready" and not j["repairing"]
               and metric(node.url, "modelcast_node_repairs_total") == 1, 60, message="repair at start")
    assert tree_hashes(path) == tree_hashes(model)
    # 2. Changed behind its back with the mtime restored: `modelcast node verify` finds it.
    flip(9 * MiB, keep_mtime=True)
    out = run_cli("node", "verify", "rot/m:v1", "--node", node.url)
    assert out.returncode == 1 and "CORRUPT" in out.stdout
    wait_until(lambda: (j := job(node.url, digest)) and j["state"] == "ready" and not j["repairing"],
               60, message="repair after verify")
    assert tree_hashes(path) == tree_hashes(model)
    assert run_cli("node", "verify", "--node", node.url).returncode == 0
    assert metric(node.url, "modelcast_node_repairs_total") == 2
    assert metric(node.url, "modelcast_node_verification_failures_total") == 2
    # Repairs fetched only the damaged pieces, not the artifact again.
    assert metric(node.url, "modelcast_node_bytes_from_peers_total") + \
        metric(node.url, "modelcast_node_bytes_from_origin_total") < 16 * MiB + 300 + 4 * MiB
    log = (tmp_path / "logs" / "n.log").read_text()
    assert "failed verification" in log
    # 3. The whole directory deleted behind its back: a pull never answers with a missing path.
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
    shutil.rmtree(path)
    out = run_cli("pull", "rot/m:v1", "--node", node.url)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip().splitlines()[-1]) == path and tree_hashes(path) == tree_hashes(model)
    assert metric(node.url, "modelcast_node_repairs_total") == 3


def test_a_peer_sending_corrupt_pieces_is_banned_and_the_download_ends_correct(tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "m" / "m", {"weights.bin": 8 * MiB})
    digest = publish(tracker.url, model, "evil/m:v1", (tmp_path / "origin").as_uri())
    torrent = tmp_path / "m.torrent"
    with urllib.request.urlopen(f"{tracker.url}/v1/artifacts/{digest}/torrent") as resp:
        torrent.write_bytes(resp.read())
    hostile_data = tmp_path / "hostile"
    shutil.copytree(model.parent, hostile_data)
    port = free_port("127.0.0.66")
    hostile = subprocess.Popen([sys.executable, str(HERE / "hostile_peer.py"), str(torrent), str(hostile_data),
                                f"127.0.0.66:{port}", f"{tracker.url}/announce"], stdout=subprocess.PIPE, text=True)
    try:
        assert hostile.stdout.readline().strip() == "CORRUPTED"
        node = node_factory(tracker.url, "n")
        out = run_cli("pull", "evil/m:v1", "--node", node.url)
        assert out.returncode == 0, out.stderr
        assert tree_hashes(Path(out.stdout.strip().splitlines()[-1])) == tree_hashes(model)
        assert metric(node.url, "modelcast_node_piece_hash_failures_total") >= 1
        assert metric(node.url, "modelcast_node_peers_banned_total") >= 1
    finally:
        hostile.kill()
        hostile.wait()


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.decode().strip()}); needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_pull_clearly_keeps_other_artifacts_and_resumes_later(tracker, small_fs, tmp_path):
    small = make_model(tmp_path / "w", {"w.bin": 4 * MiB})
    big_size = 24 * MiB
    big = make_model(tmp_path / "x", {"x.bin": big_size})
    publish(tracker.url, small, "disk/small:v1", (tmp_path / "origin").as_uri())
    digest = publish(tracker.url, big, "disk/big:v1", (tmp_path / "origin").as_uri())
    node = start_node(small_fs, tracker.url, "n", zone="default", extra=["--download-limit", "6M"],
                      log_path=tmp_path / "logs" / "n.log")
    filler = small_fs / "filler"
    try:
        assert run_cli("pull", "disk/small:v1", "--node", node.url).returncode == 0
        run_cli("pull", "disk/big:v1", "--no-wait", "--node", node.url)
        wait_until(lambda: (j := job(node.url, digest)) and j["done_bytes"] >= 6 * MiB, 60, message="6 MiB done")
        with open(filler, "wb") as f:  # someone else fills the disk
            try:
                while True:
                    f.write(b"\0" * MiB)
                    f.flush()
            except OSError:
                pass
        failed = wait_until(lambda: (j := job(node.url, digest)) and j["state"] == "failed" and j, 60,
                            message="pull to fail")
        assert failed["error"]["code"] == "disk_full" and "free space and pull again" in failed["error"]["message"]
        assert not (node.cache / "artifacts" / "sha256" / digest.split(":")[1]).exists()
        assert run_cli("node", "verify", "disk/small:v1", "--node", node.url).returncode == 0
        served = registry_stats(tracker.url)["origin_bytes_served"]
        kept = failed["done_bytes"]
        filler.unlink()
        out = run_cli("pull", "disk/big:v1", "--node", node.url)
        assert out.returncode == 0, out.stderr
        assert tree_hashes(Path(out.stdout.strip().splitlines()[-1])) == tree_hashes(big)
        assert registry_stats(tracker.url)["origin_bytes_served"] - served <= big_size - kept + 8 * MiB
    finally:
        node.stop()


def test_metrics_and_status_show_what_an_operator_needs(tracker, node_factory, tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": MiB})
    publish(tracker.url, model, "obs/m:v1", (tmp_path / "origin").as_uri())
    node = node_factory(tracker.url, "n", "--quota", "1G")
    assert run_cli("pull", "obs/m:v1", "--node", node.url).returncode == 0
    with urllib.request.urlopen(f"{node.url}/metrics") as resp:
        text = resp.read().decode()
    for name in ("bytes_from_peers_total", "bytes_from_origin_total", "pull_duration_seconds_bucket",
                 "cache_bytes", "cache_artifacts", "evictions_total", "verification_failures_total",
                 "peers_connected", "peers_banned_total", "repairs_total"):
        assert f"modelcast_node_{name}" in text
    assert 'modelcast_node_pull_duration_seconds_count 1' in text
    out = run_cli("node", "status", "--once", "--node", node.url)
    assert out.returncode == 0 and "obs/m" in out.stdout and "ready" in out.stdout and "1.0 GiB quota" in out.stdout
