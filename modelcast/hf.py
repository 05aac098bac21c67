"""Hugging Face names as pure data: repo ids, revisions, the hub cache's folder names, and the annotations.

An artifact published from a Hugging Face snapshot carries the repo id, the commit and
the branch it came from as manifest annotations (:data:`ANN_REPO`, :data:`ANN_REVISION`,
:data:`ANN_REF`); a node lays a pulled artifact out in the hub cache layout
(``models--ORG--NAME/{blobs,snapshots,refs}``, node_cache/LAYOUT.md) under those names
or under the ones the user gives.  The rules below follow huggingface_hub's own
(``validate_repo_id``, ``repo_folder_name``, ``REGEX_COMMIT_HASH``).  No I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .errors import BadRequest

ANN_REPO = "huggingface.repo_id"
ANN_REVISION = "huggingface.revision"  # the 40-hex commit the snapshot is
ANN_REF = "huggingface.ref"  # the branch or tag (refs/<name>) that pointed to it, if any

REPO_FOLDER_PREFIX = "models--"
SEPARATOR = "--"
DEFAULT_REF = "main"
COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_PART = re.compile(r"[A-Za-z0-9_.\-]{1,96}")
_REF = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


def validate_repo_id(repo_id: object) -> str:
    """Return ``repo_id`` if huggingface_hub would accept it ("name" or "org/name"); else BadRequest."""
    example = "e.g. 'bert-base-uncased' or 'Qwen/Qwen2.5-0.5B'"
    if not isinstance(repo_id, str) or not repo_id:
        raise BadRequest(f"a Hugging Face repo id is needed, {example}")
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(_REPO_PART.fullmatch(p) for p in parts):
        raise BadRequest(f"{repo_id!r} is not a Hugging Face repo id: ORG/NAME of letters, digits, '-', '_', '.', "
                         f"{example}")
    if any(p[0] in "-." or p[-1] in "-." for p in parts) or SEPARATOR in repo_id or ".." in repo_id \
            or repo_id.endswith(".git"):
        raise BadRequest(f"{repo_id!r} is not a Hugging Face repo id: no '--' or '..', no '-' or '.' at either end "
                         "of a part, no '.git' at the end")
    return repo_id


def validate_ref(ref: object) -> str:
    """A branch or tag name as it appears under ``refs/``: plain names, '/' between parts, no '..'."""
    if not isinstance(ref, str) or not _REF.fullmatch(ref) or ".." in ref or len(ref) > 255:
        raise BadRequest(f"{ref!r} is not a usable Hugging Face revision: a 40-hex commit or a branch/tag name "
                         "of letters, digits, '-', '_', '.' and '/'")
    return ref


def repo_folder(repo_id: str) -> str:
    """The repo's folder in the hub cache: ``org/name`` -> ``models--org--name``."""
    return REPO_FOLDER_PREFIX + SEPARATOR.join(validate_repo_id(repo_id).split("/"))


def repo_id_of_folder(name: str) -> str | None:
    """The repo id a hub cache folder name stands for (``models--org--name`` -> ``org/name``), or None."""
    if not name.startswith(REPO_FOLDER_PREFIX):
        return None
    repo_id = "/".join(name[len(REPO_FOLDER_PREFIX):].split(SEPARATOR))
    try:
        return validate_repo_id(repo_id)
    except BadRequest:
        return None


@dataclass(frozen=True)
class HfName:
    """What a user names: ``org/name`` with an optional ``@revision`` (a commit or a branch/tag)."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "HfName":
        repo_id, sep, revision = text.partition("@")
        if sep and not revision:
            raise BadRequest(f"{text!r} ends with '@': give ORG/NAME or ORG/NAME@REVISION")
        return cls(validate_repo_id(repo_id), validate_ref(revision) if sep else None)

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HfTarget:
    """Where an artifact goes in a hub cache: ``snapshots/<commit>`` and, if ``ref``, ``refs/<ref>`` -> commit."""

    repo_id: str
    commit: str
    ref: str | None

    def to_json(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.commit, "ref": self.ref}


def annotations_for(repo_id: str, commit: str, ref: str | None) -> dict[str, str]:
    """The manifest annotations that record a snapshot's origin (what ``--hf`` defaults to)."""
    validate_repo_id(repo_id)
    if not COMMIT.fullmatch(commit):
        raise BadRequest(f"{commit!r} is not a 40-hex commit hash")
    return {ANN_REPO: repo_id, ANN_REVISION: commit, **({ANN_REF: validate_ref(ref)} if ref else {})}


def resolve_target(name: HfName | None, annotations: Mapping[str, str], digest: str,
                   label: str | None = None) -> HfTarget:
    """The repo, commit and ref to lay an artifact out under.

    ``name`` None means "as published": the artifact's annotations must name the repo.
    The commit is the one given (``@<40 hex>``), else the annotated one when the repo is
    the annotated repo, else one derived from the artifact digest (its first 40 hex
    digits), so the same artifact always gets the same snapshot folder.  The ref is the
    branch or tag given (``@main``), else the annotated one, else ``main``: that is what
    ``snapshot_download(repo_id)`` reads offline.
    """
    annotated = annotations.get(ANN_REPO)
    if name is None:
        if not annotated:
            raise BadRequest(f"{label or digest} has no {ANN_REPO} annotation (it was not published from a "
                             "Hugging Face snapshot or with --hf-repo); name the repo: --hf ORG/NAME")
        name = HfName(validate_repo_id(annotated))
    same = annotated == name.repo_id
    ann_commit = annotations.get(ANN_REVISION) if same else None
    ann_commit = ann_commit if ann_commit and COMMIT.fullmatch(ann_commit) else None
    derived = digest.split(":", 1)[-1][:40]
    if name.revision and COMMIT.fullmatch(name.revision):
        return HfTarget(name.repo_id, name.revision, DEFAULT_REF)
    if name.revision:
        return HfTarget(name.repo_id, ann_commit or derived, name.revision)
    ann_ref = annotations.get(ANN_REF) if same else None
    return HfTarget(name.repo_id, ann_commit or derived, validate_ref(ann_ref) if ann_ref else DEFAULT_REF)
