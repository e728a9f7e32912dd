"""Offline tree tools: work on a backing tree's records without a mount.

A backing tree ("ROOT") in xattr mode keeps each inode's view owner, group,
mode and device number in a *record* (see :mod:`shiftfs.ownership.record`) and is
otherwise owned by one unprivileged user. These commands read and write such
trees directly:

``shiftfs export ROOT``
    Writes a tar (pax) or cpio (newc) archive whose entries carry the view
    metadata: owners, modes with setuid bits, device nodes for placeholder
    files, hard links, symlinks, mtimes with nanoseconds, and, in tar, the
    view xattrs as ``SCHILY.xattr.*`` records (plus GNU tar's
    ``SCHILY.acl.*`` text for ACLs). Records are never exported as xattrs.

``shiftfs import ARCHIVE ROOT``
    Unpacks a tar as an unprivileged user. Files belong to that user with
    owner-accessible modes; ownership, mode, type and device numbers go into
    records; devices become empty placeholder files; privileged xattrs are
    stored under escaped names. ``--oci-layer`` applies ``.wh.`` whiteouts.

``shiftfs stat PATH…`` and ``shiftfs ls [-l] DIR``
    Show view metadata from the records.

``shiftfs absorb ROOT`` and ``shiftfs materialize ROOT``
    Convert, as root, between a tree with real ownership and one with
    records. Both are ordered so that an interrupted run never leaves a file
    with neither its real ownership nor its record, and a rerun finishes the
    job (see :func:`absorb` and :func:`materialize`).

With ``--map``, disk ids (and record ids) are translated by an id table
exactly as the mount does.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import ArchiveError, TreeError
from ..ownership import acl
from ..ownership.idmap import IdMap, parse_map_args
from ..ownership.view import ViewRule
from .cpio import export_cpio
from .members import GnuTarInfo, Item, ns_to_pax, xattr_str
from .walk import COPY_CHUNK, Progress, find_root, has_store, open_beneath, open_root, open_store, view_at, walk

__all__ = ["export_tree", "Item", "ExportOptions", "scan", "open_data"]


def _archive_name(rel: str) -> str:
    return f"./{rel}" if rel else "."


@dataclass
class ExportOptions:
    devices: object = None  # shiftfs.offline.devtable.DeviceTable
    me: tuple[int, int] = (-1, -1)  # the exporting user's uid, gid
    #: what unrecorded files of ``me`` show as (None: the view rule's default owner decides)
    self_owner: tuple[int, int] | None = (0, 0)
    #: ``--default-owner``: what the view shows for files without a record, as ``-o default_owner=``
    default_owner: tuple[int, int] | None = None


def scan(
    root_fd: int,
    store,
    umap: IdMap,
    gmap: IdMap,
    errors: list[str],
    with_xattrs: bool,
    hardlinks: bool,
    opts: ExportOptions | None = None,
):
    """Yield an :class:`Item` for every inode of the tree, in walk order."""
    seen: dict[tuple[int, int], str] = {}
    rule = ViewRule.for_tree(root_fd, store, umap, gmap, opts.default_owner if opts is not None else None)
    self_owner = opts.self_owner if opts is not None and opts.default_owner is None else None

    def on_error(rel, exc):
        errors.append(f"{rel}: {exc.strerror or exc}")

    for e in walk(root_fd, on_error):
        st = e.st
        try:
            view = view_at(rule, store, e.fd, st, e.rel)
        except TreeError as exc:
            errors.append(str(exc))
            continue
        except OSError as exc:
            errors.append(f"{e.display}: cannot read its record: {exc.strerror}")
            continue
        if view.distrust and rule.trusts(st):
            errors.append(f"{e.display}: its record is not believed: {view.distrust} (or mount the tree once)")
        if (
            opts is not None
            and self_owner is not None
            and not view.has_record
            and not view.distrust
            and umap.identity
            and gmap.identity
        ):
            # No record: as in shiftfs run/exec, the invoking user is view root.
            if st.st_uid == opts.me[0]:
                view = view._replace(uid=self_owner[0])
            if st.st_gid == opts.me[1]:
                view = view._replace(gid=self_owner[1])
        name = _archive_name(e.vrel)
        key = (st.st_dev, st.st_ino)
        fmt = stat.S_IFMT(view.mode)
        kind = {
            stat.S_IFREG: "reg",
            stat.S_IFDIR: "dir",
            stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "sock",
            stat.S_IFCHR: "chr",
            stat.S_IFBLK: "blk",
        }[fmt]
        item = Item(name, e.rel, kind, view, st.st_mtime_ns, key=key, nlink=st.st_nlink)
        # Like GNU tar, only regular files become hard link entries: its
        # readers and GNU tar's own archives treat other types one by one.
        if kind == "reg" and st.st_nlink > 1 and hardlinks:
            first = seen.get(key)
            if first is not None:
                item.kind = "hardlink"
                item.linkname = first
                yield item
                continue
            seen[key] = name
        if kind == "reg":
            item.size = st.st_size
        elif kind == "symlink":
            try:
                item.linkname = os.readlink(e.name, dir_fd=e.dirfd)
            except OSError as exc:
                errors.append(f"{e.display}: cannot read the symlink: {exc.strerror}")
                continue
        if with_xattrs:
            try:
                item.xattrs = rule.xattrs(e.fd, view)
            except (OSError, ValueError) as exc:
                errors.append(f"{e.display}: cannot read its xattrs: {getattr(exc, 'strerror', None) or exc}")
        yield item


def open_data(root_fd: int, rel: str) -> int:
    return open_beneath(root_fd, rel, os.O_RDONLY)


class _FdReader(io.RawIOBase):
    def __init__(self, fd: int, progress: Progress):
        self.fd = fd
        self.progress = progress

    def readable(self):
        return True

    def readinto(self, b):
        n = os.readv(self.fd, [b])
        self.progress.advance(0, n)
        return n


def _tarinfo(item: Item) -> tarfile.TarInfo:
    ti = GnuTarInfo(item.name)
    # typeshed types pax_headers as a read-only Mapping; it is a dict we fill in
    pax: dict[str, str] = {}
    ti.pax_headers = pax
    v = item.view
    ti.uid, ti.gid = v.uid, v.gid
    ti.uname = ti.gname = ""
    ti.mode = stat.S_IMODE(v.mode)
    sec = item.mtime_ns // 1_000_000_000
    ti.mtime = sec
    if item.mtime_ns % 1_000_000_000 or item.mtime_ns < 0:
        pax["mtime"] = ns_to_pax(item.mtime_ns)
    if item.kind == "reg":
        ti.type = tarfile.REGTYPE
        ti.size = item.size
    elif item.kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif item.kind == "symlink":
        ti.type = tarfile.SYMTYPE
        ti.linkname = item.linkname
    elif item.kind == "hardlink":
        ti.type = tarfile.LNKTYPE
        ti.linkname = item.linkname
    elif item.kind == "fifo":
        ti.type = tarfile.FIFOTYPE
    elif item.kind in ("chr", "blk"):
        ti.type = tarfile.CHRTYPE if item.kind == "chr" else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(v.rdev), os.minor(v.rdev)
    for xname, value in item.xattrs.items():
        pax["SCHILY.xattr." + xname] = xattr_str(value)
        if xname in ("system.posix_acl_access", "system.posix_acl_default"):
            try:
                text = acl.to_text(value)
            except ValueError:
                continue
            key = "SCHILY.acl.access" if xname.endswith("access") else "SCHILY.acl.default"
            pax[key] = text
    return ti


def _export_tar(root_fd, store, out: BinaryIO, umap, gmap, progress, errors, opts=None) -> None:
    tf = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8")
    socks = 0
    devices = opts.devices if opts is not None else None
    try:
        for item in scan(root_fd, store, umap, gmap, errors, True, True, opts):
            if devices is not None and devices.covers(item.name):
                continue
            if item.kind == "sock":
                socks += 1
                progress.log(f"shiftfs export: {item.rel}: socket skipped (tar cannot store sockets)")
                continue
            ti = _tarinfo(item)
            if item.kind == "reg":
                try:
                    fd = open_data(root_fd, item.rel)
                except OSError as exc:
                    errors.append(f"{item.rel}: cannot open: {exc.strerror}")
                    continue
                try:
                    size = os.fstat(fd).st_size
                    if size != ti.size:
                        ti.size = size
                    tf.addfile(ti, io.BufferedReader(_FdReader(fd, progress), COPY_CHUNK))
                except OSError as exc:
                    raise ArchiveError(
                        f"{item.rel}: read failed mid-archive: {exc.strerror}; the archive is incomplete"
                    ) from None
                finally:
                    os.close(fd)
            else:
                tf.addfile(ti)
            progress.advance(1)
        if devices is not None:
            devices.add_to_tarfile(tf)
    finally:
        tf.close()


def export_tree(
    root: str,
    out: BinaryIO,
    fmt: str = "tar",
    maps: list[str] | None = None,
    progress=None,
    devices=None,
    self_owner: tuple[int, int] | None = None,
    default_owner: tuple[int, int] | None = None,
) -> list[str]:
    """Write an archive of the view of ``root`` to ``out``; returns per-path errors.

    ``devices`` (a :class:`shiftfs.offline.devtable.DeviceTable`) adds entries a user
    namespace could not create. ``self_owner`` is what a file without a
    record that the exporting user owns shows as (default 0:0: in
    ``shiftfs run``/``exec`` the invoking user is view root). ``default_owner``
    is what every file without a (believed) record shows as, as a mount with
    ``-o default_owner=`` shows it; given, it replaces ``self_owner``.
    """
    umap, gmap = parse_map_args(maps or [])
    root_fd = open_root(root)
    # Symlink records live in the side table at the top of the shifted tree,
    # which may be above ROOT.
    store_root = find_root(root) if not has_store(root_fd) else None
    store_fd = root_fd
    if store_root is not None and os.path.realpath(store_root) != os.path.realpath(root):
        try:
            store_fd = open_root(store_root)
            if os.fstat(store_fd).st_dev != os.fstat(root_fd).st_dev:
                os.close(store_fd)
                store_fd = root_fd
        except TreeError:
            store_fd = root_fd
    progress = progress or Progress("export", False)
    store_name = store_root if store_fd != root_fd and store_root is not None else root
    store = open_store(
        store_fd, False, readonly=True, name=store_name, say=lambda note: progress.log(f"shiftfs export: {note}")
    )
    opts = ExportOptions(
        devices, (os.getuid(), os.getgid()), self_owner if self_owner is not None else (0, 0), default_owner
    )
    errors: list[str] = []
    try:
        if fmt == "tar":
            _export_tar(root_fd, store, out, umap, gmap, progress, errors, opts)
        else:
            items = scan(root_fd, store, umap, gmap, errors, True, False, opts)
            export_cpio(items, root_fd, out, progress, opts)
    finally:
        store.close()
        if store_fd != root_fd:
            os.close(store_fd)
        os.close(root_fd)
    return errors


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------
