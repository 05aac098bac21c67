"""Publishing a Hugging Face snapshot: recognise ``…/models--ORG--NAME/snapshots/<commit>`` and name its origin.

A snapshot folder of a hub cache holds relative links to ``../../blobs/<etag>``: the
publish reads them as the files they point to, but only inside the repo's own folder
(:func:`distributor.scan.scan`'s ``link_root``).  The repo id, the commit and the branch
that points to it (``refs/main``) become the manifest's annotations (:mod:`modelcast.hf`),
which ``modelcast pull --hf`` defaults to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelcast.errors import BadRequest
from modelcast.hf import ANN_REF, ANN_REPO, ANN_REVISION, COMMIT, DEFAULT_REF, HfName, repo_id_of_folder


@dataclass(frozen=True)
class HfSource:
    """Where a published folder comes from on the Hub; ``repo_dir`` is the hub cache folder links may reach."""

    repo_id: str
    commit: str | None = None
    ref: str | None = None
    repo_dir: Path | None = None

    def annotations(self) -> dict[str, str]:
        out = {ANN_REPO: self.repo_id}
        if self.commit:
            out[ANN_REVISION] = self.commit
        if self.ref:
            out[ANN_REF] = self.ref
        return out


def _ref_of(repo_dir: Path, commit: str) -> str | None:
    """The branch or tag under ``refs/`` that names ``commit`` (``main`` first), if any."""
    refs = repo_dir / "refs"
    found = []
    for p in sorted(refs.rglob("*")) if refs.is_dir() else []:
        try:
            if p.is_file() and p.read_text().strip() == commit:
                found.append(p.relative_to(refs).as_posix())
        except (OSError, UnicodeDecodeError):
            continue
    return DEFAULT_REF if DEFAULT_REF in found else (found[0] if found else None)


def find_snapshot(path: Path) -> HfSource | None:
    """The snapshot ``path`` is, if it is ``<hub cache>/models--ORG--NAME/snapshots/<40-hex commit>``."""
    real = Path(path).resolve()
    if real.parent.name != "snapshots" or not COMMIT.fullmatch(real.name) or not real.is_dir():
        return None
    repo_dir = real.parent.parent
    repo_id = repo_id_of_folder(repo_dir.name)
    if repo_id is None:
        return None
    return HfSource(repo_id, real.name, _ref_of(repo_dir, real.name), repo_dir)


def hf_source(path: Path, hf_repo: str | None) -> HfSource | None:
    """What a publish of ``path`` records: the snapshot it is, overridden by ``--hf-repo ORG/NAME[@REV]``."""
    snapshot = find_snapshot(path)
    if not hf_repo:
        return snapshot
    name = HfName.parse(hf_repo)
    commit = ref = None
    if name.revision and COMMIT.fullmatch(name.revision):
        commit = name.revision
    elif name.revision:
        ref = name.revision
    if snapshot is not None:
        if commit and commit != snapshot.commit:
            raise BadRequest(f"--hf-repo says revision {commit} but {path} is the snapshot of {snapshot.commit}")
        commit = commit or snapshot.commit
        ref = ref or (snapshot.ref if snapshot.repo_id == name.repo_id else None)
    return HfSource(name.repo_id, commit, ref, snapshot.repo_dir if snapshot else None)
