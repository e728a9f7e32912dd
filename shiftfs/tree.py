"""Reading and rewriting a backing tree without a mount.

The offline tools in :mod:`shiftfs.archive` use these helpers to:

* walk a backing tree ("ROOT") through directory descriptors, never following
  a symlink and skipping the record side table ``ROOT/.shiftfs``;
* work out the *view* metadata of each inode: its record if it has one,
  otherwise its disk ids translated through an id table;
* list the view xattrs of an inode, undoing the name escaping of
  :mod:`shiftfs.record`;
* convert POSIX ACL xattrs between the kernel's binary form and the text form
  tar archives carry, and translate the ids inside ACLs and file capabilities;
* choose the backing mode a file gets in a tree owned by one unprivileged
  user: readable and writable by its owner, directories searchable, and never
  setuid, setgid or sticky.

Inodes are named by an ``O_PATH | O_NOFOLLOW`` descriptor. Operations on the
inode itself go through its ``/proc/self/fd`` link, which reaches the inode
(a symlink included) without resolving a backing path string again.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from . import record as _record
from .idmap import IdMap
from .record import RecordError
from .syscalls import proc_fd

__all__ = [
    "STORE_DIR",
    "Entry",
    "TreeError",
    "View",
    "open_root",
    "walk",
    "view_of",
    "view_xattrs",
    "backing_mode",
    "acl_to_text",
    "acl_from_text",
    "map_acl",
    "map_capability",
    "is_privileged_name",
    "Progress",
]

from . import store as _store
from .store import STORE_DIR

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeError(Exception):
    """A problem with one path in a tree; the message names the path."""


# -- walking ---------------------------------------------------------------------


def open_root(path: str) -> int:
    """An ``O_RDONLY | O_DIRECTORY`` descriptor of a tree's root directory."""
    try:
        return os.open(path, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        raise TreeError(f"{path}: no such directory; give an existing tree root") from None
    except NotADirectoryError:
        raise TreeError(f"{path}: not a directory; give the root directory of a tree") from None
    except PermissionError:
        raise TreeError(f"{path}: permission denied; run as the tree's owner (or root)") from None


@dataclass
class Entry:
    """One inode met by :func:`walk`; the descriptors live until the next step."""

    rel: str  # backing path below the root, "" for the root itself
    name: str  # last backing component ("" for the root)
    dirfd: int  # descriptor of the parent directory (the root's own for the root)
    fd: int  # O_PATH | O_NOFOLLOW descriptor of the inode
    st: os.stat_result
    vrel: str = ""  # the path a mount shows (differs only for escaped names)

    @property
    def display(self) -> str:
        return self.rel or "."


def walk(root_fd: int, on_error: Callable[[str, OSError], None] | None = None) -> Iterator[Entry]:
    """Yield every inode below ``root_fd`` (root first, parents before children).

    Names are visited in byte order so archives come out reproducible. The
    side table directory at the root is skipped, and so is anything on
    another filesystem (a mounted ``/proc`` in a chroot must never be
    chowned or archived): it is reported as an ``EXDEV`` error. Errors
    opening or listing an entry go to ``on_error(rel, exc)`` and the walk
    goes on; without a handler they are raised.
    """
    root_path_fd = os.open(".", _PATH_FLAGS | os.O_DIRECTORY, dir_fd=root_fd)
    try:
        st = os.stat(root_path_fd)
        yield Entry("", "", root_fd, root_path_fd, st)
    finally:
        os.close(root_path_fd)
    yield from _walk_dir(root_fd, "", on_error, st.st_dev, "")


def _walk_dir(dfd: int, rel: str, on_error, dev: int, vrel: str) -> Iterator[Entry]:
    try:
        names = sorted(os.listdir(dfd), key=os.fsencode)
    except OSError as e:
        if on_error is None:
            raise
        on_error(rel or ".", e)
        return
    for name in names:
        vbytes = _store.view_name(os.fsencode(name), not rel)
        if vbytes is None:
            continue  # the side table, or a mount's temporary name: never part of the view
        vname = os.fsdecode(vbytes)
        crel = f"{rel}/{name}" if rel else name
        cvrel = f"{vrel}/{vname}" if vrel else vname
        try:
            fd = os.open(name, _PATH_FLAGS, dir_fd=dfd)
        except OSError as e:
            if on_error is None:
                raise
            on_error(crel, e)
            continue
        try:
            st = os.stat(fd)
            if st.st_dev != dev:
                exc = OSError(errno.EXDEV, "another filesystem is mounted here; skipped (unmount it first)")
                if on_error is None:
                    raise exc
                on_error(crel, exc)
                continue
            yield Entry(crel, name, dfd, fd, st, cvrel)
        finally:
            os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except OSError as e:
                if on_error is None:
                    raise
                on_error(crel, e)
                continue
            try:
                if os.fstat(sub).st_ino != st.st_ino:
                    raise OSError(errno.ESTALE, "directory replaced during the walk")
                yield from _walk_dir(sub, crel, on_error, dev, cvrel)
            except OSError as e:
                if on_error is None:
                    raise
                on_error(crel, e)
            finally:
                os.close(sub)


# -- view metadata -------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """What an inode looks like through the mount."""

    uid: int
    gid: int
    mode: int  # full st_mode
    rdev: int
    has_record: bool
    placeholder: bool  # a backing regular file standing in for a device


def view_of(store, fd: int, st: os.stat_result, umap: IdMap, gmap: IdMap, rel: str = "") -> View:
    """The view metadata of one inode: its record, or its disk ids.

    As in the mount, the id table applies to both: a record holds the ids the
    table then translates (with no table, the record holds view ids).
    """
    raw = store.read(fd, st)
    if raw is not None:
        try:
            rec = _record.decode(raw, stat.S_IFMT(st.st_mode))
        except RecordError as e:
            raise TreeError(f"{rel or '.'}: {e}") from None
        placeholder = stat.S_ISREG(st.st_mode) and rec.is_device
        if stat.S_IFMT(rec.mode) != stat.S_IFMT(st.st_mode) and not placeholder:
            raise TreeError(
                f"{rel or '.'}: record says {stat.filemode(rec.mode)[0]!r} but the backing inode is "
                f"{stat.filemode(st.st_mode)[0]!r}; fix or remove the record"
            )
        return View(umap.to_view(rec.uid), gmap.to_view(rec.gid), rec.mode, rec.rdev, True, placeholder)
    return View(
        umap.to_view(st.st_uid),
        gmap.to_view(st.st_gid),
        st.st_mode,
        st.st_rdev if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else 0,
        False,
        False,
    )


# -- xattrs ------------------------------------------------------------------------

_ACL_ACCESS = "system.posix_acl_access"
_ACL_DEFAULT = "system.posix_acl_default"
_OUR_PREFIXES = ("user.containers.", "user.fuseoverlayfs.")


def is_privileged_name(name: str) -> bool:
    """Names that ``escape_xattr_name`` escapes because of what they control."""
    return name.startswith(("security.", "trusted.")) or name in (_ACL_ACCESS, _ACL_DEFAULT)


def list_xattrs(fd: int) -> list[str]:
    try:
        return os.listxattr(proc_fd(fd))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def get_xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(proc_fd(fd), name)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def view_xattrs(fd: int, has_record: bool, umap: IdMap, gmap: IdMap) -> dict[str, bytes]:
    """The xattrs an inode shows through the mount, by view name.

    An inode with a record is taken to be in xattr mode: escaped names are
    restored and everything else our escaping would not produce is hidden.
    An inode without a record is taken to be in table mode: its own names are
    shown as they are and only our own names are hidden. Either way the ids
    inside ACLs go through the table, and a namespaced capability whose root
    the table maps to 0 becomes a plain one.
    """
    out: dict[str, bytes] = {}
    for name in sorted(list_xattrs(fd)):
        if has_record:
            vname = _record.unescape_xattr_name(name)
            if vname is None:
                continue
            value = get_xattr(fd, name)
            if value is None:
                continue
            if vname in (_ACL_ACCESS, _ACL_DEFAULT):
                value = map_acl(value, umap.to_view, gmap.to_view)
            out[vname] = value
        else:
            if name.startswith(_OUR_PREFIXES):
                continue
            value = get_xattr(fd, name)
            if value is None:
                continue
            if name in (_ACL_ACCESS, _ACL_DEFAULT):
                value = map_acl(value, umap.to_view, gmap.to_view)
            elif name == "security.capability":
                value = map_capability(value, umap.to_view)
            out[name] = value
    return out


# -- POSIX ACLs -----------------------------------------------------------------------
#
# The xattr value is a little-endian u32 version (2) followed by 8-byte
# entries (u16 tag, u16 perm, u32 id), sorted by tag and then id.

_ACL_VERSION = 2
_UNDEFINED_ID = 0xFFFFFFFF
_TAGS = {
    0x01: "user",  # USER_OBJ
    0x02: "user",  # USER
    0x04: "group",  # GROUP_OBJ
    0x08: "group",  # GROUP
    0x10: "mask",
    0x20: "other",
}
_NAMED = (0x02, 0x08)


class AclError(ValueError):
    """An ACL is malformed; the message names the problem."""


def acl_entries(value: bytes) -> list[tuple[int, int, int]]:
    if len(value) < 4 or (len(value) - 4) % 8:
        raise AclError(f"ACL xattr of {len(value)} bytes is not 4 + 8*n; it is corrupt")
    (version,) = struct.unpack_from("<I", value)
    if version != _ACL_VERSION:
        raise AclError(f"ACL xattr version {version} is not 2; it is corrupt")
    return [struct.unpack_from("<HHI", value, off) for off in range(4, len(value), 8)]


def _acl_bytes(entries: list[tuple[int, int, int]]) -> bytes:
    entries = sorted(entries, key=lambda e: (e[0], e[2] if e[0] in _NAMED else 0))
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def map_acl(value: bytes, to_uid: Callable[[int], int | None], to_gid: Callable[[int], int | None]) -> bytes:
    """Translate the ids of named entries; raises AclError if one has no image."""
    out = []
    for tag, perm, qid in acl_entries(value):
        if tag in _NAMED:
            new = (to_uid if tag == 0x02 else to_gid)(qid)
            if new is None:
                raise AclError(f"ACL names {_TAGS[tag]} {qid}, which the id map does not cover; extend --map")
            qid = new
        out.append((tag, perm, qid))
    return _acl_bytes(out)


def _perm_text(perm: int) -> str:
    return ("r" if perm & 4 else "-") + ("w" if perm & 2 else "-") + ("x" if perm & 1 else "-")


def acl_to_text(value: bytes) -> str:
    """GNU tar's ``SCHILY.acl.*`` form with numeric ids: one entry a line."""
    lines = []
    for tag, perm, qid in acl_entries(value):
        if tag not in _TAGS:
            raise AclError(f"ACL entry tag {tag:#x} is unknown; the ACL is corrupt")
        q = str(qid) if tag in _NAMED else ""
        lines.append(f"{_TAGS[tag]}:{q}:{_perm_text(perm)}\n")
    return "".join(lines)


def acl_from_text(
    text: str,
    lookup_user: Callable[[str], int | None] = lambda n: None,
    lookup_group: Callable[[str], int | None] = lambda n: None,
) -> bytes:
    """Parse the ACL text of GNU tar or bsdtar into the xattr form.

    Entries are separated by newlines or commas; ``u``/``g``/``m``/``o``
    abbreviations, numeric qualifiers and bsdtar's trailing ``:ID`` field are
    accepted. Names without an id are resolved with the lookup functions.
    """
    entries = []
    for raw in text.replace(",", "\n").splitlines():
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        fields = item.split(":")
        if fields[0] == "default" or fields[0] == "d":
            fields = fields[1:]
        if len(fields) not in (3, 4):
            raise AclError(f"ACL entry {item!r} is not TAG:QUALIFIER:PERMS[:ID]")
        tname, qual, perms = fields[0], fields[1], fields[2]
        tname = {"u": "user", "g": "group", "m": "mask", "o": "other"}.get(tname, tname)
        perm = 0
        for ch in perms:
            if ch in "rwx":
                perm |= {"r": 4, "w": 2, "x": 1}[ch]
            elif ch != "-":
                raise AclError(f"ACL entry {item!r} has bad permissions {perms!r}; use r, w, x and -")
        if tname in ("mask", "other"):
            tag = 0x10 if tname == "mask" else 0x20
            entries.append((tag, perm, _UNDEFINED_ID))
            continue
        if tname not in ("user", "group"):
            raise AclError(f"ACL entry {item!r} has unknown tag {tname!r}; use user, group, mask or other")
        if not qual:
            entries.append((0x01 if tname == "user" else 0x04, perm, _UNDEFINED_ID))
            continue
        if len(fields) == 4 and fields[3].isdigit():
            qid = int(fields[3])
        elif qual.isdigit():
            qid = int(qual)
        else:
            found = (lookup_user if tname == "user" else lookup_group)(qual)
            if found is None:
                raise AclError(f"ACL entry {item!r} names {tname} {qual!r}, which has no known id")
            qid = found
        entries.append((0x02 if tname == "user" else 0x08, perm, qid))
    if not entries:
        raise AclError("ACL text is empty")
    return _acl_bytes(entries)


# -- file capabilities ---------------------------------------------------------
#
# security.capability: a u32 magic_etc (revision in the top byte), then
# permitted/inheritable u32 pairs; revision 3 appends the u32 root id of the
# user namespace the capability belongs to.

_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000
_VFS_CAP_FLAGS_EFFECTIVE = 0x000001


def map_capability(value: bytes, to_view: Callable[[int], int | None]) -> bytes:
    """Make a namespaced (v3) capability a plain (v2) one if its root maps to 0.

    A capability written inside a user namespace records the host id of that
    namespace's root. Once the ids are translated into the view, the one whose
    root is the view's root 0 is simply a v2 capability.
    """
    if len(value) != 24:
        return value
    (magic,) = struct.unpack_from("<I", value)
    if magic & _VFS_CAP_REVISION_MASK != _VFS_CAP_REVISION_3:
        return value
    (rootid,) = struct.unpack_from("<I", value, 20)
    if to_view(rootid) != 0:
        return value
    magic = _VFS_CAP_REVISION_2 | (magic & _VFS_CAP_FLAGS_EFFECTIVE)
    return struct.pack("<I", magic) + value[4:20]


def capability_for_disk(value: bytes, root_disk_id: int | None) -> bytes:
    """The capability to store on disk for a view capability (v2 → v3 if shifted)."""
    if root_disk_id in (None, 0) or len(value) != 20:
        return value
    (magic,) = struct.unpack_from("<I", value)
    if magic & _VFS_CAP_REVISION_MASK != _VFS_CAP_REVISION_2:
        return value
    magic = _VFS_CAP_REVISION_3 | (magic & _VFS_CAP_FLAGS_EFFECTIVE)
    return struct.pack("<I", magic) + value[4:20] + struct.pack("<I", root_disk_id)


# -- backing modes -------------------------------------------------------------


def backing_mode(view_mode: int) -> int:
    """Permission bits for the backing copy of an inode with this view mode.

    The same rule as the mount's xattr mode: the view's rwx bits, plus owner
    read and write (and search for directories) so the owning user can always
    manage the file; setuid, setgid and sticky live only in the record.
    """
    perm = view_mode & 0o777
    if stat.S_ISDIR(view_mode):
        return perm | 0o700
    if stat.S_ISREG(view_mode) or stat.S_ISCHR(view_mode) or stat.S_ISBLK(view_mode):
        return perm | 0o600
    return perm


# -- progress ---------------------------------------------------------------------


class Progress:
    """A rich progress line (files, bytes, throughput) on a terminal, else silent."""

    def __init__(self, what: str, enabled: bool | None = None):
        self.files = 0
        self.bytes = 0
        self._start = time.monotonic()
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                DownloadColumn,
                Progress as _RichProgress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )

            self._progress = _RichProgress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                TextColumn("{task.fields[files]} files"),
                TextColumn("{task.fields[rate]:.0f} files/s"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task(what, total=None, files=0, rate=0.0)

    def __enter__(self) -> "Progress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._update()
            self._progress.stop()

    def advance(self, files: int = 1, nbytes: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        if self._progress is not None:
            self._update()

    def _update(self) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        self._progress.update(self._task, completed=self.bytes, files=self.files, rate=self.files / elapsed)

    def log(self, message: str) -> None:
        """Print a message above the progress line (stderr)."""
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr)
