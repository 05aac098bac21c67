"""Runtime layers are unpacked by our own member checks, never by ``tarfile``'s extraction (issue #15).

Each crafted layer is a real tar made here with ``tarfile``; ``unpack_layer`` must refuse it
with an IntegrityError that names the member, write nothing outside the cache (a sentinel
folder beside it stays as it was) and leave nothing in ``layers/``.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from modelcast.errors import IntegrityError
from node_cache.runtime import RuntimeClient, layers_dir, this_interpreter, unpack_layer

from ..helpers import publish

HEX = "ab" * 32
DIGEST = "sha256:" + HEX


def reg(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def folder(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def make_layer(art: Path, members) -> Path:
    """An artifact folder with ``layer.tar`` holding ``members`` in order, and a ``layer.json``."""
    art.mkdir(parents=True)
    (art / "layer.json").write_text('{"env": {"PYTHONPATH": ["site-packages"]}}')
    with tarfile.open(art / "layer.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return art


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links not followed) with a file's bytes or a link's target."""
    seen: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            seen[rel] = (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir")
    return seen


@pytest.fixture
def place(tmp_path):
    """``tmp/outside/flag`` (the sentinel), the cache at ``tmp/cache``; returns tmp_path."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "flag").write_bytes(b"original")
    return tmp_path


def refused(tmp: Path, members, *needles: str) -> str:
    """Unpack a crafted layer: it must fail naming the member, changing nothing outside, leaving nothing."""
    art = make_layer(tmp / f"art{len(list(tmp.glob('art*')))}", members)
    cache = tmp / "cache"
    before = {k: v for k, v in snapshot(tmp).items() if not k.startswith(("cache", "art"))}
    try:
        unpack_layer(art, cache, DIGEST)
    except Exception as exc:  # checked below, after what matters most: the world outside
        caught = exc
    else:
        caught = None
    after = {k: v for k, v in snapshot(tmp).items() if not k.startswith(("cache", "art"))}
    assert after == before, f"the layer changed something outside the cache, then raised {caught!r}"
    assert list(layers_dir(cache).iterdir()) == [], "a refused layer left something in layers/"
    assert isinstance(caught, IntegrityError), f"expected an IntegrityError, got {caught!r}"
    message = str(caught)
    assert "refused" in message and DIGEST in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ---- names --------------------------------------------------------------------------------------
def test_a_member_climbing_out_is_refused(place):
    refused(place, [folder("site-packages"), reg("../outside/escape")], "'../outside/escape'", "'..'")
    refused(place, [folder("site-packages"), reg("site-packages/../../../outside/escape")],
            "'site-packages/../../../outside/escape'")


def test_an_absolute_member_is_refused(place):
    target = str(place / "outside" / "abs")
    refused(place, [folder("site-packages"), reg(target, b"abs")], "absolute path")


def test_a_300_byte_component_is_refused_by_name_not_errno_36(place):
    name = "site-packages/" + "n" * 300
    message = refused(place, [folder("site-packages"), reg(name)], "300 bytes", "at most 255")
    assert "Errno 36" not in message and "File name too long" not in message


def test_a_5000_byte_name_is_refused(place):
    name = "/".join(["site-packages"] + ["d" * 200] * 25)  # 5,038 bytes, every component short
    assert len(name) > 5000
    refused(place, [folder("site-packages"), reg(name)], "'site-packages/ddd")


# ---- links and special files ---------------------------------------------------------------------
def test_a_symlink_out_then_a_file_through_it_is_refused(place):
    # The classic: "a" -> outside, then "a/b" lands outside if the link is followed.
    refused(place, [folder("site-packages"), link("site-packages/a", str(place / "outside")),
                    reg("site-packages/a/b", b"through the link")], "'site-packages/a'", "symbolic link")


def test_a_symlink_inside_the_layer_is_refused(place):
    # The design says no links at all: even one that stays inside (a .so alias) is refused.
    refused(place, [folder("site-packages"), reg("site-packages/libx.so.1", b"\x7fELF"),
                    link("site-packages/libx.so", "libx.so.1")], "'site-packages/libx.so'", "symbolic link")


def test_a_hard_link_to_etc_passwd_is_refused(place):
    refused(place, [folder("site-packages"), link("site-packages/passwd", "/etc/passwd", tarfile.LNKTYPE)],
            "hard link", "/etc/passwd")


def test_a_hard_link_inside_the_layer_is_refused(place):
    refused(place, [folder("site-packages"), reg("site-packages/a", b"a"),
                    link("site-packages/b", "site-packages/a", tarfile.LNKTYPE)], "'site-packages/b'", "hard link")


@pytest.mark.parametrize("kind, what", [(tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"),
                                        (tarfile.FIFOTYPE, "FIFO")])
def test_devices_and_fifos_are_refused(place, kind, what):
    refused(place, [folder("site-packages"), special("site-packages/dev", kind)], what)


def cve_2025_4517_members(cache: Path, pid: int) -> list:
    """CPython's own reproducer of CVE-2025-4517, aimed at ``outside/`` beside ``cache``.

    Nested folders reached through symlinks make the final link's path longer than PATH_MAX, so
    ``os.path.realpath`` on Python < 3.11.13 stops resolving and the ``data`` filter believes
    ``escape`` stays inside; the files written through it land in ``outside/``.  The sizes
    depend on the staging folder's path, which holds the unpacking process's ``pid``.
    """
    # The staging folder unpack_layer makes: layers/sha256/.staging-<hex>-<pid>-<8 hex>.
    staging_len = len(str(layers_dir(cache))) + len(f"/.staging-{HEX}-{pid}-") + 8
    steps = "abcdefghijklmnop"
    component = "d" * ((4096 - staging_len - 1) // (len(steps) + 1))
    members, path = [], ""
    for step in steps:
        members.append(folder(os.path.join(path, component)))
        members.append(link(os.path.join(path, step), component))
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(link(linkpath, os.path.join(*[".."] * len(steps))))
    # linkpath is the staging folder itself; four levels up is the folder holding the cache and outside/.
    members.append(link("escape", os.path.join(linkpath, "..", "..", "..", "..", "outside")))
    members.append(link("flaglink", os.path.join("escape", "flag"), tarfile.LNKTYPE))
    members.append(reg("flaglink", b"overwritten"))
    members.append(reg("escape/newfile", b"new"))
    return members


def test_the_cve_2025_4517_realpath_overflow_is_refused(place):
    refused(place, cve_2025_4517_members(place / "cache", os.getpid()), "symbolic link")
    assert (place / "outside" / "flag").read_bytes() == b"original"
    assert not (place / "outside" / "newfile").exists()


def test_a_node_refuses_to_activate_a_crafted_runtime_layer(place, tracker, node_factory):
    """End to end: the crafted layer published as a runtime, pulled and activated by a real node."""
    node = node_factory(tracker.url, "n1")
    assert node.cache.parent == place  # the reproducer climbs from the cache to place/outside
    art = make_layer(place / "art", cve_2025_4517_members(node.cache, node.pid))
    target = this_interpreter()
    publish(tracker.url, art, "evil/runtime:v1", (place / "origin").as_uri(), "--kind", "runtime",
            "--annotation", "accelerator=cpu", "--annotation", f"python_abi={target.python_abi}",
            "--annotation", f"platform=linux_{target.machine}")
    before = snapshot(place / "outside")

    async def activate():
        async with RuntimeClient(node.url) as client:
            return await client.activate("evil/runtime:v1")

    with pytest.raises(IntegrityError, match=r"member 'a' refused: it is a symbolic link"):
        asyncio.run(activate())
    assert snapshot(place / "outside") == before
    assert list(layers_dir(node.cache).iterdir()) == []


# ---- other forgeries -------------------------------------------------------------------------------
def test_a_sparse_member_is_refused(place):
    info, data = reg("site-packages/sparse", b"x" * 10)
    info.type = tarfile.GNUTYPE_SPARSE
    art = make_layer(place / "art", [])
    # GNU sparse headers need the GNU format: write this tar again.
    with tarfile.open(art / "layer.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(folder("site-packages")[0])
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(IntegrityError, match="sparse|refused|not readable"):
        unpack_layer(art, place / "cache", DIGEST)
    assert list(layers_dir(place / "cache").iterdir()) == []


def test_a_file_twice_or_under_a_file_is_refused(place):
    refused(place, [folder("site-packages"), reg("site-packages/a", b"1"), reg("site-packages/a", b"2")],
            "same name")
    refused(place, [folder("site-packages"), reg("site-packages/a", b"1"), reg("site-packages/a/b", b"2")],
            "'site-packages/a/b'", "not a folder")


def test_the_node_written_layer_json_cannot_come_from_the_layer(place):
    refused(place, [folder("layer.json"), reg("layer.json/x")], "layer.json")


def test_a_truncated_tar_is_an_integrity_error(place):
    art = make_layer(place / "art", [folder("site-packages"), reg("site-packages/big", b"z" * 100_000)])
    data = (art / "layer.tar").read_bytes()
    (art / "layer.tar").write_bytes(data[:60_000])
    with pytest.raises(IntegrityError, match="site-packages/big"):
        unpack_layer(art, place / "cache", DIGEST)
    assert list(layers_dir(place / "cache").iterdir()) == []


# ---- a good layer unpacks as before ----------------------------------------------------------------
def test_a_plain_layer_unpacks_read_only_with_its_exec_bits_and_no_setuid(place):
    art = make_layer(place / "art", [
        folder("site-packages"), folder("site-packages/pkg"),
        reg("site-packages/pkg/__init__.py", b"VALUE = 1\n"),
        reg("site-packages/pkg/tool", b"#!/bin/sh\n", 0o4755),
        reg("site-packages/implicit/parent/mod.py", b"x = 2\n"),  # its folders are not listed
        reg("site-packages/empty", b""),
    ])
    dest = unpack_layer(art, place / "cache", DIGEST)
    assert dest == layers_dir(place / "cache") / HEX
    assert (dest / "site-packages/pkg/__init__.py").read_bytes() == b"VALUE = 1\n"
    assert (dest / "site-packages/implicit/parent/mod.py").read_bytes() == b"x = 2\n"
    assert (dest / "site-packages/empty").read_bytes() == b""
    assert (dest / "layer.json").read_bytes() == (art / "layer.json").read_bytes()
    assert stat.S_IMODE((dest / "site-packages/pkg/tool").stat().st_mode) == 0o555
    assert stat.S_IMODE((dest / "site-packages/pkg/__init__.py").stat().st_mode) == 0o444
    assert stat.S_IMODE((dest / "site-packages").stat().st_mode) == 0o555
    assert [p.name for p in layers_dir(place / "cache").iterdir()] == [HEX]
    # A second call finds it unpacked.
    assert unpack_layer(art, place / "cache", DIGEST) == dest
