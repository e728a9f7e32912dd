"""Ownership policies: what the view shows and how changes are stored.

:class:`shiftfs.ops.Operations` does the FUSE plumbing and knows nothing about
ownership; it asks one :class:`OwnershipPolicy` instead:

* :class:`TablePolicy` stores view ownership as real backing ownership,
  translated through the id tables (what a kernel idmapped mount does; the
  daemon needs the privilege to chown).
* :class:`XattrPolicy` leaves backing files owned by the daemon's user and
  keeps the view owner, group, mode and device number in a *record*
  (``user.containers.override_stat``, see :mod:`shiftfs.record`). It composes
  with a table: view id → table → record.

Both keep POSIX creation semantics for the view: the new owner is the
caller, the group the caller's or, under a setgid directory, the directory's.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
import struct

import pyfuse3

from . import record as _record
from .idmap import IdMap
from .inodes import Inode
from .store import RecordStore, can_hold_xattr
from .syscalls import fchown_fd, proc_fd

__all__ = ["OwnershipPolicy", "TablePolicy", "XattrPolicy", "ViewAttrs"]

log = logging.getLogger(__name__)

ViewAttrs = tuple  # (mode, uid, gid, rdev)

_SPECIAL = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
_ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_USER, _ACL_GROUP = 0x02, 0x08
_OUR_PREFIXES = ("user.containers.", "user.fuseoverlayfs.")
_ACL_ACCESS_NAME, _ACL_DEFAULT_NAME = _ACL_NAMES
_ESC_ACL_ACCESS = _record.escape_xattr_name(_ACL_ACCESS_NAME)
_ESC_ACL_DEFAULT = _record.escape_xattr_name(_ACL_DEFAULT_NAME)


def _type_fits(view_type: int, backing_type: int) -> bool:
    """Whether a record of ``view_type`` can describe a backing inode of ``backing_type``.

    Besides the same type, a regular file may stand in for a device, FIFO or
    socket (the placeholders we and containers/storage write); a directory or
    symlink shown as anything else could not be served.
    """
    if view_type == backing_type:
        return True
    return backing_type == stat.S_IFREG and view_type in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


# -- POSIX ACL arithmetic (the kernel's posix_acl_* rules, for ACLs we keep in records' xattrs)
#
# The xattr value is a little-endian u32 version (2) followed by 8-byte
# entries: u16 tag, u16 perm, u32 id.

_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x04, 0x10, 0x20


def _acl_parse(value: bytes) -> list[list[int]]:
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != 2:
        raise ValueError(f"not a version 2 POSIX ACL ({len(value)} bytes)")
    return [list(struct.unpack_from("<HHI", value, off)) for off in range(4, len(value), 8)]


def _acl_pack(entries: list[list[int]]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _acl_equiv_mode(entries: list[list[int]]) -> tuple[int, bool]:
    """The permission bits an access ACL implies, and whether the mode says it all."""
    mode, equiv, mask = 0, True, None
    for tag, perm, _ in entries:
        if tag == _ACL_USER_OBJ:
            mode |= (perm & 7) << 6
        elif tag == _ACL_GROUP_OBJ:
            mode |= (perm & 7) << 3
        elif tag == _ACL_OTHER:
            mode |= perm & 7
        elif tag == _ACL_MASK:
            mask, equiv = perm & 7, False
        else:
            equiv = False
    if mask is not None:
        mode = (mode & ~0o070) | (mask << 3)
    return mode, equiv


def _acl_create_masq(entries: list[list[int]], mode: int) -> tuple[list[list[int]], int, bool]:
    """A new inode's access ACL from its parent's default ACL (posix_acl_create_masq)."""
    out = [list(e) for e in entries]
    m = mode & 0o777
    not_equiv = False
    group_obj = mask_obj = None
    for e in out:
        tag = e[0]
        if tag == _ACL_USER_OBJ:
            e[1] &= (m >> 6) & 7
            m &= (e[1] << 6) | ~0o700
        elif tag == _ACL_OTHER:
            e[1] &= m & 7
            m &= e[1] | ~0o007
        elif tag == _ACL_GROUP_OBJ:
            group_obj = e
        elif tag == _ACL_MASK:
            mask_obj, not_equiv = e, True
        else:
            not_equiv = True
    target = mask_obj if mask_obj is not None else group_obj
    if target is not None:
        target[1] &= (m >> 3) & 7
        m &= (target[1] << 3) | ~0o070
    return out, (mode & ~0o777) | (m & 0o777), not_equiv


def _acl_chmod(entries: list[list[int]], mode: int) -> list[list[int]]:
    """An access ACL after a chmod (posix_acl_chmod_masq)."""
    out = [list(e) for e in entries]
    group_obj = mask_obj = None
    for e in out:
        if e[0] == _ACL_USER_OBJ:
            e[1] = (mode >> 6) & 7
        elif e[0] == _ACL_OTHER:
            e[1] = mode & 7
        elif e[0] == _ACL_GROUP_OBJ:
            group_obj = e
        elif e[0] == _ACL_MASK:
            mask_obj = e
    target = mask_obj if mask_obj is not None else group_obj
    if target is not None:
        target[1] = (mode >> 3) & 7
    return out


def _eoverflow():
    return pyfuse3.FUSEError(errno.EOVERFLOW)


class OwnershipPolicy:
    """The interface between the FUSE plumbing and the ownership rules."""

    #: whether creating an object directly may give it the right ownership
    may_create_directly = False

    def __init__(self, uids: IdMap, gids: IdMap):
        self.uids = uids
        self.gids = gids

    def describe(self, node: Inode) -> str:
        """How log lines name an inode (the operations layer replaces this with the view path)."""
        return f"<inode {node.id}>"

    # -- attributes --------------------------------------------------------
    def view(self, node: Inode, st: os.stat_result) -> ViewAttrs:
        """``(st_mode, st_uid, st_gid, st_rdev)`` as seen through the mount."""
        raise NotImplementedError

    def new_owner(self, ctx, parent_view: ViewAttrs, mode: int) -> tuple[int, int, int]:
        """Owner, group and mode of a new object, POSIX style."""
        pmode, _, pgid, _ = parent_view
        uid = ctx.uid
        if pmode & stat.S_ISGID:
            gid = pgid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        else:
            gid = ctx.gid
        return uid, gid, mode

    def disk_ids(self, uid: int | None, gid: int | None) -> tuple[int, int]:
        """View ids to disk ids (-1 for None); EOVERFLOW when one has no mapping."""
        du = dg = -1
        if uid is not None:
            du = self.uids.to_disk(uid)
            if du is None:
                raise _eoverflow()
        if gid is not None:
            dg = self.gids.to_disk(gid)
            if dg is None:
                raise _eoverflow()
        return du, dg

    # -- creation ----------------------------------------------------------
    def create_mode(self, parent: Inode, mode: int, umask: int) -> int:
        """The mode of a new object, from the mode asked for and the caller's umask.

        A default ACL on the parent replaces the umask. Here that ACL is the
        backing directory's own, which the backing filesystem applies itself
        when we create the object. (The kernel has usually applied the umask
        already: FUSE_DONT_MASK is not negotiated.)
        """
        if parent.default_acl is None:
            try:
                os.getxattr(proc_fd(parent.fd), "system.posix_acl_default")
                parent.default_acl = True
            except OSError:
                parent.default_acl = False
        if parent.default_acl:
            return mode
        return mode & ~(umask & 0o777)

    def backing_mode(self, mode: int, rdev: int) -> tuple[int, int]:
        """The ``(mode, rdev)`` to create on the backing fs for a view object."""
        return mode, rdev

    def direct_ok(self, du: int, dg: int, mode: int, parent_st: os.stat_result) -> bool:
        """Whether creating as the daemon gives exactly this owner and mode."""
        return False

    def stamp(self, fd: int, st: os.stat_result, du: int, dg: int, mode: int, rdev: int, parent: Inode | None = None):
        """Give a new, not yet visible object its ownership (and inherited ACLs); returns what to cache."""
        raise NotImplementedError

    def adopted(self, node: Inode, cached) -> None:
        """A freshly stamped object entered the inode table."""

    # -- changes -----------------------------------------------------------
    def change(self, node: Inode, st: os.stat_result, uid: int | None, gid: int | None, mode: int | None) -> None:
        raise NotImplementedError

    def gone(self, node: Inode | None, st: os.stat_result) -> None:
        """The last link of an inode was removed."""

    # -- xattrs ------------------------------------------------------------
    def xattr_stored(self, node: Inode, name: str, value: bytes) -> bool:
        """An xattr was set through the mount; True if that changed the inode's attributes."""
        return False

    def xattr_to_backing(self, name: str) -> str | None:
        """Backing name of a view xattr name, or None if it may not be touched."""
        if name.startswith(_OUR_PREFIXES):
            return None
        return name

    def xattr_to_view(self, backing: str) -> str | None:
        if backing.startswith(_OUR_PREFIXES):
            return None
        return backing

    def xattr_value_in(self, name: str, value: bytes) -> bytes:
        if name in _ACL_NAMES:
            return self._acl_translate(value, to_disk=True)
        return value

    def xattr_value_out(self, name: str, value: bytes) -> bytes:
        if name in _ACL_NAMES:
            return self._acl_translate(value, to_disk=False)
        return value

    def _acl_translate(self, value: bytes, to_disk: bool) -> bytes:
        if self.uids.identity and self.gids.identity:
            return value
        if len(value) < 4 or (len(value) - 4) % 8:
            raise pyfuse3.FUSEError(errno.EINVAL)
        out = bytearray(value[:4])
        for off in range(4, len(value), 8):
            tag, perm, xid = struct.unpack_from("<HHI", value, off)
            m = self.uids if tag == _ACL_USER else self.gids if tag == _ACL_GROUP else None
            if m is not None:
                if to_disk:
                    nid = m.to_disk(xid)
                    if nid is None:
                        raise _eoverflow()
                    xid = nid
                else:
                    xid = m.to_view(xid)
            out += struct.pack("<HHI", tag, perm, xid)
        return bytes(out)


class TablePolicy(OwnershipPolicy):
    """View ownership is backing ownership through the id tables."""

    may_create_directly = True

    def __init__(self, uids: IdMap, gids: IdMap):
        super().__init__(uids, gids)
        self.euid = os.geteuid()
        self.egid = os.getegid()

    def view(self, node, st):
        return st.st_mode, self.uids.to_view(st.st_uid), self.gids.to_view(st.st_gid), st.st_rdev

    def direct_ok(self, du, dg, mode, parent_st):
        natural_gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else self.egid
        if du != self.euid or dg != natural_gid:
            return False
        special = mode & _SPECIAL
        if stat.S_ISDIR(mode):
            return special == (stat.S_ISGID if parent_st.st_mode & stat.S_ISGID else 0)
        return special == 0

    def stamp(self, fd, st, du, dg, mode, rdev, parent=None):
        if (st.st_uid, st.st_gid) != (du, dg):
            fchown_fd(fd, du, dg)
        if not stat.S_ISLNK(mode):
            cur = os.fstat(fd).st_mode if (st.st_uid, st.st_gid) != (du, dg) else st.st_mode
            if cur & 0o7777 != mode & 0o7777:
                os.chmod(proc_fd(fd), mode & 0o7777)
        return None

    def change(self, node, st, uid, gid, mode):
        if uid is not None or gid is not None:
            du, dg = self.disk_ids(uid, gid)
            fchown_fd(node.fd, du, dg)
        if mode is not None and not stat.S_ISLNK(st.st_mode):
            os.chmod(proc_fd(node.fd), mode & 0o7777)


class XattrPolicy(OwnershipPolicy):
    """View ownership and mode live in records; backing files stay the daemon's."""

    def __init__(self, uids: IdMap, gids: IdMap, store: RecordStore, default_owner: tuple[int, int] | None = None):
        super().__init__(uids, gids)
        self.store = store
        self.default_owner = default_owner
        self._warned: set[tuple[int, int]] = set()
        self._store_errors: set[str] = set()
        if store.write_legacy:
            self._legacy_root()

    def _legacy_root(self) -> None:
        """Give the root a legacy record: fuse-overlayfs 1.10 fails on a directory without one."""
        fd = self.store.root_fd
        try:
            os.getxattr(proc_fd(fd), _record.LEGACY_RECORD_NAME)
            return
        except OSError as e:
            if e.errno != errno.ENODATA:
                return  # no user xattrs here: nothing an old fuse-overlayfs could read either
        try:
            st = os.fstat(fd)
            raw = self.store.read(fd, st)
            rec = None
            if raw is not None:
                try:
                    rec = _record.decode(raw, stat.S_IFDIR)
                except ValueError:
                    rec = None
            if rec is None or rec.type != stat.S_IFDIR:
                if self.default_owner is not None:
                    du, dg = self.disk_ids(*self.default_owner)
                else:
                    du, dg = st.st_uid, st.st_gid
                rec = _record.Record(du, dg, st.st_mode)
            self.store.write(fd, st, _record.encode(rec))
        except (OSError, ValueError, pyfuse3.FUSEError) as e:
            log.warning("cannot give the root a record for -o legacy_xattr: %s", e)

    # records ----------------------------------------------------------------
    def _record(self, node: Inode, st: os.stat_result):
        if node.record_loaded:
            return node.record
        rec = None
        try:
            raw = self.store.read(node.fd, st)
        except sqlite3.Error as e:
            # The side table as a whole: say so once, not once per inode.
            if str(e) not in self._store_errors:
                self._store_errors.add(str(e))
                log.warning("cannot read the record side table (%s; first seen for %s); inodes whose "
                            "records live there show their backing owner", e, self.describe(node))
            raw = None
        except OSError as e:
            if node.key not in self._warned:
                self._warned.add(node.key)
                log.warning("cannot read the record of %s: %s", self.describe(node), e)
            raw = None
        if raw is not None:
            try:
                rec = _record.decode(raw, stat.S_IFMT(st.st_mode))
                if not _type_fits(rec.type, stat.S_IFMT(st.st_mode)):
                    raise _record.RecordError(
                        f"it says {stat.filemode(rec.mode)[0]!r} but the backing inode is {stat.filemode(st.st_mode)[0]!r}"
                    )
            except ValueError as e:
                if node.key not in self._warned:
                    self._warned.add(node.key)
                    log.warning("malformed record %r on %s (%s); showing the default owner",
                                raw, self.describe(node), e)
                rec = None
        node.record = rec
        return rec

    def view(self, node, st):
        rec = self._record(node, st)
        if rec is None:
            if self.default_owner is not None:
                uid, gid = self.default_owner
            else:
                uid, gid = self.uids.to_view(st.st_uid), self.gids.to_view(st.st_gid)
            return st.st_mode, uid, gid, st.st_rdev
        mode = rec.mode if stat.S_IFMT(rec.mode) else rec.mode | stat.S_IFMT(st.st_mode)
        return mode, self.uids.to_view(rec.uid), self.gids.to_view(rec.gid), rec.rdev

    @staticmethod
    def _backing_perm(mode: int) -> int:
        perm = mode & 0o777
        if stat.S_ISDIR(mode):
            return perm | 0o700
        if stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return perm | 0o600
        return perm

    def backing_mode(self, mode, rdev):
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return stat.S_IFREG | self._backing_perm(mode), 0
        return stat.S_IFMT(mode) | self._backing_perm(mode), 0

    # ACLs -----------------------------------------------------------------
    # Set through the mount, ACLs are kept escaped (user.containers.override_
    # system.posix_acl_*), so the backing filesystem neither enforces nor
    # inherits them: we do what it would. A default ACL is inherited by new
    # objects; an access ACL sets the mode's group class from its mask, and a
    # chmod sets the mask. (A default ACL should also replace the umask, but
    # the kernel applies the umask before we see the mode: FUSE_DONT_MASK is
    # not negotiated.) Enforcing ACLs is the kernel's job: FUSE_POSIX_ACL.

    def _default_acl(self, parent: Inode) -> list[list[int]] | None:
        if parent.default_acl is False:
            return None
        try:
            raw = os.getxattr(proc_fd(parent.fd), _ESC_ACL_DEFAULT)
        except OSError:
            parent.default_acl = False
            return None
        parent.default_acl = True
        try:
            return _acl_parse(raw)
        except ValueError as e:
            log.warning("ignoring the malformed default ACL of %s: %s", self.describe(parent), e)
            return None

    def create_mode(self, parent, mode, umask):
        dacl = self._default_acl(parent)
        if dacl is None:
            return mode & ~(umask & 0o777)
        return _acl_create_masq(dacl, mode)[1]

    def _inherit(self, fd: int, st: os.stat_result, mode: int, parent: Inode) -> None:
        if not can_hold_xattr(st.st_mode) or stat.S_ISLNK(mode):
            return  # FIFOs and sockets carry no ACLs in xattr mode; symlinks none anywhere
        dacl = self._default_acl(parent)
        if dacl is None:
            return
        access, _, not_equiv = _acl_create_masq(dacl, mode)
        path = proc_fd(fd)
        if stat.S_ISDIR(mode):
            os.setxattr(path, _ESC_ACL_DEFAULT, _acl_pack(dacl))
        if not_equiv:
            os.setxattr(path, _ESC_ACL_ACCESS, _acl_pack(access))

    def stamp(self, fd, st, du, dg, mode, rdev, parent=None):
        if st.st_mode & _SPECIAL and not stat.S_ISLNK(st.st_mode):
            # A directory made in a backing directory that is setgid (a tree
            # not made through the mount) inherits the bit: not on our side.
            os.chmod(proc_fd(fd), st.st_mode & 0o777)
        if parent is not None:
            self._inherit(fd, st, mode, parent)
        rec = _record.Record(du, dg, mode, rdev if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else 0)
        self.store.write(fd, st, _record.encode(rec))
        return rec

    def xattr_stored(self, node, name, value):
        if name != _ACL_ACCESS_NAME:
            return False
        try:
            entries = _acl_parse(value)
        except ValueError:
            return False
        bits, equiv = _acl_equiv_mode(entries)
        st = os.fstat(node.fd)
        cur = self._current(node, st)
        changed = cur.mode & 0o777 != bits
        if changed:
            self._set_mode(node, st, cur, (cur.mode & ~0o777) | bits)
        if equiv:  # the mode says it all: keep no ACL, as the kernel does
            try:
                os.removexattr(proc_fd(node.fd), _ESC_ACL_ACCESS)
            except OSError:
                pass
            node.xnames = None
        return changed

    def _sync_acl_to_mode(self, node: Inode, st: os.stat_result, mode: int) -> None:
        if not can_hold_xattr(st.st_mode):
            return
        path = proc_fd(node.fd)
        try:
            raw = os.getxattr(path, _ESC_ACL_ACCESS)
        except OSError:
            return
        try:
            os.setxattr(path, _ESC_ACL_ACCESS, _acl_pack(_acl_chmod(_acl_parse(raw), mode)))
        except ValueError as e:
            log.warning("leaving the malformed access ACL of %s alone: %s", self.describe(node), e)

    def adopted(self, node, cached):
        node.record = cached

    def _current(self, node: Inode, st: os.stat_result) -> _record.Record:
        """What the view shows now, with disk ids (what a new record starts from)."""
        rec = self._record(node, st)
        if rec is not None:
            return rec
        if self.default_owner is not None:
            du, dg = self.disk_ids(*self.default_owner)
        else:
            du, dg = st.st_uid, st.st_gid
        dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        return _record.Record(du, dg, st.st_mode, st.st_rdev if dev else 0)

    def change(self, node, st, uid, gid, mode):
        cur = self._current(node, st)
        # Unchanged ids stay as stored: an id the table cannot map back (shown
        # as the overflow id) survives a chmod.
        du, dg = self.disk_ids(uid, gid)
        du = cur.uid if uid is None else du
        dg = cur.gid if gid is None else dg
        new_mode = cur.mode if mode is None else (stat.S_IFMT(cur.mode) | (mode & 0o7777))
        self._set_mode(node, st, _record.Record(du, dg, cur.mode, cur.rdev), new_mode)
        if mode is not None:
            self._sync_acl_to_mode(node, st, new_mode)

    def _set_mode(self, node: Inode, st: os.stat_result, cur: _record.Record, new_mode: int) -> None:
        """Write the record ``cur`` with ``new_mode``, and the backing permissions that go with it."""
        rec = _record.Record(cur.uid, cur.gid, new_mode, cur.rdev)
        self.store.write(node.fd, st, _record.encode(rec))
        node.record = rec
        if not stat.S_ISLNK(st.st_mode):
            want = self._backing_perm(new_mode if not stat.S_ISREG(st.st_mode) else (stat.S_IFREG | new_mode & 0o777))
            if st.st_mode & 0o7777 != want:
                try:
                    os.chmod(proc_fd(node.fd), want)
                except PermissionError:
                    pass  # not ours on the backing fs; the record is what counts

    def gone(self, node, st):
        # Records in xattrs go with the inode; rows of the side table do not.
        try:
            self.store.forget_inode(st)
        except (OSError, sqlite3.Error) as e:
            log.warning("cannot drop the side record of inode %d: %s", st.st_ino, e)

    def xattr_to_backing(self, name):
        return _record.escape_xattr_name(name)

    def xattr_to_view(self, backing):
        return _record.unescape_xattr_name(backing)
