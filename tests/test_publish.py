"""Publishing: scanning, hashing, the torrent, dedup, and S3."""

from __future__ import annotations

import os

import boto3
import libtorrent as lt
import pytest
import xxhash

from distributor.hashing import hash_files
from distributor.publish import publish_sync
from distributor.scan import scan
from distributor.torrent import make_torrent
from modelcast.config import PublishConfig
from modelcast.errors import UnsafePath
from modelcast.reference import Reference

from .helpers import TOKEN, make_model, publish

MiB = 1 << 20


def test_scan_follows_inner_links_and_refuses_escaping_ones(tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 10, "sub/b.bin": 20})
    (model / "alias.bin").symlink_to("sub/b.bin")
    (model / "subdir").symlink_to("sub")
    assert [(f.path, f.size) for f in scan(model)] == [
        ("a.bin", 10), ("alias.bin", 20), ("sub/b.bin", 20), ("subdir/b.bin", 20)]

    (tmp_path / "outside.txt").write_text("secret")
    for name, target in [("rel", "../outside.txt"), ("abs", str(tmp_path / "outside.txt")), ("dangling", "nope")]:
        link = model / name
        link.symlink_to(target)
        with pytest.raises(UnsafePath, match=name):
            scan(model)
        link.unlink()
    os.mkfifo(model / "pipe")
    with pytest.raises(UnsafePath, match="pipe"):
        scan(model)


def test_hashes_match_xxh3_of_each_file(tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 3 * MiB + 1, "b.bin": 0, "c/d.bin": 12345})
    got = hash_files(scan(model), workers=2)
    assert got == {p: xxhash.xxh3_128_hexdigest((model / p).read_bytes()) for p in ("a.bin", "b.bin", "c/d.bin")}


def test_torrent_is_private_hybrid_and_deterministic(tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": MiB + 5, "w/b.bin": 300_000})
    t1, h1 = make_torrent(scan(model), "m", 262144, "http://127.0.0.1:1/announce")
    t2, h2 = make_torrent(scan(model), "m", 262144, "http://127.0.0.1:2/announce")
    assert h1 == h2 and h1.v1 and h1.v2
    ti = lt.torrent_info(t1)
    assert ti.priv() and ti.info_hashes().has_v1() and ti.info_hashes().has_v2()
    assert lt.bdecode(t1)[b"info"] == lt.bdecode(t2)[b"info"]
    fs = ti.layout()
    names = [fs.file_path(i) for i in range(fs.num_files()) if not fs.file_flags(i) & lt.file_storage.flag_pad_file]
    assert names == ["m/a.bin", "m/w/b.bin"]


def test_republishing_identical_content_gives_the_same_digest_and_uploads_nothing(tracker, tmp_path):
    model = make_model(tmp_path / "m", {"a.bin": 2 * MiB, "b.bin": MiB})
    cfg = PublishConfig(registry=tracker.url, origin=(tmp_path / "origin").as_uri(), token=TOKEN)
    first = publish_sync(model, Reference.parse("dedup/m:v1"), cfg)
    assert first.created and first.uploaded_bytes == 3 * MiB
    again = publish_sync(model, Reference.parse("dedup/m:v2"), cfg)
    assert again.digest == first.digest and again.uploaded_bytes == 0 and again.skipped_bytes == 3 * MiB
    # A new version sharing a file uploads only what changed.
    (model / "b.bin").write_bytes(os.urandom(MiB))
    third = publish_sync(model, Reference.parse("dedup/m:v3"), cfg)
    assert third.digest != first.digest and third.uploaded_bytes == MiB and third.skipped_bytes == 2 * MiB


def test_publish_to_s3_puts_blobs_manifest_and_torrent_in_the_bucket(tracker, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    model = make_model(tmp_path / "m", {"a.bin": 70 * MiB, "small.txt": 100})
    digest = publish(tracker.url, model, "s3pub/m:v1", f"s3://{bucket}/pre", "--s3-endpoint", endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    hexd = digest.split(":")[1]
    assert f"pre/manifests/sha256/{hexd}.json" in keys and f"pre/torrents/sha256/{hexd}.torrent" in keys
    blob = xxhash.xxh3_128_hexdigest((model / "a.bin").read_bytes())
    assert keys[f"pre/blobs/xxh3_128/{blob[:2]}/{blob}"] == 70 * MiB
    # 70 MiB is above the multipart threshold: S3 records the part count in the ETag.
    etag = s3.head_object(Bucket=bucket, Key=f"pre/blobs/xxh3_128/{blob[:2]}/{blob}")["ETag"]
    assert etag.strip('"').endswith("-5")
