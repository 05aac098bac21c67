"""The origin store: file:// and S3 (a real S3-compatible server process)."""

from __future__ import annotations

import os

import boto3
import pytest

from modelcast.errors import BadRequest, OriginError
from adapters.origin import FileOrigin, S3Origin, blob_relpath, open_origin
from harness.procs import free_port

MiB = 1 << 20


@pytest.fixture(params=["file", "s3"])
def origin(request, tmp_path):
    if request.param == "file":
        return open_origin((tmp_path / "origin").as_uri())
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return open_origin(f"s3://{bucket}/some/prefix", endpoint)


def test_blobs_round_trip_with_ranges(origin, tmp_path):
    data = bytes(range(256)) * 4096 + b"tail"
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    key = "0123456789abcdef0123456789abcdef"
    assert origin.blob_size(key) is None and not origin.has_blob(key, len(data))
    seen = []
    origin.put_blob(key, src, len(data), seen.append)
    assert origin.has_blob(key, len(data)) and sum(seen) == len(data)
    assert not origin.has_blob(key, len(data) + 1)
    assert b"".join(origin.read_blob(key, 0, len(data) - 1)) == data
    assert b"".join(origin.read_blob(key, 1000, 1999)) == data[1000:2000]
    assert b"".join(origin.read_blob(key, len(data) - 4, len(data) - 1)) == b"tail"


def test_documents_land_under_the_origin_root(origin, tmp_path):
    origin.put_document("manifests/sha256/x.json", b"{}")
    origin.put_document("manifests/sha256/x.json", b'{"a":1}')  # rewriting is allowed
    if isinstance(origin, FileOrigin):
        assert (origin.root / "manifests/sha256/x.json").read_bytes() == b'{"a":1}'
    else:
        body = boto3.client("s3", endpoint_url=origin.endpoint_url).get_object(
            Bucket=origin.bucket, Key="some/prefix/manifests/sha256/x.json")["Body"].read()
        assert body == b'{"a":1}'


def test_file_origin_writes_atomically(tmp_path):
    origin = FileOrigin(tmp_path / "o")
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    origin.put_blob("ff" * 16, src, 100)
    leftovers = [p.name for p in (tmp_path / "o").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_file_origin_refuses_a_source_whose_size_changed(tmp_path):
    # The blob's name is the hash of the bytes as scanned; other bytes must never land under it.
    origin = FileOrigin(tmp_path / "o")
    src = tmp_path / "src"
    src.write_bytes(b"x" * 150)
    with pytest.raises(OriginError, match="150 bytes but was hashed at 100"):
        origin.put_blob("ee" * 16, src, 100)
    assert origin.blob_size("ee" * 16) is None
    assert [p.name for p in (tmp_path / "o").rglob("*") if p.is_file()] == []


def test_file_origin_copies_large_files_byte_identical(tmp_path):
    origin = FileOrigin(tmp_path / "o")
    src = tmp_path / "big"
    data = os.urandom(3 * MiB) * 30 + b"end"  # above one 64 MiB copy_file_range call
    src.write_bytes(data)
    seen = []
    origin.put_blob("dd" * 16, src, len(data), seen.append)
    assert sum(seen) == len(data) and len(seen) > 1
    assert (tmp_path / "o" / blob_relpath("dd" * 16)).read_bytes() == data


def test_s3_multipart_upload_reads_back_byte_identical(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    # S3's smallest part is 5 MiB: a 12 MiB file becomes three parts.
    origin = S3Origin(bucket, "mp", endpoint_url=endpoint, multipart_threshold=5 * MiB, multipart_chunk=5 * MiB)
    data = os.urandom(12 * MiB + 17)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    key = "ab" * 16
    seen = []
    origin.put_blob(key, src, len(data), seen.append)
    assert sum(seen) == len(data)
    head = boto3.client("s3", endpoint_url=endpoint).head_object(Bucket=bucket, Key=f"mp/{blob_relpath(key)}")
    # S3 records the part count of a multipart upload in the ETag.
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == len(data)
    assert b"".join(origin.read_blob(key, 0, len(data) - 1)) == data
    assert b"".join(origin.read_blob(key, 5 * MiB - 3, 5 * MiB + 2)) == data[5 * MiB - 3: 5 * MiB + 3]


def test_s3_errors_name_the_origin(s3_server, tmp_path):
    origin = open_origin("s3://no-such-bucket/p", s3_server)
    with pytest.raises(OriginError, match="s3://no-such-bucket/p"):
        origin.put_document("x", b"y")
    src = tmp_path / "f"
    src.write_bytes(b"z")
    with pytest.raises(OriginError, match="s3://no-such-bucket/p"):
        origin.put_blob("aa" * 16, src, 1)
    assert isinstance(origin, S3Origin)


def test_unreachable_s3_endpoint_is_an_origin_error(s3_server):
    endpoint = f"http://127.0.0.1:{free_port()}"
    origin = open_origin("s3://bucket/p", endpoint)
    with pytest.raises(OriginError, match=f"s3://bucket/p.*{endpoint}"):
        origin.blob_size("aa" * 16)
    with pytest.raises(OriginError, match="s3://bucket/p"):
        list(origin.read_blob("aa" * 16, 0, 9))


def test_file_origin_errors_name_the_origin(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    origin = FileOrigin(tmp_path / "file" / "o")
    with pytest.raises(OriginError, match="origin file://"):
        origin.put_document("manifests/x.json", b"{}")
    with pytest.raises(OriginError, match="file://"):
        list(origin.read_blob("aa" * 16, 0, 9))


def test_bad_origin_urls_are_refused():
    for url in ("http://x/y", "file://host/x", "s3:///x", "ftp://a", ""):
        with pytest.raises(BadRequest, match="origin"):
            open_origin(url)
