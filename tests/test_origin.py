"""The origin store: file:// and S3 (a real S3-compatible server process)."""

from __future__ import annotations

import pytest

from modelcast.errors import BadRequest, OriginError
from modelcast.origin import FileOrigin, S3Origin, open_origin


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
    assert b"".join(origin.read_blob(key, 0, len(data) - 1)) == data
    assert b"".join(origin.read_blob(key, 1000, 1999)) == data[1000:2000]
    assert b"".join(origin.read_blob(key, len(data) - 4, len(data) - 1)) == b"tail"
    origin.put_document("manifests/sha256/x.json", b"{}")


def test_file_origin_writes_atomically(tmp_path):
    origin = FileOrigin(tmp_path / "o")
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    origin.put_blob("ff" * 16, src, 100)
    leftovers = [p.name for p in (tmp_path / "o").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_s3_errors_name_the_origin(s3_server):
    origin = open_origin("s3://no-such-bucket/p", s3_server)
    with pytest.raises(OriginError, match="s3://no-such-bucket/p"):
        origin.put_document("x", b"y")
    assert isinstance(origin, S3Origin)


def test_bad_origin_urls_are_refused():
    for url in ("http://x/y", "file://host/x", "s3:///x", "ftp://a"):
        with pytest.raises(BadRequest, match="origin"):
            open_origin(url)
