"""The ``modelcast`` runtime_env field as pure data: parsing, URIs, names, error classes.

``runtime_env={"modelcast": {"artifacts": {"MODEL": "resnet:v3"}, "runtime": "ort:1.31"}}``, and
``"hf": {"MODEL": "org/name"}`` (``""``: the repo it was published from) to lay an artifact
out in the Hugging Face hub cache as well (``modelcast pull --hf``).

No I/O and no Ray here: the plugin, the Serve helpers and the tests share these rules.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from modelcast.errors import (ArtifactNotFound, BadRequest, InvalidManifest, InvalidReference, ModelcastError,
                              QuotaExceeded, RemoteError, Unauthorized, UnsafePath)
from modelcast.hf import HfName
from modelcast.reference import Reference

FIELD = "modelcast"
ARTIFACT_SCHEME = "modelcast://"
RUNTIME_SCHEME = "modelcast-runtime://"
RUNTIME_KEY = "RUNTIME"
_KEY = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")

class NoRuntimeSupport(ModelcastError, LookupError):
    """The node daemon has no runtime-layer API (``POST /v1/runtime/activate``)."""

    code = "no_runtime_support"
    http_status = 404


# Error codes a retry cannot fix: the user has to change the reference, the token or the
# node's quota.  Everything else (unreachable daemon or registry, a download that failed,
# a repair under way) is worth another attempt.
PERMANENT_CODES = frozenset({
    InvalidReference.code, InvalidManifest.code, UnsafePath.code, BadRequest.code, ArtifactNotFound.code,
    Unauthorized.code, QuotaExceeded.code, NoRuntimeSupport.code,
})


@dataclass(frozen=True)
class ArtifactSpec:
    """One artifact a worker needs: ``key`` names its environment variables."""

    key: str
    ref: str
    hf: str | None = None  # lay it out in the Hugging Face cache as this repo ("": as published)

    @property
    def uri(self) -> str:
        # The layout is part of what create() makes, so it is part of the URI Ray caches by.
        return ARTIFACT_SCHEME + self.ref + (f"#hf={self.hf}" if self.hf is not None else "")

    @property
    def holder(self) -> str:
        """Who holds the node pin while Ray uses the artifact (one holder per URI)."""
        return holder_for(self.uri[len(ARTIFACT_SCHEME):])

    @property
    def path_var(self) -> str:
        return f"MODELCAST_{self.key}_PATH"

    @property
    def digest_var(self) -> str:
        return f"MODELCAST_{self.key}_DIGEST"


@dataclass(frozen=True)
class EnvSpec:
    """The parsed ``modelcast`` field of a runtime_env."""

    artifacts: tuple[ArtifactSpec, ...]
    runtime: str | None = None

    @property
    def uris(self) -> list[str]:
        out = [a.uri for a in self.artifacts]
        if self.runtime:
            out.append(RUNTIME_SCHEME + self.runtime)
        return out

    def artifact_for(self, uri: str) -> ArtifactSpec | None:
        return next((a for a in self.artifacts if a.uri == uri), None)


def holder_for(ref: str) -> str:
    return "ray-env:" + ref


def parse_env(field: object) -> EnvSpec:
    """Parse and check the ``modelcast`` field; raises BadRequest/InvalidReference (ValueError)."""
    example = '{"artifacts": {"MODEL": "name:tag"}, "runtime": "name:tag", "hf": {"MODEL": "org/name"}}'
    if not isinstance(field, dict):
        raise BadRequest(f"runtime_env field {FIELD!r} must be a dict like {example}, got {type(field).__name__}")
    unknown = set(field) - {"artifacts", "runtime", "hf"}
    if unknown:
        raise BadRequest(f"runtime_env field {FIELD!r} has unknown keys {sorted(unknown)}; expected {example}")
    arts = field.get("artifacts") or {}
    if not isinstance(arts, dict):
        raise BadRequest(f"{FIELD}.artifacts must map KEY -> reference, e.g. {{\"MODEL\": \"resnet:v3\"}}")
    hf = field.get("hf") or {}
    if not isinstance(hf, dict) or set(hf) - set(arts):
        raise BadRequest(f"{FIELD}.hf must map keys of {FIELD}.artifacts to a Hugging Face repo id, e.g. "
                         f"{{\"MODEL\": \"org/name\"}} (\"\": the repo it was published from)")
    for key, name in hf.items():
        if not isinstance(name, str):
            raise BadRequest(f"{FIELD}.hf[{key!r}] must be a repo id string like \"org/name@main\", got {name!r}")
        if name:
            HfName.parse(name)
    specs = []
    for key, ref in arts.items():
        if not isinstance(key, str) or not _KEY.match(key) or key == RUNTIME_KEY:
            raise BadRequest(f"{FIELD}.artifacts key {key!r} must be upper case letters, digits and _ "
                             f"(it names MODELCAST_<KEY>_PATH), and not {RUNTIME_KEY!r}")
        if not isinstance(ref, str):
            raise BadRequest(f"{FIELD}.artifacts[{key!r}] must be a reference string, got {ref!r}")
        Reference.parse(ref)
        specs.append(ArtifactSpec(key, ref, hf.get(key)))
    runtime = field.get("runtime")
    if runtime is not None:
        if not isinstance(runtime, str):
            raise BadRequest(f"{FIELD}.runtime must be a reference string like \"ort:1.31\", got {runtime!r}")
        Reference.parse(runtime)
    if not specs and not runtime:
        raise BadRequest(f"runtime_env field {FIELD!r} names no artifact and no runtime: {example}")
    return EnvSpec(tuple(specs), runtime)


def is_permanent(exc: BaseException) -> bool:
    """True for failures another attempt cannot fix (unknown reference, bad token, quota)."""
    if isinstance(exc, (InvalidReference, InvalidManifest, BadRequest, ArtifactNotFound, Unauthorized)):
        return True
    if isinstance(exc, ModelcastError):
        return exc.code in PERMANENT_CODES or (isinstance(exc, RemoteError) and exc.http_status in (401, 403))
    return False


PATH_LISTS = ("PYTHONPATH", "LD_LIBRARY_PATH", "PATH", "DYLD_LIBRARY_PATH")


def activation_env(env: dict[str, str], existing: dict[str, str]) -> dict[str, str]:
    """Merge a runtime layer's activation environment into a worker's env_vars.

    Path lists are prepended, keeping what the user set and what the worker inherits
    (Ray expands ``${VAR}`` from the raylet's environment when it starts the worker).
    """
    out = {}
    for key, value in env.items():
        if key in PATH_LISTS and value:
            tail = existing.get(key) or "${%s}" % key
            out[key] = value if tail in value.split(":") else f"{value}:{tail}"
        else:
            out[key] = value
    return out


def label_safe(ref: str) -> str:
    """A label name for "this node holds ``ref``": Kubernetes label syntax, ≤ 63 chars."""
    text = re.sub(r"[^a-zA-Z0-9_.-]", ".", ref.replace("@sha256:", ".").replace(":", "_")).strip("._-")
    if len(text) > 50 or not text:
        text = text[:37].rstrip("._-") + "-" + hashlib.sha256(ref.encode()).hexdigest()[:12]
    return text
