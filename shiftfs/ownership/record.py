"""The ownership record: the view owner, group, mode and device of one inode.

A *record* is the value of the xattr ``user.containers.override_stat``. Podman's
containers/storage writes it when a storage driver runs with ``force_mask``,
and fuse-overlayfs reads it with ``xattr_permissions=2``. Older fuse-overlayfs
releases (Debian 12 ships 1.10) write only ``user.fuseoverlayfs.override_stat``
and read the name the root of each layer carries (only the legacy one on the
upper layer, which they stamp with it).
Speaking the same format lets a backing tree move between shiftfs, podman and
fuse-overlayfs unchanged.

What the peers write (checked against their sources):

* fuse-overlayfs in C (up to 1.16) writes ``"%d:%d:%o"`` with the whole
  ``st_mode``, file type bits included: ``0:0:100644``, ``7:8:40755``.
* The Rust rewrite of fuse-overlayfs (2026) writes ``"{}:{}:{:o}"`` with only
  the permission bits (``mode & 0o7777``): ``1000:1000:755``.
* containers/storage before December 2024 wrote ``"%d:%d:0%o"``: permission
  bits only (``0:0:0755``), or the whole ``st_mode`` for a layer's ``diff``
  directory (``0:0:040755``).
* containers/storage since December 2024 writes ``"%d:%d:%04o:%s"``. The
  fourth field names the type: ``file``, ``dir``, ``symlink``, ``pipe``,
  ``socket``, ``char-MAJ-MIN`` or ``block-MAJ-MIN``, as in
  ``0:0:0666:char-1-3`` on a regular file that stands in for ``/dev/null``.

What the peers read:

* fuse-overlayfs 1.10 parses ``"%d:%d:%o"``, ignores the rest and ORs the
  mode with the backing file type.
* fuse-overlayfs 1.15 and 1.16 parse ``"%d:%d:%o:%ms"``. Without a fourth
  field the mode is ORed with the backing type. A device field is read after
  ``char``/``block`` as ``MAJ-MIN``, with leading dashes skipped, and anything
  else is an error.
* The Rust rewrite splits on ``:`` and reads a device as ``charMAJ:MIN``. On
  ``char-1-3`` it keeps the type but loses the device number.
* containers/storage takes only the permission and setuid/setgid/sticky bits
  from the mode field and reads devices as ``char-MAJ-MIN``.

We read all of the above, and also ``charMAJ-MIN`` and ``charMAJ:MIN``. We
write one of two forms:

* ``"%d:%d:%o"`` with the type bits included, for every inode that is not a
  device. This is what fuse-overlayfs itself writes, and every reader above
  takes it: with the type bits matching the backing type, "OR with the
  backing type" is a no-op.
* ``"%d:%d:%04o:char-MAJ-MIN"`` (or ``block-``) with only the permission
  bits, for devices, which live on the backing filesystem as regular
  placeholder files. This is the containers/storage spelling, the only device
  spelling that both containers/storage and fuse-overlayfs in C understand.
  The Rust reader still gets the type right. Leaving the type bits out of the
  mode keeps fuse-overlayfs 1.10 from ORing ``S_IFCHR`` into ``S_IFREG``
  (which would give ``S_IFLNK``); 1.10 shows a plain regular file instead.

Xattr names (how an xattr set through the mount is stored) are
:mod:`shiftfs.ownership.names`' business.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .idmap import MAX_ID

__all__ = [
    "RECORD_NAME",
    "LEGACY_RECORD_NAME",
    "MAX_ID",
    "Record",
    "RecordError",
    "decode",
    "encode",
    "type_fits",
    "check_fits",
]

#: The xattr that holds a record (containers/storage, fuse-overlayfs >= 1.14).
RECORD_NAME = "user.containers.override_stat"
#: The name older fuse-overlayfs releases read and write.
LEGACY_RECORD_NAME = "user.fuseoverlayfs.override_stat"


_TYPE_NAMES = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "pipe": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
}
_VALID_TYPES = frozenset(_TYPE_NAMES.values()) | {stat.S_IFCHR, stat.S_IFBLK}
_DEVICE_TYPES = {"char": stat.S_IFCHR, "block": stat.S_IFBLK}
_STAND_INS = (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


class RecordError(ValueError):
    """A record value is malformed; the message names the problem."""


@dataclass(frozen=True)
class Record:
    """View metadata of one inode.

    ``mode`` is a full ``st_mode`` including the ``S_IFMT`` type bits;
    ``rdev`` is ``os.makedev(major, minor)`` for character and block devices
    and 0 otherwise.
    """

    uid: int
    gid: int
    mode: int
    rdev: int = 0

    @property
    def type(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_device(self) -> bool:
        return stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode)


def _check_id(value: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise RecordError(f"record {what} {value!r} is outside 0..{MAX_ID}; use a valid id")


def _parse_id(text: str, what: str, raw: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise RecordError(f"record {raw!r}: {what} {text!r} is not a decimal number; expected UID:GID:MODE[:TYPE]")
    value = int(text)
    if value > MAX_ID:
        raise RecordError(f"record {raw!r}: {what} {value} is larger than {MAX_ID}; use a valid id")
    return value


def _parse_number(text: str, raw: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise RecordError(f"record {raw!r}: device number {text!r} is not a decimal number; expected char-MAJOR-MINOR")
    return int(text)


def _parse_device(kind: str, rest: str, raw: str) -> int:
    # Spellings: "-1-3" (containers/storage), "1-3" (fuse-overlayfs in C
    # skips leading dashes), "1:3" (the fuse-overlayfs Rust rewrite).
    body = rest.lstrip("-")
    for sep in ("-", ":"):
        major, found, minor = body.partition(sep)
        if found:
            break
    else:
        raise RecordError(f"record {raw!r}: device {kind}{rest!r} has no minor number; expected {kind}-MAJOR-MINOR")
    ma = _parse_number(major, raw)
    mi = _parse_number(minor, raw)
    if ma >= 2**32 or mi >= 2**32:
        raise RecordError(f"record {raw!r}: device number {ma}:{mi} is too large; use 32-bit major and minor numbers")
    return os.makedev(ma, mi)


def decode(value: bytes, fallback_type: int | None = None) -> Record:
    """Parse a record value.

    ``fallback_type`` is the ``S_IFMT`` type of the backing inode, used when
    the record names no type (neither type bits in the mode nor a fourth
    field). Raises :class:`RecordError` on malformed input.
    """
    if isinstance(value, str):
        value = value.encode()
    # C writers sometimes include the terminating NUL in the value.
    value = value.rstrip(b"\0")
    try:
        raw = value.decode("ascii")
    except UnicodeDecodeError:
        raise RecordError(f"record {value!r} is not ASCII; expected UID:GID:MODE[:TYPE]") from None
    if not raw:
        raise RecordError("record is empty; expected UID:GID:MODE[:TYPE]")
    parts = raw.split(":", 3)
    if len(parts) < 3:
        raise RecordError(f"record {raw!r} has {len(parts)} fields; expected UID:GID:MODE[:TYPE]")
    uid = _parse_id(parts[0], "uid", raw)
    gid = _parse_id(parts[1], "gid", raw)
    mtext = parts[2]
    if not mtext or not mtext.isascii() or any(c not in "01234567" for c in mtext):
        raise RecordError(f"record {raw!r}: mode {mtext!r} is not an octal number; expected e.g. 100644 or 0755")
    mode = int(mtext, 8)
    if mode > 0o177777:
        raise RecordError(f"record {raw!r}: mode {mtext} has bits beyond st_mode; expected at most 6 octal digits")
    mode_type = stat.S_IFMT(mode)
    if mode_type and mode_type not in _VALID_TYPES:
        raise RecordError(f"record {raw!r}: mode {mtext} has an unknown file type; fix the type bits")

    rdev = 0
    field_type = 0
    if len(parts) == 4:
        tname = parts[3]
        if tname in _TYPE_NAMES:
            field_type = _TYPE_NAMES[tname]
        else:
            for kind, ftype in _DEVICE_TYPES.items():
                if tname.startswith(kind):
                    field_type = ftype
                    rdev = _parse_device(kind, tname[len(kind) :], raw)
                    break
            else:
                raise RecordError(
                    f"record {raw!r}: unknown type {tname!r}; expected file, dir, symlink, pipe, socket, "
                    "char-MAJOR-MINOR or block-MAJOR-MINOR"
                )
        if mode_type and mode_type != field_type:
            raise RecordError(f"record {raw!r}: the mode's type bits disagree with the type field; drop one of them")

    ftype = field_type or mode_type
    if not ftype:
        if fallback_type is None:
            raise RecordError(f"record {raw!r} names no file type; pass the backing file's type")
        ftype = stat.S_IFMT(fallback_type)
        if ftype not in _VALID_TYPES:
            raise RecordError(f"fallback type {fallback_type:o} is not a file type; pass stat.S_IFMT(st_mode)")
    return Record(uid, gid, ftype | stat.S_IMODE(mode), rdev)


def encode(rec: Record) -> bytes:
    """The record value for ``rec`` (see the module docstring for the form)."""
    _check_id(rec.uid, "uid")
    _check_id(rec.gid, "gid")
    ftype = stat.S_IFMT(rec.mode)
    if ftype not in _VALID_TYPES or rec.mode & ~0o177777:
        raise RecordError(f"record mode {rec.mode:o} is not a valid st_mode; include the S_IFMT type bits")
    if ftype in (stat.S_IFCHR, stat.S_IFBLK):
        kind = "char" if ftype == stat.S_IFCHR else "block"
        return (
            f"{rec.uid}:{rec.gid}:{stat.S_IMODE(rec.mode):04o}:{kind}-{os.major(rec.rdev)}-{os.minor(rec.rdev)}"
        ).encode()
    if rec.rdev:
        raise RecordError(f"record for mode {rec.mode:o} has a device number; only devices carry rdev")
    return f"{rec.uid}:{rec.gid}:{rec.mode:o}".encode()


def type_fits(view_type: int, backing_type: int) -> bool:
    """Whether a record of ``view_type`` can describe a backing inode of ``backing_type``.

    Besides the same type, a regular file may stand in for a device, FIFO or
    socket (the placeholders we and containers/storage write); a directory or
    symlink shown as anything else could not be served.
    """
    return view_type == backing_type or (backing_type == stat.S_IFREG and view_type in _STAND_INS)


def check_fits(rec: Record, st: os.stat_result) -> None:
    """Raise :class:`RecordError` if ``rec`` cannot describe the backing inode ``st``."""
    if not type_fits(rec.type, stat.S_IFMT(st.st_mode)):
        raise RecordError(
            f"record says {stat.filemode(rec.mode)[0]!r} but the backing inode is "
            f"{stat.filemode(st.st_mode)[0]!r}; fix or remove the record"
        )
