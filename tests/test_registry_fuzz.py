"""Fuzzed registry requests never crash the server or corrupt the registry.

Hypothesis sends arbitrary JSON, mutated valid publish bodies and raw bytes to
``POST /v1/artifacts``, arbitrary paths to the delete routes and arbitrary query values
to the read routes of a real aiohttp server.  Every answer must be a JSON error with a
4xx status (never a 500), and afterwards the registry must hold exactly what was validly
published: the listing, the tags and every manifest are unchanged, and a valid publish
still works.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .helpers import AUTH, api_publish, build_artifact, upload


class Seeded:
    """What the registry must keep: digest -> tags, and the valid body that published it."""

    def __init__(self, expected: dict[str, list[str]], body: dict):
        self.expected, self.body = expected, body
        self.digest = next(iter(expected))

    def __repr__(self) -> str:  # Hypothesis prints fixtures of a failing example; keep it short.
        return f"Seeded({self.expected})"


def q(text: str, safe: str = "") -> str:
    """Percent-encode anything, lone surrogates included (as their would-be UTF-8 bytes)."""
    return quote(text, safe=safe, errors="surrogatepass")


def query(**params: str) -> str:
    return "?" + "&".join(f"{k}={q(v)}" for k, v in params.items())


FUZZ = settings(max_examples=150, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Text that reaches the parsers' corners: lone surrogates (not encodable as UTF-8),
# unsafe paths, digests, control characters, and anything else Hypothesis draws.
tricky = st.sampled_from(["", "\ud800", "a\udc80b", "../x", "/etc/passwd", "a/../../b", "sha256:" + "0" * 64,
                          "demo/model", "v1", "file:///tmp/o", "s3://b/p", "http://[::1", "file://[/x", "\x00", "²",
                          "NaN", "9" * 5000])
texts = st.one_of(st.text(max_size=40), tricky)
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)),
                           max_leaves=12)


def _set(body: dict, path: tuple, value) -> dict:
    """A deep copy of ``body`` with the field at ``path`` replaced (or deleted when value is ...)."""
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        node.pop(path[-1], None) if isinstance(node, dict) else node.pop(path[-1])
    else:
        node[path[-1]] = value
    return body


FIELDS = [("manifest",), ("torrent",), ("origin",), ("tag",), ("origin", "url"), ("origin", "s3_endpoint"),
          ("manifest", "name"), ("manifest", "kind"), ("manifest", "files"), ("manifest", "files", 0),
          ("manifest", "files", 0, "path"), ("manifest", "files", 0, "size"), ("manifest", "files", 0, "xxh3_128"),
          ("manifest", "info_hash"), ("manifest", "info_hash", "v1"), ("manifest", "piece_length"),
          ("manifest", "torrent_name"), ("manifest", "total_size"), ("manifest", "annotations"),
          ("manifest", "created"), ("manifest", "schema_version")]


async def _assert_unchanged(client, expected: dict[str, list[str]]) -> None:
    """The registry lists exactly ``expected`` (digest -> tags), and each manifest is intact."""
    listed = await (await client.get("/v1/artifacts", params={"limit": "500"})).json()
    assert {a["digest"]: a["tags"] for a in listed["artifacts"]} == expected
    for digest in expected:
        resp = await client.get(f"/v1/artifacts/{digest}")
        assert resp.status == 200
        import hashlib

        assert "sha256:" + hashlib.sha256(await resp.read()).hexdigest() == digest


def digest_of(body: dict) -> str:
    import hashlib

    from modelcast.manifest import canonical_json

    return "sha256:" + hashlib.sha256(canonical_json(body["manifest"])).hexdigest()


class _Built:
    """Re-publishes a stored body through helpers.api_publish."""

    def __init__(self, body: dict):
        self._body = body

    def body(self, origin, tag):
        return {**self._body, "tag": tag}


async def _send(client, method: str, path: str, **kwargs) -> int:
    resp = await client.request(method, path, **kwargs)
    text = await resp.text()
    assert resp.status < 500, f"{method} {path} -> {resp.status}: {text[:500]}"
    if resp.status == 400 and len(path) > 8000:
        return resp.status  # aiohttp's HTTP parser refuses an 8 KiB request line before the app sees it
    if resp.status >= 400:
        body = json.loads(text)
        assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["code"]
    return resp.status


@pytest.fixture
async def seeded(client, art, origin) -> Seeded:
    """One valid artifact, tagged v1."""
    upload(art, origin)
    await api_publish(client, art, origin)
    return Seeded({art.digest: ["v1"]}, art.body(origin, tag="fuzz"))


@FUZZ
@given(body=json_values)
async def test_publish_of_arbitrary_json_is_a_clean_4xx(client, seeded, body):
    status = await _send(client, "POST", "/v1/artifacts", data=json.dumps(body), headers=AUTH)
    assert status in (400, 413)
    await _assert_unchanged(client, seeded.expected)


@FUZZ
@given(field=st.sampled_from(FIELDS), value=st.one_of(json_values, st.just(...)))
# Each of these was a 500 once: a lone surrogate cannot be UTF-8, and urlparse raises on '['.
@example(field=("manifest", "created"), value="\ud800")
@example(field=("manifest", "annotations"), value={"k": "\udfff"})
@example(field=("origin", "url"), value="file://[/x")
@example(field=("origin", "s3_endpoint"), value="http://[::1")
@example(field=("manifest", "created"), value="2026-01-01T00:00:00Z")  # valid: a new artifact
@example(field=("tag",), value="v1")  # valid: the tag moves
async def test_publish_of_a_mutated_valid_body_is_refused_or_valid(client, seeded, field, value):
    body = _set(seeded.body, field, value)
    status = await _send(client, "POST", "/v1/artifacts", data=json.dumps(body), headers=AUTH)
    if status in (200, 201):
        # Some mutations stay valid: another tag or none, or another creation time or
        # annotations (a new, valid manifest for the same torrent).  Then exactly that is stored.
        answer = await (await client.get("/v1/resolve", params={"ref": body["manifest"]["name"] + "@" + digest_of(body)})).json()
        assert answer["manifest"] == body["manifest"]
        tag = body.get("tag")
        expected = dict(seeded.expected)
        expected[answer["digest"]] = sorted(set(expected.get(answer["digest"], [])) | ({tag} if tag else set()))
        if tag == "v1":  # the tag moved to the new artifact
            expected = {d: [t for t in tags if t != "v1" or d == answer["digest"]] for d, tags in expected.items()}
        await _assert_unchanged(client, expected)
        # Undo, so that every example starts from the seeded registry.
        if answer["digest"] != seeded.digest:
            resp = await client.delete(f"/v1/artifacts/{answer['digest']}?force=1", headers=AUTH)
            assert resp.status == 200
        elif tag and tag != "v1":
            assert (await client.delete(f"/v1/tags/demo/model:{tag}", headers=AUTH)).status == 200
        if tag == "v1":
            await api_publish(client, _Built(seeded.body), None, tag="v1", status=200)
    await _assert_unchanged(client, seeded.expected)


@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b"[" * 100_000 + b"]" * 100_000)
@example(raw=b'{"manifest": ' * 5000)
@example(raw=b'{"manifest": {"size": ' + b"9" * 5000 + b"}}")
@example(raw=b'{"manifest": NaN, "torrent": Infinity}')
@example(raw=b"\xff\xfe\x00")
async def test_publish_of_raw_bytes_is_a_clean_4xx(client, seeded, raw):
    status = await _send(client, "POST", "/v1/artifacts", data=raw,
                         headers={**AUTH, "Content-Type": "application/json"})
    assert status == 400
    await _assert_unchanged(client, seeded.expected)


@FUZZ
@given(ref=texts, digest=texts, force=texts, name=texts)
@example(ref="demo/model", digest="sha256:" + "1" * 64, force="1", name="demo/model")
@example(ref="demo/model:nope", digest="sha256:" + "0" * 64, force="true", name="Bad Name")
async def test_delete_of_arbitrary_references_never_crashes(client, seeded, ref, digest, force, name):
    if ref == "demo/model:v1" or digest == seeded.digest:
        return  # a valid delete of the seeded artifact is tested elsewhere
    await _send(client, "DELETE", "/v1/tags/" + q(ref, safe="/:"), headers=AUTH)
    await _send(client, "DELETE", "/v1/artifacts/" + q(digest, safe=":") + query(force=force, name=name), headers=AUTH)
    await _assert_unchanged(client, seeded.expected)


@FUZZ
@given(ref=texts, limit=texts, after=texts, name=texts, content_key=texts)
@example(ref="x", limit="\u00b2", after="", name="", content_key="")  # isdigit() but not int()
@example(ref="x", limit="9" * 5000, after="", name="", content_key="")  # past int()'s digit limit
async def test_reads_with_arbitrary_parameters_never_crash(client, seeded, ref, limit, after, name, content_key):
    await _send(client, "GET", "/v1/resolve" + query(ref=ref))
    await _send(client, "GET", "/v1/artifacts" + query(limit=limit, after=after, name=name, content_key=content_key))
    await _send(client, "GET", "/v1/artifacts/" + q(ref, safe=":"))
    await _send(client, "GET", "/v1/artifacts/" + q(ref, safe=":") + "/torrent")
    await _send(client, "GET", "/v1/webseed/" + q(ref, safe=":") + "/" + q(after, safe="/"))
    await _assert_unchanged(client, seeded.expected)


async def test_registry_still_publishes_after_a_storm_of_bad_requests(client, seeded, tmp_path, origin):
    """Bad requests leave nothing behind that gets in the way of the next valid publish."""
    for raw in (b"{", b"[]", b'{"manifest": {}}', b"\x00" * 1000):
        await _send(client, "POST", "/v1/artifacts", data=raw, headers=AUTH)
    other = build_artifact(tmp_path, name="demo/other")
    await api_publish(client, other, origin, tag="v2")
    await _assert_unchanged(client, {**seeded.expected, other.digest: ["v2"]})
