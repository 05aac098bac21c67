"""Unpack a runtime layer's tar member by member, refusing anything but plain files and folders.

``tarfile`` only reads the archive here; it never extracts.  Its ``data`` filter is not
trusted: Python 3.11.7 predates the fixes for CVE-2025-4517, where a symlink member followed
by a file "inside" it writes outside the target, and a name longer than the filesystem
allows fails with errno 36 after the damage is done.  The design says a layer holds no links,
so every member is checked before a byte is written:

- only regular files and directories; links (symbolic or hard), devices, FIFOs and sparse
  files are refused;
- names are relative POSIX paths (:func:`modelcast.manifest.validate_path`: no absolute
  path, no ``..`` or ``.``, no empty component, no backslash or control character), UTF-8,
  each component at most 255 bytes and the whole path short enough to be used under the
  target;
- every folder on the way is opened with ``O_NOFOLLOW`` relative to its parent's file
  descriptor and every file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so nothing is
  ever written through a link or over an existing entry, even one made behind our back;
- modes keep only the execute bit (no setuid, setgid or sticky bit); owners are not set;
- the bytes written are bounded by the size of the tar itself (a tar stores every byte of
  its files, so more would mean a forged header).

Any refusal raises :class:`~modelcast.errors.IntegrityError` naming the member and why.  The
caller unpacks into a staging folder it removes on failure (node_cache/runtime.py).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path

from modelcast.errors import DiskFull, IntegrityError, UnsafePath
from modelcast.manifest import validate_path

MAX_NAME_BYTES = 255  # NAME_MAX of Linux filesystems
MAX_PATH_BYTES = 4096  # PATH_MAX, counting the target folder in front and the final NUL
CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Refused(Exception):
    """One member cannot be unpacked; turned into an IntegrityError naming the layer."""


def member_parts(name: str, room: int = MAX_PATH_BYTES) -> list[str]:
    """The components of a member name, or :class:`_Refused` saying why the name is unsafe.

    ``room`` is how many bytes a relative path may have under the target folder.
    """
    try:
        validate_path(name)
    except UnsafePath as exc:
        raise _Refused(str(exc)) from None
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused("its name is not valid UTF-8") from None
    if len(encoded) > room:
        raise _Refused(f"its name has {len(encoded)} bytes; at most {room} fit under the layer folder")
    parts = name.split("/")
    for part in parts:
        size = len(part.encode("utf-8"))
        if size > MAX_NAME_BYTES:
            raise _Refused(f"a component of its name has {size} bytes; at most {MAX_NAME_BYTES} are allowed")
    return parts


def _kind(member: tarfile.TarInfo) -> str:
    """``"file"``, ``"dir"``, or :class:`_Refused` for every other kind of member."""
    # GNU sparse members count as regular for tarfile; their stored bytes expand on reading.
    if member.issparse():
        raise _Refused("it is a sparse file; a layer holds only plain files and folders")
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    what = ("a symbolic link" if member.issym() else "a hard link" if member.islnk()
            else "a character device" if member.ischr() else "a block device" if member.isblk()
            else "a FIFO" if member.isfifo() else f"of tar type {member.type!r}")
    target = f" to {member.linkname!r}" if member.issym() or member.islnk() else ""
    raise _Refused(f"it is {what}{target}; a layer holds only plain files and folders")


class _Dirs:
    """Opens folders under the target one component at a time, never following a link.

    Keeps the descriptor of the last parent used: a layer's members come sorted, so most
    files share the folder of the one before.
    """

    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self.cached: tuple[tuple[str, ...], int] | None = None

    def open(self, parts: tuple[str, ...]) -> int:
        if self.cached and self.cached[0] == parts:
            return self.cached[1]
        self.close()
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    # A folder the tar does not list before its files (tarfile made these too).
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _Refused(f"{'/'.join(parts[:i + 1])} is not a folder") from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self.cached = (parts, fd)
        return fd

    def close(self) -> None:
        if self.cached:
            os.close(self.cached[1])
            self.cached = None


def _make_dir(parent_fd: int, name: str) -> None:
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    except FileExistsError:
        # Listed twice, or made earlier as the parent of a file: fine if it is a real folder.
        if not stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            raise _Refused("a file of the same name came before it") from None


def _write_file(parent_fd: int, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
    """Create ``name`` (never existing before, never through a link) and copy the member's bytes."""
    # Owner-writable while staging; the caller makes the layer read-only before it is used.
    mode = 0o755 if member.mode & 0o100 else 0o644
    try:
        fd = os.open(name, _FILE_FLAGS, mode, dir_fd=parent_fd)
    except FileExistsError:
        raise _Refused("an entry of the same name came before it") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Refused("an entry of the same name came before it") from None
        raise
    try:
        src = tar.extractfile(member)
        left = member.size
        while left > 0:
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise _Refused(f"the tar ends {left} bytes before the end of this file")
            _write_all(fd, chunk)
            left -= len(chunk)
        os.fchmod(fd, mode)  # the umask may have taken the execute bit
        try:
            os.utime(fd, (member.mtime, member.mtime))
        except (OverflowError, ValueError, OSError):
            pass  # a timestamp the filesystem cannot hold changes nothing a layer's user sees
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def unpack_tar(tar_path: Path, target: Path, what: str, reserved: frozenset[str] = frozenset()) -> int:
    """Unpack the tar at ``tar_path`` into the existing, empty folder ``target``; return the bytes written.

    ``what`` names the layer in error messages; ``reserved`` are top-level names the caller
    writes itself.  Raises IntegrityError for a member that is not a plain file or folder, an
    unsafe name, or a truncated or forged archive; DiskFull when the disk fills.  What was
    written before a refusal stays in ``target`` for the caller to remove.  Files are not
    fsynced here: the caller does it before its commit point.
    """
    target = Path(target)
    room = MAX_PATH_BYTES - len(os.fsencode(target.resolve())) - 2  # a slash after the target, the NUL
    root_fd = os.open(target, _DIR_FLAGS)
    dirs = _Dirs(root_fd)
    written = 0
    member_name = None
    try:
        with open(tar_path, "rb") as raw:
            budget = os.fstat(raw.fileno()).st_size
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                for member in tar:
                    member_name = member.name
                    kind = _kind(member)
                    name = member.name[:-1] if kind == "dir" and member.name.endswith("/") else member.name
                    parts = member_parts(name, room)
                    if parts[0] in reserved:
                        raise _Refused(f"{parts[0]} is written by the node, not taken from the layer")
                    parent = dirs.open(tuple(parts[:-1]))
                    if kind == "dir":
                        _make_dir(parent, parts[-1])
                        continue
                    if member.size < 0 or written + member.size > budget:
                        raise _Refused(f"it claims {member.size} bytes; with the {written} bytes before it, "
                                       f"more than the {budget} bytes of the whole tar")
                    _write_file(parent, parts[-1], member, tar)
                    written += member.size
                member_name = None
    except _Refused as exc:
        raise IntegrityError(f"{what}: member {member_name!r} refused: {exc}; nothing was unpacked "
                             "(a layer built by `modelcast runtime build` holds only files and folders)") from None
    except tarfile.TarError as exc:
        at = f" at member {member_name!r}" if member_name else ""
        raise IntegrityError(f"{what}: the tar is not readable{at}: {exc}; nothing was unpacked") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{what}: the disk of {target} filled up while unpacking; free space or lower "
                           "the node's --quota") from exc
        at = f" at member {member_name!r}" if member_name else ""
        raise IntegrityError(f"{what}: cannot unpack{at}: {exc}; nothing was unpacked") from exc
    finally:
        dirs.close()
        os.close(root_fd)
    return written
