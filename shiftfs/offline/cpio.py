"""Writing the SVR4 "newc" cpio format (magic ``070701``, no CRC) for ``shiftfs export``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import BinaryIO

from ..errors import ArchiveError
from .members import Item
from .walk import COPY_CHUNK, has_store, open_beneath

__all__ = ["CpioWriter", "export_cpio"]


class CpioWriter:
    """A writer of the SVR4 "newc" cpio format (magic ``070701``, no CRC)."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.offset = 0

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)

    def _pad(self) -> None:
        if self.offset % 4:
            self._write(b"\0" * (4 - self.offset % 4))

    def header(self, name: bytes, ino, mode, uid, gid, nlink, mtime, size, rdevmajor=0, rdevminor=0) -> None:
        fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdevmajor, rdevminor, len(name) + 1, 0)
        for value in fields:
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"value {value} does not fit in a newc header")
        self._write(b"070701" + b"".join(b"%08X" % v for v in fields) + name + b"\0")
        self._pad()

    def data(self, chunk: bytes) -> None:
        self._write(chunk)

    def end_data(self) -> None:
        self._pad()

    def trailer(self) -> None:
        self.header(b"TRAILER!!!", 0, 0, 0, 0, 1, 0, 0)
        # Pad to 512 bytes like GNU cpio, for tape-minded readers.
        if self.offset % 512:
            self._write(b"\0" * (512 - self.offset % 512))


def export_cpio(scanned: Iterable[Item], root_fd: int, out: BinaryIO, progress, opts=None) -> None:
    """Write the items of a tree (:func:`shiftfs.offline.export.scan`, hard links not
    folded) below ``root_fd`` as a newc archive to ``out``."""
    devices = opts.devices if opts is not None else None
    items = [i for i in scanned if devices is None or not devices.covers(i.name)]
    # Hard links: every name carries the inode; newc stores the data with
    # the last name only (what GNU cpio and bsdtar write and expect).
    groups: dict[tuple[int, int], list[Item]] = {}
    for item in items:
        if item.kind != "dir":
            groups.setdefault(item.key, []).append(item)
    inos: dict[tuple[int, int], int] = {}
    w = CpioWriter(out)
    lost_xattrs = [i.rel or "." for i in items if i.xattrs]
    for item in items:
        v = item.view
        ino = inos.setdefault(item.key, len(inos) + 1)
        members = groups.get(item.key, [item])
        nlink = len(members) if item.kind != "dir" else max(item.nlink, 2)
        if item.rel == "" and item.kind == "dir":
            nlink = max(2, item.nlink - (1 if has_store(root_fd) else 0))
        mtime = item.mtime_ns // 1_000_000_000
        if not 0 <= mtime <= 0xFFFFFFFF:
            progress.log(f"shiftfs export: {item.rel or '.'}: mtime {mtime} does not fit in cpio; stored as 0")
            mtime = 0
        name = os.fsencode(item.name)
        data: bytes | None = None
        size = 0
        if item.kind == "symlink":
            data = os.fsencode(item.linkname)
            size = len(data)
        elif item.kind == "reg" and members[-1] is item:
            size = item.size
            if size > 0xFFFFFFFF:
                raise ArchiveError(f"{item.rel}: {size} bytes is too big for cpio newc (4 GiB max); use --format tar")
        rmaj, rmin = (os.major(v.rdev), os.minor(v.rdev)) if item.kind in ("chr", "blk") else (0, 0)
        w.header(name, ino, v.mode, v.uid, v.gid, nlink, mtime, size, rmaj, rmin)
        if data is not None:
            w.data(data)
        elif size:
            try:
                fd = open_beneath(root_fd, item.rel, os.O_RDONLY)
            except OSError as exc:
                raise ArchiveError(f"{item.rel}: cannot open: {exc.strerror}; the archive is incomplete") from None
            try:
                left = size
                while left:
                    chunk = os.read(fd, min(COPY_CHUNK, left))
                    if not chunk:
                        raise ArchiveError(f"{item.rel}: file shrank while archiving; the archive is incomplete")
                    w.data(chunk)
                    left -= len(chunk)
                    progress.advance(0, len(chunk))
            finally:
                os.close(fd)
        w.end_data()
        progress.advance(1)
    if devices is not None:
        devices.add_to_cpio(w, len(inos) + 1)
    w.trailer()
    if lost_xattrs:
        progress.log(
            f"shiftfs export: cpio newc cannot carry xattrs; {len(lost_xattrs)} entries lost theirs "
            f"(first: {lost_xattrs[0]}); use --format tar to keep them"
        )
