"""Publishing: scanning, hashing, the torrent, dedup, S3, and the CLI's errors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import boto3
import libtorrent as lt
import pytest
import xxhash

from distributor.hashing import hash_files
from distributor.publish import publish, publish_sync
from distributor.scan import check_unchanged, scan
from distributor.torrent import make_torrent, torrent_name_for
from modelcast.config import PublishConfig
from modelcast.errors import BadRequest, ModelcastError, OriginError, UnsafePath
from modelcast.manifest import FileEntry, InfoHashes, Manifest, choose_piece_length
from adapters import piece_hash, torrent as lt_adapter
from adapters.origin import blob_relpath
from harness.procs import free_port
from modelcast.reference import Reference

from .helpers import TOKEN, make_model, publish as cli_publish, run_cli

MiB = 1 << 20


# -- scan ------------------------------------------------------------------------------


def test_scan_follows_inner_links_and_refuses_escaping_ones(tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 10, "sub/b.bin": 20})
    (model / "alias.bin").symlink_to("sub/b.bin")
    (model / "subdir").symlink_to("sub")
    assert [(f.path, f.size) for f in scan(model)] == [
        ("a.bin", 10), ("alias.bin", 20), ("sub/b.bin", 20), ("subdir/b.bin", 20)]

    (tmp_path / "outside.txt").write_text("secret")
    (tmp_path / "outside-dir").mkdir()
    for name, target in [("rel", "../outside.txt"), ("abs", str(tmp_path / "outside.txt")),
                         ("sub/deep", "../../outside.txt"), ("dirlink", "../outside-dir"), ("dangling", "nope")]:
        link = model / name
        link.symlink_to(target)
        with pytest.raises(UnsafePath, match=name):
            scan(model)
        link.unlink()


def test_scan_refuses_link_loops_and_special_files(tmp_path):
    model = make_model(tmp_path / "m", {"sub/a.bin": 10})
    (model / "sub" / "up").symlink_to("..")
    with pytest.raises(UnsafePath, match="loop"):
        scan(model)
    (model / "sub" / "up").unlink()

    os.mkfifo(model / "pipe")
    with pytest.raises(UnsafePath, match="pipe"):
        scan(model)
    (model / "pipe").unlink()

    # AF_UNIX paths are short: bind from inside the directory.
    cwd = os.getcwd()
    os.chdir(model)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("sock")
            with pytest.raises(UnsafePath, match="sock"):
                scan(model)
    finally:
        os.chdir(cwd)


def test_scan_of_an_empty_directory_a_single_file_and_a_missing_path(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(BadRequest, match="no files"):
        scan(tmp_path / "empty")
    with pytest.raises(BadRequest, match="does not exist"):
        scan(tmp_path / "missing")
    one = tmp_path / "weights.safetensors"
    one.write_bytes(b"w" * 99)
    assert [(f.path, f.size, f.source) for f in scan(one)] == [("weights.safetensors", 99, one)]


def test_scan_refuses_names_a_manifest_cannot_hold(tmp_path):
    model = make_model(tmp_path / "m", {"ok.bin": 1})
    (model / "back\\slash").write_bytes(b"x")
    with pytest.raises(UnsafePath, match="backslash"):
        scan(model)


def test_a_file_rewritten_after_the_scan_is_caught(tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 100})
    files = scan(model)
    check_unchanged(files)
    # A new size: caught however coarse the file system's clock is (the time may not move).
    (model / "a.bin").write_bytes(b"y" * 101)
    with pytest.raises(ModelcastError, match="changed while it was being published"):
        check_unchanged(files)


# -- hashing and the torrent ---------------------------------------------------------------


def test_hashes_match_xxh3_of_each_file(tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 3 * MiB + 1, "b.bin": 0, "c/d.bin": 12345, "e.bin": 8 * MiB})
    seen = []
    got = hash_files(scan(model), workers=2, progress=seen.append)
    assert got == {p: xxhash.xxh3_128_hexdigest((model / p).read_bytes())
                   for p in ("a.bin", "b.bin", "c/d.bin", "e.bin")}
    assert sum(seen) == 11 * MiB + 12346


def test_torrent_is_private_hybrid_and_deterministic(tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": MiB + 5, "empty.bin": 0, "w/b.bin": 300_000})
    seen = []
    t1, h1, _ = make_torrent(scan(model), "m", 262144, "http://127.0.0.1:1/announce", seen.append)
    t2, h2, _ = make_torrent(scan(model), "m", 262144, "http://127.0.0.1:1/announce")
    t3, h3, _ = make_torrent(scan(model), "m", 262144, "http://127.0.0.1:2/announce")
    assert sum(seen) == MiB + 5 + 300_000
    # Same files, same announce: the same bytes (no creation date, no creator).
    assert t1 == t2 and h1 == h2 == h3 and h1.v1 and h1.v2
    meta = lt.bdecode(t1)
    assert set(meta) == {b"announce", b"info", b"piece layers"}
    assert meta[b"announce"] == b"http://127.0.0.1:1/announce"
    # The announce URL lives outside the info dict: it does not change the info-hash.
    assert meta[b"info"] == lt.bdecode(t3)[b"info"]
    assert meta[b"info"][b"private"] == 1 and meta[b"info"][b"meta version"] == 2
    ti = lt.torrent_info(t1)
    assert ti.priv() and ti.info_hashes().has_v1() and ti.info_hashes().has_v2()
    assert (str(ti.info_hashes().v1), str(ti.info_hashes().v2)) == (h1.v1, h1.v2)
    fs = ti.layout()
    names = [fs.file_path(i) for i in range(fs.num_files()) if not fs.file_flags(i) & lt.file_storage.flag_pad_file]
    assert names == ["m/a.bin", "m/empty.bin", "m/w/b.bin"]


@pytest.fixture(params=["processes", "threads"])
def hashing(request, monkeypatch):
    """Hash pieces in worker processes (as a large publish does) or on threads (a small one)."""
    monkeypatch.setattr(piece_hash, "PROCESS_MIN", 0 if request.param == "processes" else 1 << 62)
    return request.param


@pytest.mark.parametrize("piece_length", [16384, 262144, 4 * MiB])
def test_parallel_hashing_writes_the_torrent_libtorrent_writes(tmp_path, piece_length, hashing):
    # Every node, aria2 and the registry read these bytes: they must be libtorrent's own,
    # whatever the sizes (empty, one block, one byte either side of a piece) and names
    # (sorted the way libtorrent sorts "a.b", "a/b", "a-b", non-ASCII), however hashed.
    sizes = {"a.bin": 3 * piece_length + 1, "a.b": piece_length, "a/b": piece_length - 1, "a-b": 1,
             "empty": 0, "z/y/x.bin": 16384 + 1, "é/ü.txt": 100, "w/big": 2 * piece_length + 16384}
    model = make_model(tmp_path / "m", sizes)
    files = [(f.path, str(f.source), f.size) for f in scan(model)]
    for v1_only in (False, True):
        ours = lt_adapter.build_torrent_parallel(files, "m", piece_length, "http://127.0.0.1:1/announce",
                                                 v1_only=v1_only, workers=3)
        theirs = lt_adapter.build_torrent(files, "m", piece_length, "http://127.0.0.1:1/announce", v1_only=v1_only)
        assert ours == theirs, f"v1_only={v1_only}: {lt.bdecode(ours)} != {lt.bdecode(theirs)}"
    one = [("only.bin", str(model / "a.bin"), sizes["a.bin"])]
    assert lt_adapter.build_torrent_parallel(one, "m", piece_length) == lt_adapter.build_torrent(one, "m", piece_length)


def test_a_file_shorter_than_scanned_missing_or_a_stop_ends_hashing_with_a_clear_error(tmp_path, hashing):
    model = make_model(tmp_path / "m", {"a.bin": 5 * MiB + 7, "b.bin": MiB})
    length = 256 << 10
    # The scan saw 6 MiB; the file holds 5 MiB + 7 bytes now (truncated, or rewritten shorter).
    slots = [piece_hash.FileSlot(model / "a.bin", 6 * MiB, 0), piece_hash.FileSlot(model / "b.bin", MiB, 24)]
    with pytest.raises(ModelcastError, match=r"a.bin shrank while it was hashed \(now 5242887 of 6291456 bytes\)"):
        piece_hash.PieceHasher(slots, length, 7 * MiB, workers=2).run()
    gone = [piece_hash.FileSlot(tmp_path / "gone.bin", MiB, 0)]
    with pytest.raises(FileNotFoundError):
        piece_hash.PieceHasher(gone, length, MiB, workers=2).run()
    stop = threading.Event()
    stop.set()
    ok = [piece_hash.FileSlot(model / "b.bin", MiB, 0)]
    with pytest.raises(ModelcastError, match="piece hashing stopped because another publish step failed"):
        piece_hash.PieceHasher(ok, length, MiB, workers=2, stop=stop).run()
    # And what the hashing of those bytes gives when nothing goes wrong: libtorrent's pieces.
    pieces, _ = piece_hash.PieceHasher(ok, length, MiB, workers=2).run()
    one = [("b.bin", str(model / "b.bin"), MiB)]
    assert pieces == lt.bdecode(lt_adapter.build_torrent(one, "m", length))[b"info"][b"pieces"]


def test_a_file_truncated_while_a_worker_process_hashes_it_is_reported_not_a_crash(tmp_path):
    # Truncated under the worker's mapping: it finds the file shorter before its next piece,
    # or dies of SIGBUS mid-piece; either way the publish says so in one line and lives on.
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(48 * MiB))
    truncated = []

    def truncate_once(_index: int) -> None:
        if not truncated:
            os.truncate(path, 0)
            truncated.append(True)

    slots = [piece_hash.FileSlot(path, 48 * MiB, 0)]
    with pytest.raises(ModelcastError, match=r"big.bin (shrank|changed) while it was hashed"):
        piece_hash.PieceHasher(slots, 256 << 10, 48 * MiB, workers=1, processes=True, on_piece=truncate_once).run()
    assert truncated

    # The SIGBUS itself (a truncation that lands mid-piece): what the publish says of it.
    path.write_bytes(os.urandom(48 * MiB))

    def workers() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, ValueError):
                continue
            if ppid == os.getpid() and b"piece_worker" in cmdline:
                found.append(int(entry))
        return found

    def bus_once(_index: int) -> None:
        if truncated:
            truncated.clear()
            for pid in workers():
                os.kill(pid, signal.SIGBUS)

    truncated.append(True)
    with pytest.raises(ModelcastError, match=r"big.bin changed while it was hashed \(it shrank under the hashing process\)"):
        piece_hash.PieceHasher(slots, 256 << 10, 48 * MiB, workers=1, processes=True, on_piece=bus_once).run()


def test_torrent_of_other_bytes_differs_and_errors_are_modelcast_errors(tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 1000})
    files = scan(model)
    _, h1, _ = make_torrent(files, "m", 262144)
    (model / "a.bin").write_bytes(b"z" * 1000)
    _, h2, _ = make_torrent(scan(model), "m", 262144)
    assert h1.v1 != h2.v1 and h1.v2 != h2.v2
    (model / "a.bin").unlink()
    with pytest.raises(ModelcastError, match="making the torrent of m failed"):
        make_torrent(files, "m", 262144)


def test_torrent_name_is_the_last_name_component():
    assert torrent_name_for("demo/resnet") == "resnet" and torrent_name_for("m") == "m"


# -- publish end to end (real tracker process, real origins) --------------------------------


def _cfg(tracker, tmp_path, **kw) -> PublishConfig:
    return PublishConfig(registry=tracker.url, origin=(tmp_path / "origin").as_uri(), token=TOKEN, **kw)


def _blob_mtimes(origin_dir):
    return {p: p.stat().st_mtime_ns for p in sorted((origin_dir / "blobs").rglob("*")) if p.is_file()}


def test_cli_publish_prints_the_digest_and_republishing_uploads_nothing(tracker, tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 2 * MiB, "sub/b.bin": MiB + 3, "same.bin": 0})
    origin_dir = tmp_path / "origin"
    digest = cli_publish(tracker.url, model, "demo/m:v1", origin_dir.as_uri())
    hexd = digest.split(":")[1]
    stored = (origin_dir / "manifests" / "sha256" / f"{hexd}.json").read_bytes()
    manifest = Manifest.from_bytes(stored, expected_digest=digest)
    assert [(f.path, f.size) for f in manifest.files] == [("a.bin", 2 * MiB), ("same.bin", 0), ("sub/b.bin", MiB + 3)]
    assert manifest.name == "demo/m" and manifest.torrent_name == "m" and manifest.kind == "model"
    assert manifest.created is None and b"created" not in stored  # no clock in the digested bytes
    torrent = (origin_dir / "torrents" / "sha256" / f"{hexd}.torrent").read_bytes()
    # A v1 torrent by default (modelcast/config.py PublishConfig.torrent_format: each node hashes a byte once).
    assert str(lt.torrent_info(torrent).info_hashes().v1) == manifest.info_hash.v1 and manifest.info_hash.v2 is None
    for f in manifest.files:
        assert (origin_dir / blob_relpath(f.xxh3_128)).read_bytes() == (model / f.path).read_bytes()
    before = _blob_mtimes(origin_dir)
    assert len(before) == 3

    # Same bytes again, under another tag: same digest, and not one blob rewritten.
    assert cli_publish(tracker.url, model, "demo/m:v2", origin_dir.as_uri()) == digest
    assert _blob_mtimes(origin_dir) == before
    listed = run_cli("ls", "--registry", tracker.url)
    assert listed.returncode == 0 and "demo/m" in listed.stdout


def test_republishing_identical_content_gives_the_same_digest_and_uploads_nothing(tracker, tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 2 * MiB, "b.bin": MiB})
    cfg = _cfg(tracker, tmp_path)
    first = publish_sync(model, Reference.parse("dedup/m:v1"), cfg, annotations={"framework": "torch"})
    assert first.created and first.uploaded_bytes == 3 * MiB and first.skipped_bytes == 0
    assert first.manifest.annotations == {"framework": "torch"} and first.seconds > 0
    again = publish_sync(model, Reference.parse("dedup/m:v2"), cfg, annotations={"framework": "torch"})
    assert again.digest == first.digest and again.uploaded_bytes == 0 and again.skipped_bytes == 3 * MiB
    assert not again.created
    # A new version sharing a file uploads only what changed.
    (model / "b.bin").write_bytes(os.urandom(MiB))
    third = publish_sync(model, Reference.parse("dedup/m:v3"), cfg, annotations={"framework": "torch"})
    assert third.digest != first.digest and third.uploaded_bytes == MiB and third.skipped_bytes == 2 * MiB


@pytest.mark.parametrize("torrent_format", ["v1", "hybrid"])
def test_a_publish_stores_the_manifest_and_torrent_a_plain_computation_gives(tracker, tmp_path, hashing,
                                                                             torrent_format):
    # Odd sizes: an empty file, 1 byte, exactly one piece, a piece and a byte, a few pieces and a
    # few bytes, one block and a byte; the reference is libtorrent's own hashing and xxh3 of
    # each file read whole, the plain way.
    length = 256 << 10
    sizes = {"empty": 0, "one-byte": 1, "one-piece": length, "piece-plus-1": length + 1,
             "w/several": 3 * length + 5, "w/x/block-plus-1": 16384 + 1}
    model = make_model(tmp_path / "m", sizes)
    assert choose_piece_length(sum(sizes.values())) == length
    result = publish_sync(model, Reference.parse("odd/sizes:v1"), _cfg(tracker, tmp_path, torrent_format=torrent_format))
    hexd = result.digest.split(":")[1]
    origin_dir = tmp_path / "origin"
    stored_torrent = (origin_dir / "torrents" / "sha256" / f"{hexd}.torrent").read_bytes()
    stored_manifest = (origin_dir / "manifests" / "sha256" / f"{hexd}.json").read_bytes()

    paths = sorted(sizes)
    files = [(p, str(model / p), sizes[p]) for p in paths]
    torrent = lt_adapter.build_torrent(files, "sizes", length, f"{tracker.url}/announce",
                                       v1_only=torrent_format == "v1")
    info = lt.torrent_info(torrent).info_hashes()
    manifest = Manifest(
        kind="model", name="odd/sizes", piece_length=length, torrent_name="sizes",
        info_hash=InfoHashes(v1=str(info.v1), v2=str(info.v2) if info.has_v2() else None),
        files=tuple(FileEntry(p, sizes[p], xxhash.xxh3_128_hexdigest((model / p).read_bytes())) for p in paths))
    assert stored_torrent == torrent
    assert stored_manifest == manifest.canonical_bytes()
    assert result.digest == manifest.digest


def test_duplicate_files_in_one_artifact_are_stored_once(tracker, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    data = os.urandom(MiB)
    (model / "a.bin").write_bytes(data)
    (model / "b.bin").write_bytes(data)
    result = publish_sync(model, Reference.parse("dup/m:v1"), _cfg(tracker, tmp_path))
    assert result.uploaded_bytes == MiB and result.skipped_bytes == MiB
    assert len(_blob_mtimes(tmp_path / "origin")) == 1


def test_publish_a_single_file(tracker, tmp_path):
    one = tmp_path / "model.onnx"
    one.write_bytes(os.urandom(1000))
    result = publish_sync(one, Reference.parse("single/onnx:v1"), _cfg(tracker, tmp_path))
    assert [(f.path, f.size) for f in result.manifest.files] == [("model.onnx", 1000)]
    assert result.manifest.torrent_name == "onnx"


async def test_publish_keeps_the_event_loop_responsive(tracker, tmp_path):
    # Piece hashing runs on threads of this process: they must leave the event loop its turns.
    model = make_model(tmp_path / "m", {"a.bin": 128 * MiB})
    task = asyncio.create_task(publish(model, Reference.parse("loop/m:v1"), _cfg(tracker, tmp_path)))
    worst = 0.0
    while not task.done():
        t = time.monotonic()
        await asyncio.sleep(0.005)  # measures the loop: how late this 5 ms sleep ends is what is tested
        worst = max(worst, time.monotonic() - t)
    result = await task
    assert result.uploaded_bytes == 128 * MiB
    # Generous for a loaded CI box; libtorrent's GIL-holding hash of 128 MiB blocked it for ~0.3 s.
    assert worst < 0.2, f"event loop blocked for {worst:.3f}s"
    assert threading.active_count() < 20


def test_publish_to_s3_puts_blobs_manifest_and_torrent_in_the_bucket(tracker, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    model = make_model(tmp_path / "m", {"a.bin": 70 * MiB, "small.txt": 100})
    digest = cli_publish(tracker.url, model, "s3pub/m:v1", f"s3://{bucket}/pre", "--s3-endpoint", endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    hexd = digest.split(":")[1]
    assert f"pre/manifests/sha256/{hexd}.json" in keys and f"pre/torrents/sha256/{hexd}.torrent" in keys
    blob = xxhash.xxh3_128_hexdigest((model / "a.bin").read_bytes())
    assert keys[f"pre/blobs/xxh3_128/{blob[:2]}/{blob}"] == 70 * MiB
    small = xxhash.xxh3_128_hexdigest((model / "small.txt").read_bytes())
    assert keys[f"pre/blobs/xxh3_128/{small[:2]}/{small}"] == 100
    # 70 MiB is above the multipart threshold: S3 records the part count in the ETag.
    etag = s3.head_object(Bucket=bucket, Key=f"pre/blobs/xxh3_128/{blob[:2]}/{blob}")["ETag"]
    assert etag.strip('"').endswith("-5")
    manifest = s3.get_object(Bucket=bucket, Key=f"pre/manifests/sha256/{hexd}.json")["Body"].read()
    assert Manifest.from_bytes(manifest, expected_digest=digest).total_size == 70 * MiB + 100

    again = publish_sync(model, Reference.parse("s3pub/m:v2"),
                         PublishConfig(registry=tracker.url, origin=f"s3://{bucket}/pre", s3_endpoint=endpoint,
                                       token=TOKEN))
    assert again.digest == digest and again.uploaded_bytes == 0


# -- errors a user meets, one line each -------------------------------------------------------


def _one_line_error(out) -> str:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


def test_cli_bad_token_fails_in_one_line_before_uploading(tracker, tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 1000})
    out = run_cli("publish", str(model), "demo/m:v1", "--registry", tracker.url,
                  "--origin", (tmp_path / "origin").as_uri(), "--token", "wrong")
    line = _one_line_error(out)
    assert line.startswith("modelcast publish: error:") and "demo/m:v1" in line
    assert not (tmp_path / "origin").exists()


def test_cli_unreachable_registry_fails_in_one_line_naming_it(tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 1000})
    url = f"http://127.0.0.1:{free_port()}"
    out = run_cli("publish", str(model), "demo/m:v1", "--registry", url,
                  "--origin", (tmp_path / "origin").as_uri(), "--token", TOKEN)
    assert url in _one_line_error(out)


def test_cli_unsafe_link_and_missing_bucket_fail_in_one_line(tracker, s3_server, tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 1000})
    (tmp_path / "secret").write_text("x")
    (model / "leak").symlink_to(tmp_path / "secret")
    out = run_cli("publish", str(model), "demo/m:v1", "--registry", tracker.url,
                  "--origin", (tmp_path / "origin").as_uri(), "--token", TOKEN)
    assert "leak" in _one_line_error(out)
    (model / "leak").unlink()

    out = run_cli("publish", str(model), "demo/m:v1", "--registry", tracker.url,
                  "--origin", "s3://no-such-bucket/x", "--s3-endpoint", s3_server, "--token", TOKEN)
    assert "s3://no-such-bucket/x" in _one_line_error(out)


def test_origin_failure_is_an_origin_error_and_nothing_is_registered(tracker, s3_server, tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 2 * MiB})
    cfg = PublishConfig(registry=tracker.url, origin="s3://no-such-bucket/x", s3_endpoint=s3_server, token=TOKEN)
    with pytest.raises(OriginError, match="no-such-bucket"):
        publish_sync(model, Reference.parse("fail/m:v1"), cfg)
    out = run_cli("ls", "--registry", tracker.url)
    assert "fail/m" not in out.stdout
