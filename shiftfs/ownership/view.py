"""The one view rule: what an inode looks like through a mount, and back.

One :class:`ViewRule` decides, for the mount (:mod:`shiftfs.ownership.xattr`,
:mod:`shiftfs.ownership.table`) and for every offline tool
(:mod:`shiftfs.offline`: ``export``, ``ls``, ``stat``), what an inode shows:
owner, group, mode, type, device number and xattrs. Both sides build one with
the same inputs (id tables, whose records count, the default owner, whether
the tree keeps records), so a tree shows the same owners, modes, types and
xattrs either way (``tests/test_view_agreement.py`` compares them):

* **table mode** (``records=False``): ownership is backing ownership through
  the table, as on a kernel idmapped mount; records are never read;
* **xattr mode**: an inode with a record shows the record, its ids
  translated by the id table; the record's type must fit the backing inode
  (:func:`~shiftfs.ownership.record.type_fits`);
* a record counts only as :mod:`shiftfs.ownership.trust` says: on an inode of
  the trusted user that nobody else can write. Another user's inode shows as
  the overflow id without setuid/setgid (:meth:`ViewRule.foreign`); one of
  the trusted user's whose record is not believed shows as if it had none;
* an inode without a (believed) record shows its backing mode and its disk
  ids translated, or the *default owner* when one is given
  (:meth:`ViewRule.unrecorded`); :meth:`ViewRule.unrecorded_record` is the
  record that keeps exactly that view when one must be written.

The default owner is given, not recorded: the mount takes ``-o
default_owner=``, the offline readers ``--default-owner``. Recording it in the
tree would make a one-time mount option change what every later mount and
export of the tree shows; a user who mounted with it passes the same value
to ``export`` and gets what the mount showed (as with ``--map``).

Offline, the mode is the tree's: it is an xattr-mode tree if it has a side
table or its root carries a record (:func:`tree_keeps_records`), as every
mount, ``import`` and ``absorb`` leaves it. Any other tree (``records=None``)
is read inode by inode, as before there was one rule: records are read on the
trusted user's inodes, and an inode's xattrs are read in xattr mode if it has
a record, in table mode if not.

Xattrs follow the same two modes (:meth:`ViewRule.xattr_name`,
:meth:`ViewRule.xattr_value`): in xattr mode escaped names are restored and
every other name our escaping would not produce is hidden (the backing
inode's own ``security.*`` and ACLs belong to the host); in table mode an
inode's own names are shown and only ours hidden. ACL ids go through the
table either way; in table mode a namespaced (v3) capability whose root the
table maps to view 0 is shown as a plain (v2) one, as a kernel idmapped mount
shows it.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from typing import NamedTuple, Protocol

from ..sys.files import proc_fd
from . import acl, trust
from .idmap import IdMap, overflow_ids
from .names import OUR_XATTR_PREFIXES, STORE_DIR, unescape_xattr_name
from .record import Record, RecordError, type_fits
from .trust import backing_perm

__all__ = [
    "View",
    "ViewRule",
    "RecordReader",
    "tree_keeps_records",
    "type_fits",
    "backing_perm",
    "backing_type",
    "list_xattrs",
    "get_xattr",
    "map_capability",
    "capability_for_disk",
]


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


class RecordReader(Protocol):
    """What the rule needs of a record store (:class:`shiftfs.ownership.store.RecordStore`)."""

    #: descriptor of the tree root the store keeps records for
    root_fd: int
    #: whose records count
    trusted_uid: int

    def read(self, fd: int, st: os.stat_result) -> bytes | None: ...

    def read_record(self, fd: int, st: os.stat_result) -> Record | None: ...


class ViewRule:
    """What inodes show, for one mount or one offline run (see the module docstring)."""

    def __init__(
        self,
        uids: IdMap,
        gids: IdMap,
        trusted_uid: int,
        *,
        default_owner: tuple[int, int] | None = None,
        records: bool | None = True,
    ):
        self.uids = uids
        self.gids = gids
        #: whose records count (shiftfs.ownership.trust, rule 2)
        self.trusted_uid = trusted_uid
        #: view ids shown for the trusted user's inodes without a (believed) record
        self.default_owner = default_owner
        #: True: xattr mode (records kept); False: table mode (records never read);
        #: None: a tree without a side table or root record, read inode by inode (offline)
        self.records = records

    @classmethod
    def for_tree(
        cls,
        root_fd: int,
        store: RecordReader,
        uids: IdMap,
        gids: IdMap,
        default_owner: tuple[int, int] | None = None,
    ) -> ViewRule:
        """The rule an offline tool reads the tree at ``root_fd`` with (whose records count: the
        store's; the mode: :func:`tree_keeps_records`)."""
        records = True if tree_keeps_records(root_fd, store) else None
        return cls(uids, gids, store.trusted_uid, default_owner=default_owner, records=records)

    # -- owners and modes ----------------------------------------------------------------
    def trusts(self, st: os.stat_result) -> bool:
        """Whether the inode is the trusted user's (only then is its record read)."""
        return self.records is False or trust.owned_by(st, self.trusted_uid)

    def foreign(self, st: os.stat_result) -> View:
        """The view of an inode that is not the trusted user's: its record is not read.

        Owned by an id the table maps, it shows through the table (table
        semantics: the disk owner is real). Otherwise the overflow ids, without
        setuid/setgid: nobody we trust said this file may run as anyone.
        """
        why = trust.why_foreign(st, self.trusted_uid)
        uids, gids = self.uids, self.gids
        if not uids.identity and uids.to_view(st.st_uid) != uids.overflow:
            return View(st.st_mode, uids.to_view(st.st_uid), gids.to_view(st.st_gid), st.st_rdev, distrust=why)
        ou, og = overflow_ids()
        return View(st.st_mode & ~(stat.S_ISUID | stat.S_ISGID), ou, og, st.st_rdev, distrust=why)

    def unrecorded(self, st: os.stat_result, distrust: str = "") -> View:
        """The view of an inode without a (believed) record: the default owner, else its disk
        ids through the table; its own mode."""
        owner = self.default_owner if self.records is not False else None
        if owner is None:
            owner = (self.uids.to_view(st.st_uid), self.gids.to_view(st.st_gid))
        return View(st.st_mode, owner[0], owner[1], st.st_rdev, distrust=distrust)

    def recorded(self, rec: Record, st: os.stat_result) -> View:
        """The view of an inode with a (fitting, believed) record."""
        placeholder = stat.S_IFMT(rec.mode) != stat.S_IFMT(st.st_mode)
        return View(rec.mode, self.uids.to_view(rec.uid), self.gids.to_view(rec.gid), rec.rdev, True, placeholder)

    def shows(self, st: os.stat_result, rec: Record | None, distrust: str = "") -> View:
        """The view of an inode of the trusted user, given its believed record (or None)."""
        if rec is None or self.records is False:
            return self.unrecorded(st, distrust)
        return self.recorded(rec, st)

    def believed(self, store: RecordReader, fd: int, st: os.stat_result) -> tuple[Record | None, str]:
        """The record of one of the trusted user's inodes if it counts, else None, and why a
        record there is not believed ("" when there is none, or it counts). Raises
        :class:`RecordError` for a malformed record that would count."""
        if self.records is False:
            return None, ""
        if not trust.record_counts(st, self.trusted_uid):
            # anyone could have written it: not decoded, only noticed
            return None, trust.why_foreign(st, self.trusted_uid) if store.read(fd, st) is not None else ""
        return store.read_record(fd, st), ""

    def view(self, store: RecordReader, fd: int, st: os.stat_result) -> View:
        """The view of one inode from the tree (offline); raises RecordError on a bad record."""
        if not self.trusts(st):
            return self.foreign(st)
        rec, why = self.believed(store, fd, st)
        return self.shows(st, rec, why)

    def unrecorded_record(self, st: os.stat_result) -> Record:
        """The record (disk ids) that keeps what an inode without one shows now
        (:meth:`unrecorded`); RecordError if the default owner has no disk id in the table."""
        du, dg = st.st_uid, st.st_gid
        if self.default_owner is not None:
            mu, mg = self.uids.to_disk(self.default_owner[0]), self.gids.to_disk(self.default_owner[1])
            if mu is None or mg is None:
                raise RecordError(f"default owner {self.default_owner} has no disk ids in the table; extend the map")
            du, dg = mu, mg
        dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        return Record(du, dg, st.st_mode, st.st_rdev if dev else 0)

    # -- xattrs --------------------------------------------------------------------------
    def _xattr_mode(self, recorded: bool) -> bool:
        """Whether an inode's xattrs are read in xattr mode (``recorded``: it has a record)."""
        return recorded if self.records is None else self.records

    def xattr_name(self, backing: str, recorded: bool = False) -> str | None:
        """The view name of a backing xattr name, or None if it is hidden."""
        if self._xattr_mode(recorded):
            return unescape_xattr_name(backing)
        return None if backing.startswith(OUR_XATTR_PREFIXES) else backing

    def xattr_value(self, name: str, value: bytes, recorded: bool = False) -> bytes:
        """The value an xattr shows under its view name (raises acl.AclError on a bad ACL)."""
        if name in acl.ACL_NAMES:
            if self.uids.identity and self.gids.identity:
                return value
            return acl.map_ids(value, self.uids.to_view, self.gids.to_view)
        if name == "security.capability" and not self._xattr_mode(recorded):
            return map_capability(value, self.uids.to_view)
        return value

    def xattrs(self, fd: int, view: View) -> dict[str, bytes]:
        """Every xattr an inode (showing ``view``) shows, by view name (offline; the mount lists
        through its inode's cached names and asks :meth:`xattr_name`/:meth:`xattr_value`)."""
        out: dict[str, bytes] = {}
        for name in sorted(list_xattrs(fd)):
            vname = self.xattr_name(name, view.has_record)
            if vname is None:
                continue
            value = get_xattr(fd, name)
            if value is not None:
                out[vname] = self.xattr_value(vname, value, view.has_record)
        return out


def tree_keeps_records(root_fd: int, store: RecordReader) -> bool:
    """Whether a tree is read in xattr mode offline: a side table at its root or the store's,
    or a record on its root (every mount, import and absorb gives the root one)."""
    for fd in {root_fd, store.root_fd}:
        try:
            os.stat(STORE_DIR, dir_fd=fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            pass
    try:
        return store.read(root_fd, os.fstat(root_fd)) is not None
    except OSError:
        return False


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
