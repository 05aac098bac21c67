"""The artifact contract: references, canonical manifests, digests and path rules."""

from __future__ import annotations

import json

import pytest

from modelcast.errors import InvalidManifest, InvalidReference, UnsafePath
from modelcast.manifest import FileEntry, InfoHashes, Manifest, choose_piece_length, validate_path
from modelcast.reference import Reference

HEX = "ab" * 32


def manifest(**over) -> Manifest:
    fields = dict(kind="model", name="team/resnet", piece_length=262144, torrent_name="resnet",
                  info_hash=InfoHashes(v1="1" * 40, v2="2" * 64),
                  files=(FileEntry("a.bin", 3, "0" * 32), FileEntry("w/b.bin", 5, "f" * 32)),
                  annotations={"framework": "onnx"})
    fields.update(over)
    return Manifest(**fields)


@pytest.mark.parametrize("text,expected", [
    ("resnet:v3", ("resnet", "v3", None)),
    ("team/resnet-50:v3.1", ("team/resnet-50", "v3.1", None)),
    (f"team/resnet@sha256:{HEX}", ("team/resnet", None, f"sha256:{HEX}")),
    (f"sha256:{HEX}", (None, None, f"sha256:{HEX}")),
])
def test_references_parse_and_print_back(text, expected):
    ref = Reference.parse(text)
    assert (ref.name, ref.tag, ref.digest) == expected
    assert str(ref) == text


@pytest.mark.parametrize("text", ["", "Resnet:v1", "resnet", "resnet:", "res//net:v1", "resnet:-x",
                                  "sha256:abc", f"resnet@sha256:{HEX[:-1]}", "resnet:v1:x/y", "../x:v1"])
def test_bad_references_are_refused_with_the_text_in_the_message(text):
    with pytest.raises(InvalidReference) as err:
        Reference.parse(text)
    assert isinstance(err.value, ValueError)


def test_canonical_bytes_and_digest_are_stable():
    m = manifest()
    data = m.canonical_bytes()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    assert b" " not in data.replace(b"team/resnet", b"")
    assert Manifest.from_bytes(data, expected_digest=m.digest) == m
    assert m.digest.startswith("sha256:") and len(m.digest) == 71
    # Nothing clock-dependent in the digested bytes: the digest is the content key.
    assert b"created" not in data and m.digest == m.content_key
    assert manifest(annotations={}).content_key != m.content_key
    # A manifest written with a creation time inside (before digests were clock-free)
    # still parses and verifies against its own digest.
    legacy = manifest(created="2026-11-23T00:00:00Z")
    assert legacy.digest != m.digest and legacy.content_key == m.content_key
    assert Manifest.from_bytes(legacy.canonical_bytes(), expected_digest=legacy.digest) == legacy
    for bad in (None, "", 3):
        with pytest.raises(InvalidManifest, match="created"):
            Manifest.from_json({**json.loads(data), "created": bad})


def test_manifest_bytes_that_do_not_hash_to_the_digest_are_refused():
    m = manifest()
    with pytest.raises(InvalidManifest, match="hash to"):
        Manifest.from_bytes(m.canonical_bytes() + b" ", expected_digest=m.digest)


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "C:/x", "a\\b",
                                  "a\x00b"])
def test_unsafe_paths_are_refused(path):
    with pytest.raises(UnsafePath):
        validate_path(path)
    with pytest.raises(InvalidManifest):
        manifest(files=(FileEntry(path, 1, "0" * 32),))


def test_manifest_structure_rules():
    with pytest.raises(InvalidManifest, match="sorted"):
        manifest(files=(FileEntry("b", 1, "0" * 32), FileEntry("a", 1, "0" * 32)))
    with pytest.raises(InvalidManifest, match="under file"):
        manifest(files=(FileEntry("a", 1, "0" * 32), FileEntry("a/b", 1, "0" * 32)))
    with pytest.raises(InvalidManifest, match="power of two"):
        manifest(piece_length=300000)
    with pytest.raises(InvalidManifest, match="kind"):
        manifest(kind="image")
    body = manifest().body()
    body["total_size"] += 1
    with pytest.raises(InvalidManifest, match="total_size"):
        Manifest.from_json(body)
    with pytest.raises(InvalidManifest):
        Manifest.from_json({"kind": "model"})


def test_piece_length_grows_with_size_within_bounds():
    assert choose_piece_length(10) == 256 * 1024
    assert choose_piece_length(200 << 20) == 256 * 1024
    assert choose_piece_length(1 << 30) == 1 << 20
    assert choose_piece_length(1 << 40) == 16 << 20
