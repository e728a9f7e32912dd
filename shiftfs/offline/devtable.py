"""
Device tables: entries an archive of a tree made in a user namespace needs but
the tree cannot hold.

The kernel refuses ``mknod`` of character and block devices to anything but
root of the initial user namespace (``vfs_mknod`` checks ``CAP_MKNOD``
there), so a root filesystem built under ``shiftfs exec`` has no /dev/null.
A device table names such entries, one a line::

    # PATH        TYPE MAJOR MINOR MODE UID GID [TARGET]
    /dev/null     c    1     3     0666 0   0
    /dev/sda      b    8     0     0660 0   6
    /dev/pts      d    -     -     0755 0   0
    /dev/initctl  p    -     -     0600 0   0
    /dev/fd       l    -     -     0777 0   0   /proc/self/fd

TYPE is ``c`` (character device), ``b`` (block device), ``p`` (FIFO), ``d``
(directory) or ``l`` (symlink, TARGET is its target); MAJOR and MINOR are
decimal numbers for ``c`` and ``b`` and ``-`` otherwise; MODE is octal
permission bits (setuid/setgid/sticky allowed); UID and GID are numeric view
ids. ``#`` starts a comment. An entry replaces whatever the tree has at that
path. :data:`MMDEBSTRAP_DEV` is the /dev that mmdebstrap (and debootstrap)
put into a root filesystem made by real root.

Two ways to apply a table:

* ``shiftfs export ROOT --device-table FILE`` (:meth:`DeviceTable.covers`,
  :meth:`DeviceTable.add_to_tarfile` and :meth:`DeviceTable.add_to_cpio` are
  the hooks the exporter calls);
* ``shiftfs devtable add FILE IN.tar OUT.tar`` on an archive
  already written: members are copied byte for byte, those the table replaces
  are dropped, and the table's entries are appended.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["DeviceTableError", "Entry", "DeviceTable", "parse", "load", "archive_name", "add_to_tar", "MMDEBSTRAP_DEV"]

#: The /dev a root build by mmdebstrap carries (its @devfiles list).
MMDEBSTRAP_DEV = """\
# The /dev of a root filesystem made by real root (mmdebstrap's tarballs).
/dev          d - - 0755 0 0
/dev/console  c 5 1 0666 0 0
/dev/fd       l - - 0777 0 0 /proc/self/fd
/dev/full     c 1 7 0666 0 0
/dev/null     c 1 3 0666 0 0
/dev/ptmx     c 5 2 0666 0 0
/dev/pts      d - - 0755 0 0
/dev/random   c 1 8 0666 0 0
/dev/shm      d - - 0755 0 0
/dev/stderr   l - - 0777 0 0 /proc/self/fd/2
/dev/stdin    l - - 0777 0 0 /proc/self/fd/0
/dev/stdout   l - - 0777 0 0 /proc/self/fd/1
/dev/tty      c 5 0 0666 0 0
/dev/urandom  c 1 9 0666 0 0
/dev/zero     c 1 5 0666 0 0
"""

_TYPES = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO, "d": stat.S_IFDIR, "l": stat.S_IFLNK}
_TAR_TYPES = {
    "c": tarfile.CHRTYPE,
    "b": tarfile.BLKTYPE,
    "p": tarfile.FIFOTYPE,
    "d": tarfile.DIRTYPE,
    "l": tarfile.SYMTYPE,
}


class DeviceTableError(ValueError):
    """A bad table line; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Entry:
    name: str  # archive name: "./dev/null"
    kind: str  # c, b, p, d or l
    major: int
    minor: int
    mode: int  # permission bits only
    uid: int
    gid: int
    target: str = ""  # symlinks

    @property
    def st_mode(self) -> int:
        return _TYPES[self.kind] | self.mode


def archive_name(path: str) -> str:
    """The name ``shiftfs export`` gives ``path`` (``./dev/null``, ``.``)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "./" + "/".join(parts) if parts else "."


def _number(text: str, what: str, base: int = 10, limit: int = 0xFFFFFFFF) -> int:
    try:
        value = int(text, base)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a {'octal ' if base == 8 else ''}number") from None
    if not 0 <= value <= limit:
        raise ValueError(
            f"{what} {text} is out of range (0-{limit:o})"
            if base == 8
            else f"{what} {text} is out of range (0-{limit})"
        )
    return value


def _parse_line(fields: list[str]) -> Entry:
    if len(fields) not in (7, 8):
        raise ValueError(
            f"{len(fields)} fields; want PATH TYPE MAJOR MINOR MODE UID GID [TARGET], e.g. '/dev/null c 1 3 0666 0 0'"
        )
    path, kind, major, minor, mode, uid, gid = fields[:7]
    if kind not in _TYPES:
        raise ValueError(f"type {kind!r} is not one of c, b, p, d, l")
    if ".." in path.split("/"):
        raise ValueError(f"path {path} has '..' in it; give the path inside the tree")
    name = archive_name(path)
    if name == ".":
        raise ValueError("the tree's root cannot be a table entry")
    if kind in "cb":
        maj = _number(major, "major", limit=0xFFF)
        mnr = _number(minor, "minor", limit=0xFFFFF)
    else:
        if (major, minor) != ("-", "-"):
            raise ValueError(f"type {kind} has no device number; write '-' for MAJOR and MINOR")
        maj = mnr = 0
    target = ""
    if kind == "l":
        if len(fields) != 8 or not fields[7]:
            raise ValueError("a symlink needs its TARGET as the 8th field")
        target = fields[7]
    elif len(fields) == 8:
        raise ValueError(f"only symlinks (type l) take a TARGET; type {kind} got {fields[7]!r}")
    return Entry(
        name, kind, maj, mnr, _number(mode, "mode", 8, 0o7777), _number(uid, "uid"), _number(gid, "gid"), target
    )


def parse(text: str, source: str = "device table") -> list[Entry]:
    """The entries of a table; raises :class:`DeviceTableError` for the
    first bad line."""
    entries: dict[str, Entry] = {}
    for no, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            entry = _parse_line(line.split())
        except ValueError as e:
            raise DeviceTableError(f"{source}:{no}: {e}") from None
        if entry.name in entries:
            raise DeviceTableError(f"{source}:{no}: {entry.name[1:]} is listed twice; keep one line")
        entries[entry.name] = entry
    return sorted(entries.values(), key=lambda e: e.name)


def load(path: str) -> list[Entry]:
    """:func:`parse` the table in file ``path``."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise DeviceTableError(f"{path}: cannot read the device table: {e.strerror}") from None
    return parse(text, path)


def default_mtime(path: str | None = None) -> int:
    """$SOURCE_DATE_EPOCH if set, else the table file's mtime, else now."""
    sde = os.environ.get("SOURCE_DATE_EPOCH", "")
    if sde.isdigit():
        return int(sde)
    if path:
        try:
            return int(os.stat(path).st_mtime)
        except OSError:
            pass
    return int(time.time())


class DeviceTable:
    """A parsed table, ready to add to archives."""

    def __init__(self, entries: Iterable[Entry], mtime: int | None = None):
        self.entries = sorted(entries, key=lambda e: e.name)
        self.mtime = default_mtime() if mtime is None else mtime
        self._names = {e.name for e in self.entries}

    @classmethod
    def from_file(cls, path: str) -> DeviceTable:
        return cls(load(path), default_mtime(path))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def covers(self, name: str) -> bool:
        """Whether the table replaces the archive entry ``name``."""
        return archive_name(name) in self._names

    def tarinfos(self) -> Iterator[tarfile.TarInfo]:
        for e in self.entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TAR_TYPES[e.kind]
            ti.mode, ti.uid, ti.gid = e.mode, e.uid, e.gid
            ti.uname = ti.gname = ""
            ti.mtime = self.mtime
            ti.devmajor, ti.devminor = e.major, e.minor
            ti.linkname = e.target
            yield ti

    def add_to_tarfile(self, tf: tarfile.TarFile) -> None:
        """Append the entries to an archive being written."""
        for ti in self.tarinfos():
            tf.addfile(ti)

    def add_to_cpio(self, writer, first_ino: int) -> None:
        """Append the entries through a newc writer with ``header(name, ino,
        mode, uid, gid, nlink, mtime, size, rdevmajor, rdevminor)``,
        ``data(bytes)`` and ``end_data()`` (shiftfs.archive's)."""
        for i, e in enumerate(self.entries):
            data = os.fsencode(e.target) if e.kind == "l" else b""
            writer.header(
                os.fsencode(e.name),
                first_ino + i,
                e.st_mode,
                e.uid,
                e.gid,
                2 if e.kind == "d" else 1,
                self.mtime,
                len(data),
                e.major,
                e.minor,
            )
            if data:
                writer.data(data)
            writer.end_data()


def _end_of(member: tarfile.TarInfo) -> int:
    size = member.size if member.isreg() else 0
    blocks, rest = divmod(size, tarfile.BLOCKSIZE)
    return member.offset_data + (blocks + (1 if rest else 0)) * tarfile.BLOCKSIZE


def add_to_tar(src: str, out: BinaryIO, table: DeviceTable) -> int:
    """Copy the uncompressed tar ``src`` to ``out`` byte for byte, without
    the members ``table`` replaces, and append the table's entries. Returns
    how many members were replaced."""
    with open(src, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
        members = tf.getmembers()
        if any(m.issparse() for m in members):
            raise DeviceTableError(f"{src}: sparse members are not supported")
        dropped = {archive_name(m.name) for m in members if table.covers(m.name)}
        for m in members:
            if m.islnk() and archive_name(m.linkname) in dropped:
                raise DeviceTableError(
                    f"{src}: the table replaces {m.linkname}, which {m.name} is a hard link to; drop it from the table"
                )
        pos = 0
        replaced = 0
        for m in members:
            if table.covers(m.name):
                _copy(raw, out, pos, m.offset)
                pos = _end_of(m)
                replaced += 1
        last = _end_of(members[-1]) if members else 0
        _copy(raw, out, pos, last)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tw:
        table.add_to_tarfile(tw)
    return replaced


def _copy(raw: BinaryIO, out: BinaryIO, start: int, end: int) -> None:
    raw.seek(start)
    left = end - start
    while left > 0:
        chunk = raw.read(min(left, 1 << 20))
        if not chunk:
            raise DeviceTableError("the archive ended early")
        out.write(chunk)
        left -= len(chunk)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``add`` and ``mmdebstrap`` actions, on ``shiftfs devtable`` and on the
    ``python -m shiftfs.devtable`` shim alike."""
    sub = p.add_subparsers(dest="devtable_cmd", metavar="ACTION", parser_class=type(p))
    sub.required = True
    a = sub.add_parser(
        "add",
        help="copy IN.tar to OUT.tar with the table's entries",
        description="Copy IN.tar to OUT.tar byte for byte, dropping the members "
        "TABLE replaces and appending TABLE's entries.",
    )
    a.add_argument("table", metavar="TABLE", help="device table file ('-' for mmdebstrap's /dev)")
    a.add_argument("input", metavar="IN.tar", help="uncompressed tar")
    a.add_argument("output", metavar="OUT.tar")
    sub.add_parser(
        "mmdebstrap",
        help="print the table of the /dev mmdebstrap makes as root",
        description="Print the device table of the /dev that mmdebstrap makes as real "
        "root, for 'shiftfs export --device-table'.",
    )


DESCRIPTION = (
    "Device tables: entries a tree built in a user namespace cannot hold (device "
    "nodes). 'mmdebstrap' prints the usual /dev; 'add' appends a table to a tar "
    "written by 'shiftfs export' (or give the table to 'shiftfs export "
    "--device-table FILE' directly)."
)

EPILOG = """\
table lines: PATH TYPE MAJOR MINOR MODE UID GID [TARGET]
  TYPE c (char device), b (block device), p (FIFO), d (directory), l (symlink);
  MAJOR MINOR decimal for c/b, '-' otherwise; MODE octal; UID GID numeric view ids.
  /dev/null  c 1 3 0666 0 0

example:
  shiftfs devtable mmdebstrap > dev.table
  shiftfs export ./rootfs --device-table dev.table -o rootfs.tar
"""


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``shiftfs devtable`` command; one line per problem."""
    if args.devtable_cmd == "mmdebstrap":
        sys.stdout.write(MMDEBSTRAP_DEV)
        return 0
    try:
        table = (
            DeviceTable(parse(MMDEBSTRAP_DEV, "mmdebstrap"), default_mtime())
            if args.table == "-"
            else DeviceTable.from_file(args.table)
        )
        if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
            raise DeviceTableError("IN.tar and OUT.tar are the same file; write elsewhere")
        tmp = args.output + ".partial"
        try:
            with open(tmp, "wb") as out:
                add_to_tar(args.input, out, table)
            os.replace(tmp, args.output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (DeviceTableError, tarfile.TarError) as e:
        print(f"shiftfs devtable: {e}", file=sys.stderr)
        return 2 if isinstance(e, DeviceTableError) else 1
    except OSError as e:
        print(f"shiftfs devtable: {e.filename or ''}: {e.strerror}".replace(": :", ":"), file=sys.stderr)
        return 1
    return 0
