"""The shared libraries an ELF file links (its DT_NEEDED entries), read without tools.

The builder uses it to check that a CUDA variant's provider links the CUDA major the spec
names: a spec saying ``cuda 12`` around a wheel built for CUDA 13 would only fail on a GPU.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

SHT_DYNAMIC = 6
DT_NEEDED = 1


class NotElf(ValueError):
    pass


def needed_libraries(f: BinaryIO) -> list[str]:
    """DT_NEEDED names of a 64-bit little-endian ELF file opened in binary mode."""
    f.seek(0)
    ident = f.read(64)
    if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        raise NotElf("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", ident, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", ident, 0x3A)
    f.seek(shoff)
    table = f.read(shentsize * shnum)
    sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
    out: list[str] = []
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != SHT_DYNAMIC or link >= len(sections):
            continue
        f.seek(offset)
        dyn = f.read(size)
        str_off, str_size = sections[link][4], sections[link][5]
        f.seek(str_off)
        strtab = f.read(str_size)
        for i in range(0, len(dyn) - 15, entsize or 16):
            tag, val = struct.unpack_from("<qQ", dyn, i)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                out.append(strtab[val:strtab.index(b"\0", val)].decode("utf-8", "replace"))
    return out
