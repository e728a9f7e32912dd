"""The one view rule: what an inode looks like through a mount, and back.

The mount (:mod:`shiftfs.ownership.xattr`, :mod:`shiftfs.ownership.table`)
and the offline tools (:mod:`shiftfs.offline`) both ask this module, so a
tree shows the same owners, modes, types and xattrs either way:

* an inode with a record shows the record, its ids translated by the id
  table (with no table, the record holds view ids); the record's type must
  fit the backing inode (:func:`type_fits`): the same type, or a regular
  file standing in for a device, FIFO or socket (the placeholders we and
  containers/storage write);
* an inode without one shows its backing mode and its disk ids translated;
* a record counts only as :mod:`shiftfs.ownership.trust` says: on an inode
  of the trusted user that nobody else can write; another user's inode
  shows as the overflow id without setuid/setgid (:func:`foreign_view`);
* a backing file of an xattr-mode tree gets :func:`backing_perm`: the view's
  read and search bits plus owner access, never group or other write,
  setuid, setgid or sticky.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from typing import NamedTuple

from ..sys.files import proc_fd
from . import acl, trust
from .idmap import IdMap, overflow_ids
from .names import OUR_XATTR_PREFIXES, unescape_xattr_name
from .record import Record, RecordError, decode

__all__ = [
    "View",
    "type_fits",
    "record_view",
    "backing_view",
    "foreign_view",
    "read_view",
    "backing_perm",
    "backing_type",
    "view_xattrs",
    "list_xattrs",
    "get_xattr",
    "map_capability",
    "capability_for_disk",
]

_STAND_INS = (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


class View(NamedTuple):
    """An inode as seen through the mount."""

    mode: int  # full st_mode
    uid: int
    gid: int
    rdev: int
    has_record: bool = False
    #: a backing regular file standing in for a device, FIFO or socket
    placeholder: bool = False
    #: why a record of this inode was not believed (shiftfs.ownership.trust), else ""
    distrust: str = ""


def type_fits(view_type: int, backing_type: int) -> bool:
    """Whether a record of ``view_type`` can describe a backing inode of ``backing_type``.

    Besides the same type, a regular file may stand in for a device, FIFO or
    socket; a directory or symlink shown as anything else could not be served.
    """
    return view_type == backing_type or (backing_type == stat.S_IFREG and view_type in _STAND_INS)


def check_fits(rec: Record, st: os.stat_result) -> None:
    """Raise :class:`RecordError` if ``rec`` cannot describe the backing inode ``st``."""
    if not type_fits(rec.type, stat.S_IFMT(st.st_mode)):
        raise RecordError(
            f"record says {stat.filemode(rec.mode)[0]!r} but the backing inode is "
            f"{stat.filemode(st.st_mode)[0]!r}; fix or remove the record"
        )


def record_view(rec: Record, st: os.stat_result, uids: IdMap, gids: IdMap) -> View:
    """The view of an inode with a (fitting) record."""
    placeholder = stat.S_IFMT(rec.mode) != stat.S_IFMT(st.st_mode)
    return View(rec.mode, uids.to_view(rec.uid), gids.to_view(rec.gid), rec.rdev, True, placeholder)


def backing_view(st: os.stat_result, uids: IdMap, gids: IdMap, owner: tuple[int, int] | None = None) -> View:
    """The view of an inode without a record: its disk ids (or ``owner``) and its own mode."""
    if owner is None:
        owner = (uids.to_view(st.st_uid), gids.to_view(st.st_gid))
    return View(st.st_mode, owner[0], owner[1], st.st_rdev)


def foreign_view(st: os.stat_result, uids: IdMap, gids: IdMap, trusted_uid: int) -> View:
    """The view of an inode that is not the trusted user's: its record is not read.

    Owned by an id the table maps, it shows through the table (table
    semantics: the disk owner is real). Otherwise the overflow ids, without
    setuid/setgid: nobody we trust said this file may run as anyone.
    """
    why = trust.why_foreign(st, trusted_uid)
    if st.st_uid != trusted_uid and not uids.identity and uids.to_view(st.st_uid) != uids.overflow:
        return View(st.st_mode, uids.to_view(st.st_uid), gids.to_view(st.st_gid), st.st_rdev, distrust=why)
    ou, og = overflow_ids()
    return View(st.st_mode & ~(stat.S_ISUID | stat.S_ISGID), ou, og, st.st_rdev, distrust=why)


def read_view(store, fd: int, st: os.stat_result, uids: IdMap, gids: IdMap) -> View:
    """The view of one inode from its record or its disk ids; raises RecordError on a bad record.

    The trusted user is ``store.trusted_uid`` (the mount's user; offline
    :func:`shiftfs.ownership.trust.offline_trusted_uid`). A record on one of its inodes that others can write is not
    believed: the inode shows as if it had none, and ``distrust`` says why.
    """
    trusted = store.trusted_uid
    if st.st_uid != trusted:
        return foreign_view(st, uids, gids, trusted)
    raw = store.read(fd, st)
    if raw is not None and not trust.record_counts(st, trusted):
        return backing_view(st, uids, gids)._replace(distrust=trust.why_foreign(st, trusted))
    if raw is None:
        return backing_view(st, uids, gids)
    rec = decode(raw, stat.S_IFMT(st.st_mode))
    check_fits(rec, st)
    return record_view(rec, st, uids, gids)


def backing_perm(view_mode: int) -> int:
    """Permission bits for the backing file of an inode with this view mode.

    The view's read and search bits, plus owner read and write (and search
    for directories) so the owning user can always manage the file. Never
    group or other write: user xattrs need write access, so others could
    write records (shiftfs.ownership.trust, rule 1); a view /tmp (1777) is
    0755 on disk. Setuid, setgid and sticky live only in the record.
    """
    perm = view_mode & 0o777 & ~trust.OTHERS_WRITE
    if stat.S_ISDIR(view_mode):
        return perm | 0o700
    if stat.S_ISREG(view_mode) or stat.S_ISCHR(view_mode) or stat.S_ISBLK(view_mode):
        return perm | 0o600
    return perm


def backing_type(view_mode: int) -> int:
    """The backing file type for a view type: devices become regular placeholder files."""
    if stat.S_ISCHR(view_mode) or stat.S_ISBLK(view_mode):
        return stat.S_IFREG
    return stat.S_IFMT(view_mode)


# -- xattrs ------------------------------------------------------------------------


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
    inside ACLs go through the table, and (table mode) a namespaced
    capability whose root the table maps to 0 becomes a plain one.
    """
    out: dict[str, bytes] = {}
    for name in sorted(list_xattrs(fd)):
        if has_record:
            vname = unescape_xattr_name(name)
        else:
            vname = None if name.startswith(OUR_XATTR_PREFIXES) else name
        if vname is None:
            continue
        value = get_xattr(fd, name)
        if value is None:
            continue
        if vname in acl.ACL_NAMES:
            value = acl.map_ids(value, umap.to_view, gmap.to_view)
        elif vname == "security.capability" and not has_record:
            value = map_capability(value, umap.to_view)
        out[vname] = value
    return out


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
