"""Offline tree tools: work on a backing tree's records without a mount.

A backing tree ("ROOT") in xattr mode keeps each inode's view owner, group,
mode and device number in a *record* (see :mod:`shiftfs.record`) and is
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

import errno
import dataclasses
import gzip
import io
import lzma
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from . import record as _record
from . import tree as _tree
from .idmap import IdMap, IdMapError, parse_map_args
from .record import Record, RecordError
from .syscalls import fchown_fd, proc_fd, utimens_fd
from .tree import STORE_DIR, TreeError

__all__ = [
    "register",
    "export_tree",
    "import_archive",
    "absorb",
    "materialize",
    "ArchiveError",
    "UsageError",
]

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_PATH_FLAGS = _PATH_FLAGS | os.O_DIRECTORY
_TMP_PREFIX = ".shiftfs-tmp."
_COPY_CHUNK = 1 << 20


class ArchiveError(Exception):
    """A failure that stops a command; the message names the path and the fix."""


class UsageError(ArchiveError):
    """A bad command line; exit status 2."""


def _open_store(root_fd: int, create: bool, legacy: bool = False, readonly: bool = False):
    from .store import RecordStore

    if readonly:
        return RecordStore.open(root_fd, False, readonly=True)
    if legacy:
        return RecordStore.open(root_fd, create, write_legacy=True)
    return RecordStore.open(root_fd, create)


def _crash_point(what: str) -> None:
    """Test hook: ``SHIFTFS_TEST_KILL=absorb:N`` kills us at the N-th step."""
    spec = os.environ.get("SHIFTFS_TEST_KILL")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != what:
        return
    _crash_counts[what] = _crash_counts.get(what, 0) + 1
    if _crash_counts[what] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: dict[str, int] = {}


def _ns_to_pax(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), 1_000_000_000)
    if not frac:
        return f"{sign}{sec}"
    return f"{sign}{sec}.{frac:09d}".rstrip("0")


def _pax_to_ns(text: str) -> int | None:
    text = text.strip()
    neg = text.startswith("-")
    body = text[1:] if neg else text
    sec, _, frac = body.partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        return None
    ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
    return -ns if neg else ns


def _xattr_str(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _xattr_bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _open_beneath(root_fd: int, rel: str, flags: int = _PATH_FLAGS) -> int:
    """Open ``rel`` below ``root_fd`` without following any symlink."""
    parts = [p for p in rel.split("/") if p]
    if not parts:
        return os.open(".", flags | os.O_DIRECTORY, dir_fd=root_fd)
    cur = root_fd
    opened = []
    try:
        for p in parts[:-1]:
            cur = os.open(p, _DIR_PATH_FLAGS, dir_fd=cur)
            opened.append(cur)
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
    finally:
        for fd in opened:
            os.close(fd)


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------


@dataclass
class _Item:
    """One archive entry worked out from the tree."""

    name: str  # archive name ("." for the root, "./etc/passwd" for others)
    rel: str
    kind: str  # reg, dir, symlink, fifo, sock, chr, blk, hardlink
    view: _tree.View
    mtime_ns: int
    size: int = 0
    linkname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    key: tuple[int, int] = (0, 0)
    nlink: int = 1


def _archive_name(rel: str) -> str:
    return f"./{rel}" if rel else "."


@dataclass
class _ExportOptions:
    devices: object = None  # shiftfs.devtable.DeviceTable
    me: tuple[int, int] = (-1, -1)  # the exporting user's uid, gid
    self_owner: tuple[int, int] = (0, 0)  # what unrecorded files of ``me`` show as


def _scan(
    root_fd: int, store, umap: IdMap, gmap: IdMap, errors: list[str], with_xattrs: bool, hardlinks: bool,
    opts: "_ExportOptions | None" = None,
):
    """Yield an :class:`_Item` for every inode of the tree, in walk order."""
    seen: dict[tuple[int, int], str] = {}

    def on_error(rel, exc):
        errors.append(f"{rel}: {exc.strerror or exc}")

    for e in _tree.walk(root_fd, on_error):
        st = e.st
        try:
            view = _tree.view_of(store, e.fd, st, umap, gmap, e.rel)
        except TreeError as exc:
            errors.append(str(exc))
            continue
        except OSError as exc:
            errors.append(f"{e.display}: cannot read its record: {exc.strerror}")
            continue
        if opts is not None and not view.has_record and umap.identity and gmap.identity:
            # No record: as in shiftfs run/exec, the invoking user is view root.
            if st.st_uid == opts.me[0]:
                view = dataclasses.replace(view, uid=opts.self_owner[0])
            if st.st_gid == opts.me[1]:
                view = dataclasses.replace(view, gid=opts.self_owner[1])
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
        item = _Item(name, e.rel, kind, view, st.st_mtime_ns, key=key, nlink=st.st_nlink)
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
                item.xattrs = _tree.view_xattrs(e.fd, view.has_record, umap, gmap)
            except (OSError, ValueError) as exc:
                errors.append(f"{e.display}: cannot read its xattrs: {getattr(exc, 'strerror', None) or exc}")
        yield item


def _open_data(root_fd: int, rel: str) -> int:
    return _open_beneath(root_fd, rel, os.O_RDONLY)


class _FdReader(io.RawIOBase):
    def __init__(self, fd: int, progress: _tree.Progress):
        self.fd = fd
        self.progress = progress

    def readable(self):
        return True

    def readinto(self, b):
        n = os.readv(self.fd, [b])
        self.progress.advance(0, n)
        return n


class _TarInfo(tarfile.TarInfo):
    """A TarInfo that lays out pax headers the way GNU tar does.

    Two differences from the stdlib: names and link targets that fit the
    ustar fields are stored there as raw bytes, even when not ASCII (the
    stdlib moves them to pax ``path`` records, which bsdtar then refuses to
    convert outside a UTF-8 locale); and pax values are raw bytes with no
    ``hdrcharset=BINARY`` marker (GNU tar 1.34 warns about that keyword on
    every entry that has a binary xattr).
    """

    _RAW = ("utf-8", "surrogateescape")

    def create_pax_header(self, info, encoding):
        info["magic"] = tarfile.POSIX_MAGIC
        pax = dict(self.pax_headers)
        for fieldname, keyword, limit in (
            ("name", "path", tarfile.LENGTH_NAME),
            ("linkname", "linkpath", tarfile.LENGTH_LINK),
            ("uname", "uname", 32),
            ("gname", "gname", 32),
        ):
            if len(info[fieldname].encode(*self._RAW)) > limit and keyword not in pax:
                pax[keyword] = info[fieldname]
        for fieldname, digits in (("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12)):
            value = info[fieldname]
            if not 0 <= value < 8 ** (digits - 1):
                pax.setdefault(fieldname, str(value))
                info[fieldname] = 0
        head = self._create_pax_generic_header(pax, tarfile.XHDTYPE, encoding) if pax else b""
        return head + self._create_header(info, tarfile.USTAR_FORMAT, *self._RAW)

    @classmethod
    def _create_pax_generic_header(cls, pax_headers, type, encoding):
        records = bytearray()
        for keyword, value in pax_headers.items():
            body = b" " + keyword.encode("utf-8") + b"=" + value.encode("utf-8", "surrogateescape") + b"\n"
            # The record starts with its own total length in decimal.
            length = len(body) + 1
            while len(str(length)) + len(body) != length:
                length = len(str(length)) + len(body)
            records += str(length).encode("ascii") + body
        info = {"name": "././@PaxHeader", "type": type, "size": len(records), "magic": tarfile.POSIX_MAGIC}
        return cls._create_header(info, tarfile.USTAR_FORMAT, "ascii", "replace") + cls._create_payload(bytes(records))


def _tarinfo(item: _Item) -> tarfile.TarInfo:
    ti = _TarInfo(item.name)
    v = item.view
    ti.uid, ti.gid = v.uid, v.gid
    ti.uname = ti.gname = ""
    ti.mode = stat.S_IMODE(v.mode)
    sec = item.mtime_ns // 1_000_000_000
    ti.mtime = sec
    if item.mtime_ns % 1_000_000_000 or item.mtime_ns < 0:
        ti.pax_headers["mtime"] = _ns_to_pax(item.mtime_ns)
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
        ti.pax_headers["SCHILY.xattr." + xname] = _xattr_str(value)
        if xname in ("system.posix_acl_access", "system.posix_acl_default"):
            try:
                text = _tree.acl_to_text(value)
            except ValueError:
                continue
            key = "SCHILY.acl.access" if xname.endswith("access") else "SCHILY.acl.default"
            ti.pax_headers[key] = text
    return ti


def _export_tar(root_fd, store, out: BinaryIO, umap, gmap, progress, errors, opts=None) -> None:
    tf = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8")
    socks = 0
    devices = opts.devices if opts is not None else None
    try:
        for item in _scan(root_fd, store, umap, gmap, errors, True, True, opts):
            if devices is not None and devices.covers(item.name):
                continue
            if item.kind == "sock":
                socks += 1
                progress.log(f"shiftfs export: {item.rel}: socket skipped (tar cannot store sockets)")
                continue
            ti = _tarinfo(item)
            if item.kind == "reg":
                try:
                    fd = _open_data(root_fd, item.rel)
                except OSError as exc:
                    errors.append(f"{item.rel}: cannot open: {exc.strerror}")
                    continue
                try:
                    size = os.fstat(fd).st_size
                    if size != ti.size:
                        ti.size = size
                    tf.addfile(ti, io.BufferedReader(_FdReader(fd, progress), _COPY_CHUNK))
                except OSError as exc:
                    raise ArchiveError(f"{item.rel}: read failed mid-archive: {exc.strerror}; the archive is incomplete")
                finally:
                    os.close(fd)
            else:
                tf.addfile(ti)
            progress.advance(1)
        if devices is not None:
            devices.add_to_tarfile(tf)
    finally:
        tf.close()


class _CpioWriter:
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


def _export_cpio(root_fd, store, out: BinaryIO, umap, gmap, progress, errors, opts=None) -> None:
    devices = opts.devices if opts is not None else None
    items = [
        i for i in _scan(root_fd, store, umap, gmap, errors, True, False, opts)
        if devices is None or not devices.covers(i.name)
    ]
    # Hard links: every name carries the inode; newc stores the data with
    # the last name only (what GNU cpio and bsdtar write and expect).
    groups: dict[tuple[int, int], list[_Item]] = {}
    for item in items:
        if item.kind != "dir":
            groups.setdefault(item.key, []).append(item)
    inos: dict[tuple[int, int], int] = {}
    w = _CpioWriter(out)
    lost_xattrs = [i.rel or "." for i in items if i.xattrs]
    for item in items:
        v = item.view
        ino = inos.setdefault(item.key, len(inos) + 1)
        members = groups.get(item.key, [item])
        nlink = len(members) if item.kind != "dir" else max(item.nlink, 2)
        if item.rel == "" and item.kind == "dir":
            nlink = max(2, item.nlink - (1 if _has_store(root_fd) else 0))
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
                fd = _open_data(root_fd, item.rel)
            except OSError as exc:
                raise ArchiveError(f"{item.rel}: cannot open: {exc.strerror}; the archive is incomplete")
            try:
                left = size
                while left:
                    chunk = os.read(fd, min(_COPY_CHUNK, left))
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


def _has_store(root_fd: int) -> bool:
    try:
        os.stat(STORE_DIR, dir_fd=root_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


def export_tree(
    root: str,
    out: BinaryIO,
    fmt: str = "tar",
    maps: list[str] | None = None,
    progress=None,
    devices=None,
    self_owner: tuple[int, int] | None = None,
) -> list[str]:
    """Write an archive of the view of ``root`` to ``out``; returns per-path errors.

    ``devices`` (a :class:`shiftfs.devtable.DeviceTable`) adds entries a user
    namespace could not create. ``self_owner`` is what a file without a
    record that the exporting user owns shows as (default 0:0: in
    ``shiftfs run``/``exec`` the invoking user is view root).
    """
    umap, gmap = parse_map_args(maps or [])
    root_fd = _tree.open_root(root)
    # Symlink records live in the side table at the top of the shifted tree,
    # which may be above ROOT.
    store_root = _find_root(root) if not _has_store(root_fd) else None
    store_fd = root_fd
    if store_root is not None and os.path.realpath(store_root) != os.path.realpath(root):
        try:
            store_fd = _tree.open_root(store_root)
            if os.fstat(store_fd).st_dev != os.fstat(root_fd).st_dev:
                os.close(store_fd)
                store_fd = root_fd
        except TreeError:
            store_fd = root_fd
    store = _open_store(store_fd, False, readonly=True)
    opts = _ExportOptions(devices, (os.getuid(), os.getgid()), self_owner if self_owner is not None else (0, 0))
    errors: list[str] = []
    progress = progress or _tree.Progress("export", False)
    try:
        if fmt == "tar":
            _export_tar(root_fd, store, out, umap, gmap, progress, errors, opts)
        else:
            _export_cpio(root_fd, store, out, umap, gmap, progress, errors, opts)
    finally:
        store.close()
        if store_fd != root_fd:
            os.close(store_fd)
        os.close(root_fd)
    return errors


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _open_archive_stream(path: str) -> tuple[BinaryIO, subprocess.Popen | None]:
    """A readable stream of the tar inside ``path`` (``-`` is stdin)."""
    if path == "-":
        raw = sys.stdin.buffer
    else:
        try:
            raw = open(path, "rb")
        except FileNotFoundError:
            raise UsageError(f"{path}: no such archive; give an existing tar file (or - for stdin)") from None
        except IsADirectoryError:
            raise UsageError(f"{path}: is a directory; give a tar file") from None
        except PermissionError:
            raise ArchiveError(f"{path}: permission denied; make the archive readable") from None
    buf = io.BufferedReader(raw, 1 << 16) if not isinstance(raw, io.BufferedReader) else raw
    head = buf.peek(6)[:6]
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=buf, mode="rb"), None
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(buf, "rb"), None
    if head.startswith(b"BZh"):
        import bz2

        return bz2.BZ2File(buf, "rb"), None
    if head.startswith(_ZSTD_MAGIC):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            zstd = shutil.which("zstd")
            if zstd is None:
                raise ArchiveError(
                    f"{path}: zstd-compressed; install the zstandard Python package or the zstd tool, "
                    "or decompress it first"
                ) from None
            # Our buffer already holds the first bytes: feed zstd from it.
            proc = subprocess.Popen([zstd, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

            def feed() -> None:
                try:
                    shutil.copyfileobj(buf, proc.stdin, _COPY_CHUNK)
                except (BrokenPipeError, OSError, ValueError):
                    pass
                finally:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass

            threading.Thread(target=feed, daemon=True).start()
            return proc.stdout, proc
        return zstandard.ZstdDecompressor().stream_reader(buf, read_across_frames=True), None
    return buf, None


def _normalize(name: str, what: str = "entry") -> list[str]:
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise ArchiveError(f"{what} {name!r} contains '..'; refusing to write outside ROOT")
        parts.append(p)
    return parts


_IMPLIED_DIR = Record(0, 0, stat.S_IFDIR | 0o755)


class _Importer:
    def __init__(self, root_fd: int, store, oci: bool, progress: _tree.Progress):
        self.root_fd = root_fd
        self.store = store
        self.oci = oci
        self.progress = progress
        self.errors: list[str] = []
        self.created: set[str] = set()
        self.dir_times: list[tuple[str, int | None, int]] = []
        self._dir_cache: dict[str, int] = {}
        self.dropped_xattrs: list[str] = []
        self.root_recorded = False

    # -- directory descriptors ------------------------------------------------
    def close(self) -> None:
        self._flush_cache()

    def _flush_cache(self) -> None:
        for fd in self._dir_cache.values():
            os.close(fd)
        self._dir_cache.clear()

    def _dir(self, parts: list[str]) -> int:
        """A descriptor of the directory ``parts``, creating missing ones."""
        rel = "/".join(parts)
        fd = self._dir_cache.get(rel)
        if fd is not None:
            return fd
        if not parts:
            fd = os.open(".", _DIR_PATH_FLAGS, dir_fd=self.root_fd)
        else:
            parent = self._dir(parts[:-1])
            name = parts[-1]
            try:
                fd = os.open(name, _DIR_PATH_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                self._mkdir(parent, name, rel, _IMPLIED_DIR)
                fd = os.open(name, _DIR_PATH_FLAGS, dir_fd=parent)
            except (NotADirectoryError, OSError) as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise ArchiveError(
                        f"{rel}: is not a directory in ROOT (a symlink or file); refusing to follow it"
                    ) from None
                raise
        self._dir_cache[rel] = fd
        return fd

    def _mkdir(self, parent: int, name: str, rel: str, rec: Record) -> None:
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_PATH_FLAGS, dir_fd=parent)
        try:
            self._stamp(fd, rec, rel)
        finally:
            os.close(fd)
        self.created.add(rel)

    def _stamp(self, fd: int, rec: Record, rel: str) -> None:
        """Write the record, then the backing mode."""
        st = os.stat(fd)
        self.store.write(fd, st, _record.encode(rec))
        if not stat.S_ISLNK(st.st_mode):
            want = _tree.backing_mode(rec.mode)
            if stat.S_IMODE(st.st_mode) != want:
                os.chmod(proc_fd(fd), want)

    # -- removal ----------------------------------------------------------------
    def _remove(self, parent: int, name: str) -> None:
        """Remove ``name`` (recursively) and its side-table records.

        Cached descriptors of removed directories go stale: callers flush the
        cache afterwards (never in here, where ``parent`` may be cached).
        """
        fd = os.open(name, _PATH_FLAGS, dir_fd=parent)
        try:
            st = os.stat(fd)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                try:
                    for child in os.listdir(sub):
                        self._remove(sub, child)
                finally:
                    os.close(sub)
            elif st.st_nlink == 1 and not (stat.S_ISREG(st.st_mode)):
                self.store.remove(fd, st)
        finally:
            os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)

    # -- entries ----------------------------------------------------------------
    def entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        if len(self._dir_cache) > 256:
            self._flush_cache()
        parts = _normalize(ti.name)
        rel = "/".join(parts)
        if parts and parts[0] == STORE_DIR:
            self.progress.log(f"shiftfs import: {ti.name}: skipped; {STORE_DIR} at the top is reserved for records")
            return
        base = parts[-1] if parts else ""
        if self.oci and base.startswith(".wh."):
            self._whiteout(parts)
            return
        if not parts:
            if not ti.isdir():
                raise ArchiveError(f"{ti.name!r}: the root entry is not a directory; the archive is malformed")
            self._apply_root(ti)
            return
        try:
            parent = self._dir(parts[:-1])
        except ArchiveError as exc:
            raise ArchiveError(f"{ti.name}: {exc}") from None
        name = parts[-1]
        # Replace what is there, except a directory by a directory.
        try:
            old = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        if old is not None and not (ti.isdir() and stat.S_ISDIR(old.st_mode)):
            self._remove(parent, name)
            self._flush_cache()
            parent = self._dir(parts[:-1])

        rec = self._record_of(ti)
        if ti.islnk():
            self._hardlink(ti, parent, name, rel)
        elif ti.isdir():
            if old is None:
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _DIR_PATH_FLAGS, dir_fd=parent)
            try:
                self._stamp(fd, rec, rel)
                self._xattrs(fd, ti, rel, True)
            finally:
                os.close(fd)
            self.dir_times.append((rel, None, _mtime_ns(ti)))
        elif ti.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
            try:
                src = tf.extractfile(ti)
                left = ti.size
                while left > 0:
                    chunk = src.read(min(_COPY_CHUNK, left))
                    if not chunk:
                        raise ArchiveError(f"{ti.name}: archive ends inside the file; it is truncated")
                    os.write(fd, chunk)
                    left -= len(chunk)
                    self.progress.advance(0, len(chunk))
                self._xattrs(fd, ti, rel, True)
                self._stamp(fd, rec, rel)
                os.utime(fd, ns=(time.time_ns(), _mtime_ns(ti)))
            except BaseException:
                # a damaged or truncated member leaves no half-written file behind
                try:
                    os.unlink(name, dir_fd=parent)
                except OSError:
                    pass
                raise
            finally:
                os.close(fd)
        elif ti.issym():
            os.symlink(ti.linkname, name, dir_fd=parent)
            self._finish_special(parent, name, rec, ti, rel)
        elif ti.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
            self._finish_special(parent, name, rec, ti, rel)
        elif ti.ischr() or ti.isblk():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
            try:
                self._xattrs(fd, ti, rel, True)
                self._stamp(fd, rec, rel)
                os.utime(fd, ns=(time.time_ns(), _mtime_ns(ti)))
            finally:
                os.close(fd)
        else:
            self.errors.append(f"{ti.name}: unsupported tar entry type {ti.type!r}; skipped")
            return
        self.created.add(rel)

    def _record_of(self, ti: tarfile.TarInfo) -> Record:
        ftype = {
            tarfile.DIRTYPE: stat.S_IFDIR,
            tarfile.SYMTYPE: stat.S_IFLNK,
            tarfile.FIFOTYPE: stat.S_IFIFO,
            tarfile.CHRTYPE: stat.S_IFCHR,
            tarfile.BLKTYPE: stat.S_IFBLK,
        }.get(ti.type, stat.S_IFREG)
        rdev = os.makedev(ti.devmajor, ti.devminor) if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0
        for what, value in (("uid", ti.uid), ("gid", ti.gid)):
            if not 0 <= value <= _record.MAX_ID:
                raise ArchiveError(f"{ti.name}: {what} {value} is not a valid id; the archive is malformed")
        return Record(ti.uid, ti.gid, ftype | (ti.mode & 0o7777), rdev)

    def _apply_root(self, ti: tarfile.TarInfo) -> None:
        fd = os.open(".", _DIR_PATH_FLAGS, dir_fd=self.root_fd)
        try:
            st = os.stat(fd)
            self.store.write(fd, st, _record.encode(self._record_of(ti)))
            self._xattrs(fd, ti, ".", True)
        finally:
            os.close(fd)
        self.root_recorded = True
        self.dir_times.append(("", None, _mtime_ns(ti)))

    def _finish_special(self, parent: int, name: str, rec: Record, ti, rel: str) -> None:
        fd = os.open(name, _PATH_FLAGS, dir_fd=parent)
        try:
            self._stamp(fd, rec, rel)
            if _xattrs_of(ti):
                self.dropped_xattrs.append(rel)
            utimens_fd(fd, None, _mtime_ns(ti))
        finally:
            os.close(fd)

    def _hardlink(self, ti, parent: int, name: str, rel: str) -> None:
        tparts = _normalize(ti.linkname, "hard link target")
        if not tparts:
            raise ArchiveError(f"{ti.name}: hard link to the root; the archive is malformed")
        tparent = self._dir(tparts[:-1])
        try:
            os.link(tparts[-1], name, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise ArchiveError(
                f"{ti.name}: hard link target {ti.linkname!r} is not in ROOT; the archive must list it first"
            ) from None

    def _xattrs(self, fd: int, ti, rel: str, can_hold: bool) -> None:
        xattrs = _xattrs_of(ti, self._lookup_user, self._lookup_group, self.errors, rel)
        if not xattrs:
            return
        path = proc_fd(fd)
        for name, value in xattrs.items():
            backing = _record.escape_xattr_name(name)
            try:
                os.setxattr(path, backing, value)
            except OSError as exc:
                self.errors.append(f"{rel}: xattr {name} not stored: {exc.strerror}")

    # The view's user database, for ACL text that names users without ids.
    def _lookup(self, dbname: str, name: str) -> int | None:
        try:
            fd = _open_beneath(self.root_fd, f"etc/{dbname}", os.O_RDONLY)
        except OSError:
            return None
        with os.fdopen(fd, "r", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
                    return int(fields[2])
        return None

    def _lookup_user(self, name: str) -> int | None:
        return self._lookup("passwd", name)

    def _lookup_group(self, name: str) -> int | None:
        return self._lookup("group", name)

    def _whiteout(self, parts: list[str]) -> None:
        base = parts[-1]
        dparts = parts[:-1]
        drel = "/".join(dparts)
        try:  # a whiteout in a directory that is not there has nothing to hide
            os.close(_open_beneath(self.root_fd, drel, _DIR_PATH_FLAGS))
        except OSError:
            return
        parent = self._dir(dparts)
        if base == ".wh..wh..opq":
            sub = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
            try:
                names = os.listdir(sub)
            finally:
                os.close(sub)
            for n in names:
                crel = f"{drel}/{n}" if drel else n
                if crel in self.created or (not drel and n == STORE_DIR):
                    continue
                self._remove(parent, n)
                self._flush_cache()
                parent = self._dir(dparts)
            return
        target = base[len(".wh.") :]
        trel = f"{drel}/{target}" if drel else target
        if not target or trel in self.created or (not drel and target == STORE_DIR):
            return
        try:
            self._remove(parent, target)
        except FileNotFoundError:
            pass
        self._flush_cache()

    def finish(self) -> None:
        self._flush_cache()
        if not self.root_recorded:
            fd = os.open(".", _DIR_PATH_FLAGS, dir_fd=self.root_fd)
            try:
                st = os.stat(fd)
                if self.store.read(fd, st) is None:
                    self.store.write(fd, st, _record.encode(_IMPLIED_DIR))
            finally:
                os.close(fd)
        # Directory times last, deepest first, once nothing changes inside.
        for rel, atime, mtime in sorted(self.dir_times, key=lambda t: -t[0].count("/") - (1 if t[0] else 0)):
            try:
                fd = _open_beneath(self.root_fd, rel, _DIR_PATH_FLAGS)
            except OSError:
                continue
            try:
                utimens_fd(fd, atime, mtime)
            finally:
                os.close(fd)


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    text = ti.pax_headers.get("mtime")
    if text is not None:
        ns = _pax_to_ns(text)
        if ns is not None:
            return ns
    return int(round(ti.mtime * 1_000_000_000)) if isinstance(ti.mtime, float) else int(ti.mtime) * 1_000_000_000


def _xattrs_of(ti, lookup_user=None, lookup_group=None, errors=None, rel="") -> dict[str, bytes]:
    """The xattrs a tar entry carries (GNU tar, bsdtar and star spellings)."""
    import base64
    import urllib.parse

    out: dict[str, bytes] = {}
    hdrs = ti.pax_headers
    for key, value in hdrs.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr.") :]] = _xattr_bytes(value)
    for key, value in hdrs.items():
        if key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            if name not in out:
                try:
                    out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
                except ValueError:
                    if errors is not None:
                        errors.append(f"{rel}: xattr {name} has bad base64 in the archive; skipped")
    if "RHT.security.selinux" in hdrs and "security.selinux" not in out:
        out["security.selinux"] = _xattr_bytes(hdrs["RHT.security.selinux"]) + b"\0"
    for key, xname in (("SCHILY.acl.access", "system.posix_acl_access"), ("SCHILY.acl.default", "system.posix_acl_default")):
        if key in hdrs and xname not in out and hdrs[key].strip():
            try:
                out[xname] = _tree.acl_from_text(
                    hdrs[key], lookup_user or (lambda n: None), lookup_group or (lambda n: None)
                )
            except ValueError as exc:
                if errors is not None:
                    errors.append(f"{rel}: {key} not stored: {exc}")
    return out


def import_archive(
    archive: str, root: str, oci_layer: bool = False, progress=None, legacy_xattr: bool = False
) -> list[str]:
    """Unpack ``archive`` into ``root`` as records; returns per-path errors."""
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise UsageError(f"{root}: its parent directory does not exist; create it first") from None
    root_fd = _tree.open_root(root)
    store = _open_store(root_fd, True, legacy_xattr)
    progress = progress or _tree.Progress("import", False)
    stream, proc = _open_archive_stream(archive)
    imp = _Importer(root_fd, store, oci_layer, progress)
    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape")
        except tarfile.ReadError as exc:
            raise ArchiveError(f"{archive}: not a tar archive ({exc}); give a tar, tar.gz, tar.xz or tar.zst file")
        try:
            for ti in tf:
                try:
                    imp.entry(tf, ti)
                except ArchiveError as exc:
                    imp.errors.append(str(exc))
                except OSError as exc:
                    imp.errors.append(f"{ti.name}: {exc.strerror or exc}")
                progress.advance(1)
        except tarfile.ReadError as exc:
            raise ArchiveError(f"{archive}: the archive is damaged ({exc}); nothing after it was imported")
        except EOFError:
            raise ArchiveError(f"{archive}: the archive ends early; it is truncated")
        imp.finish()
    finally:
        imp.close()
        store.close()
        os.close(root_fd)
        if proc is not None:
            proc.stdout.close()
            proc.wait()
    if imp.dropped_xattrs:
        imp.errors.append(
            f"{imp.dropped_xattrs[0]}: xattrs dropped on {len(imp.dropped_xattrs)} symlinks/FIFOs "
            "(they cannot carry user xattrs)"
        )
    return imp.errors


# ---------------------------------------------------------------------------
# stat and ls
# ---------------------------------------------------------------------------

_TYPE_NAMES = {
    stat.S_IFREG: "regular file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character special file",
    stat.S_IFBLK: "block special file",
}


def _find_root(path: str) -> str:
    """The nearest ancestor holding a record side table (else the parent)."""
    cur = os.path.abspath(path)
    start = os.path.dirname(cur) if not os.path.isdir(cur) or os.path.islink(cur) else cur
    d = start
    while True:
        if os.path.isdir(os.path.join(d, STORE_DIR)):
            return d
        up = os.path.dirname(d)
        if up == d:
            return start
        d = up


def _fmt_time(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)) + f".{frac:09d}"


def _stat_one(path: str, root: str | None, umap, gmap) -> str:
    root = root or _find_root(path)
    root_fd = _tree.open_root(root)
    store = _open_store(root_fd, False, readonly=True)
    try:
        try:
            fd = os.open(path, _PATH_FLAGS)
        except FileNotFoundError:
            raise ArchiveError(f"{path}: no such file; give a path inside a backing tree") from None
        except OSError as exc:
            raise ArchiveError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            st = os.stat(fd)
            raw = store.read(fd, st)
            view = _tree.view_of(store, fd, st, umap, gmap, path)
            xattrs = _tree.view_xattrs(fd, view.has_record, umap, gmap) if not stat.S_ISLNK(st.st_mode) else {}
        finally:
            os.close(fd)
    finally:
        store.close()
        os.close(root_fd)
    ftype = stat.S_IFMT(view.mode)
    lines = [f"  File: {path}" + (f" -> {os.readlink(path)}" if ftype == stat.S_IFLNK else "")]
    size = 0 if view.placeholder else st.st_size
    lines.append(f"  Size: {size:<12} Links: {st.st_nlink:<6} Type: {_TYPE_NAMES[ftype]}")
    lines.append(f"Access: ({stat.S_IMODE(view.mode):04o}/{stat.filemode(view.mode)})  Uid: {view.uid:<8} Gid: {view.gid}")
    if ftype in (stat.S_IFCHR, stat.S_IFBLK):
        lines.append(f"Device: {os.major(view.rdev)},{os.minor(view.rdev)}")
    lines.append(f"Modify: {_fmt_time(st.st_mtime_ns)}")
    if raw is not None:
        lines.append(f"Record: {raw.decode('ascii', 'replace')}")
    else:
        lines.append("Record: none (view = backing ids" + (" through --map)" if not umap.identity or not gmap.identity else ")"))
    lines.append(
        f"Backing: {st.st_uid}:{st.st_gid} ({stat.S_IMODE(st.st_mode):04o}/{stat.filemode(st.st_mode)})"
        + (" placeholder" if view.placeholder else "")
    )
    if xattrs:
        lines.append("Xattrs: " + ", ".join(xattrs))
    return "\n".join(lines)


def _ls(directory: str, long: bool, umap, gmap, out) -> list[str]:
    errors: list[str] = []
    root = _find_root(directory)
    root_fd = _tree.open_root(root)
    dir_fd = _tree.open_root(directory)
    store = _open_store(root_fd, False, readonly=True)
    is_root = os.path.samestat(os.fstat(root_fd), os.fstat(dir_fd))
    try:
        names = sorted(os.listdir(dir_fd), key=os.fsencode)
        for name in names:
            if is_root and name == STORE_DIR:
                continue
            if not long:
                print(name, file=out)
                continue
            try:
                fd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                errors.append(f"{directory}/{name}: {exc.strerror}")
                continue
            try:
                st = os.stat(fd)
                view = _tree.view_of(store, fd, st, umap, gmap, f"{directory}/{name}")
            except (TreeError, OSError) as exc:
                errors.append(str(exc))
                continue
            finally:
                os.close(fd)
            if stat.S_ISCHR(view.mode) or stat.S_ISBLK(view.mode):
                size = f"{os.major(view.rdev)}, {os.minor(view.rdev)}"
            else:
                size = str(st.st_size)
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime))
            line = f"{stat.filemode(view.mode)} {st.st_nlink:>3} {view.uid:>6} {view.gid:>6} {size:>10} {when} {name}"
            if stat.S_ISLNK(view.mode):
                line += " -> " + os.readlink(name, dir_fd=dir_fd)
            print(line, file=out)
    finally:
        store.close()
        os.close(dir_fd)
        os.close(root_fd)
    return errors


# ---------------------------------------------------------------------------
# absorb and materialize
# ---------------------------------------------------------------------------


def _parse_owner(text: str | None) -> tuple[int, int]:
    import grp
    import pwd

    if text is None:
        su, sg = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
        if su and sg and su.isdigit() and sg.isdigit():
            return int(su), int(sg)
        raise UsageError("give --owner USER[:GROUP]: the user who will own the backing files")
    user, _, group = text.partition(":")
    if user.isdigit():
        uid = int(user)
        try:
            default_gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            default_gid = uid
    else:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"--owner {text}: no user {user!r}; give a user name or a numeric uid") from None
        uid, default_gid = pw.pw_uid, pw.pw_gid
    if not group:
        return uid, default_gid
    if group.isdigit():
        return uid, int(group)
    try:
        return uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"--owner {text}: no group {group!r}; give a group name or a numeric gid") from None


def _need_root(cmd: str, root: str) -> None:
    if os.geteuid() != 0:
        raise ArchiveError(f"{cmd} changes file owners and needs root; run it as root (e.g. with sudo)")
    try:
        if os.path.samefile(root, "/"):
            raise UsageError(f"refusing to {cmd} /; give the root directory of an image tree")
    except FileNotFoundError:
        pass


#: Where a directory's original times wait while we edit it (hidden by the
#: name escaping, like every ``user.containers.*`` name but the escapes).
_DIRTIMES_XATTR = "user.containers.shiftfs_dirtimes"


class _DirTimes:
    """Directory times as they were before we edited the directory.

    Replacing a device by a placeholder (or back) and creating the side table
    change directory mtimes; the tree should not show our work. Before an
    edit the original times go into an xattr on the directory, and after it
    they are put back and the xattr removed, so a run killed in between
    leaves the times for the rerun to restore.
    """

    def __init__(self):
        self._saved: dict[tuple[int, int], tuple[int, int]] = {}

    def note(self, fd: int, st: os.stat_result) -> None:
        """Remember a directory's times (or those an interrupted run saved)."""
        if not stat.S_ISDIR(st.st_mode):
            return
        pending = _tree.get_xattr(fd, _DIRTIMES_XATTR)
        times = (st.st_atime_ns, st.st_mtime_ns)
        if pending is not None:
            try:
                a, m = (int(x) for x in pending.split())
                times = (a, m)
            except ValueError:
                pass
        self._saved.setdefault((st.st_dev, st.st_ino), times)
        if pending is not None:
            self.end(fd)

    def _times(self, dirfd: int) -> tuple[tuple[int, int], tuple[int, int]]:
        st = os.fstat(dirfd)
        key = (st.st_dev, st.st_ino)
        return key, self._saved.setdefault(key, (st.st_atime_ns, st.st_mtime_ns))

    def begin(self, dirfd: int) -> None:
        _, (a, m) = self._times(dirfd)
        os.setxattr(proc_fd(dirfd), _DIRTIMES_XATTR, f"{a} {m}".encode())

    def end(self, dirfd: int) -> None:
        _, times = self._times(dirfd)
        utimens_fd(dirfd, *times)
        try:
            os.removexattr(proc_fd(dirfd), _DIRTIMES_XATTR)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise


def _remove_leftovers(dirfd: int, name: str, times: _DirTimes) -> bool:
    """Drop a temporary file an interrupted run left; True if it was one."""
    if not name.startswith(_TMP_PREFIX):
        return False
    times.begin(dirfd)
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass
    times.end(dirfd)
    return True


def absorb(
    root: str, maps: list[str] | None, owner: tuple[int, int], progress=None, legacy_xattr: bool = False
) -> list[str]:
    """Turn real ownership into records; backing files go to ``owner``.

    Per inode, in this order, so that an interruption at any point leaves
    either the real ownership or a record (and a rerun completes the job):

    1. copy privileged xattrs (capabilities, ACLs) to their escaped names,
       unless an earlier run already did (its copy predates any chmod);
    2. write the record, unless the inode already has one;
    3. remove the privileged originals;
    4. chown to ``owner``, chmod to the backing mode (no setuid/setgid).

    A device node is replaced by a placeholder file that already carries its
    record and owner, by an atomic rename over the node.
    """
    umap, gmap = parse_map_args(maps or [])
    root_fd = _tree.open_root(root)
    store = _open_store(root_fd, True, legacy_xattr)
    errors: list[str] = []
    progress = progress or _tree.Progress("absorb", False)
    done: set[tuple[int, int]] = set()
    placeholders: dict[tuple[int, int], str] = {}
    times = _DirTimes()

    def to_view(e, st) -> tuple[int, int]:
        vu, vg = umap.to_view(st.st_uid), gmap.to_view(st.st_gid)
        if not umap.identity and umap.to_disk(vu) != st.st_uid:
            raise TreeError(f"{e.display}: uid {st.st_uid} is outside --map; extend the map")
        if not gmap.identity and gmap.to_disk(vg) != st.st_gid:
            raise TreeError(f"{e.display}: gid {st.st_gid} is outside --map; extend the map")
        return vu, vg

    def on_error(rel, exc):
        errors.append(f"{rel}: {exc.strerror or exc}")

    try:
        for e in _tree.walk(root_fd, on_error):
            times.note(e.fd, e.st)
            if not e.rel:
                times.begin(root_fd)  # the side table may appear in the root
            elif _remove_leftovers(e.dirfd, e.name, times):
                continue
            st = e.st
            key = (st.st_dev, st.st_ino)
            try:
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    _absorb_device(e, store, to_view(e, st), owner, placeholders, root_fd, times)
                elif key not in done:
                    _absorb_inode(e, store, umap, gmap, to_view, owner)
            except TreeError as exc:
                errors.append(str(exc))
            except (OSError, ValueError) as exc:
                errors.append(f"{e.display}: {getattr(exc, 'strerror', None) or exc}")
            done.add(key)
            progress.advance(1)
    finally:
        store.close()
        try:
            _chown_tree_at(root_fd, STORE_DIR, owner)
            times.end(root_fd)
        finally:
            os.close(root_fd)
    return errors


def _chown_tree_at(dirfd: int, name: str, owner: tuple[int, int]) -> None:
    """Give the side table (created by root) to the tree's owner."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return
    try:
        os.fchown(fd, *owner)
        for child in os.listdir(fd):
            os.chown(child, *owner, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def _strict_view(idmap: IdMap) -> Callable[[int], int | None]:
    """``to_view`` that gives None (not the overflow id) for unmapped ids."""

    def to_view(disk: int) -> int | None:
        view = idmap.to_view(disk)
        return view if idmap.identity or idmap.to_disk(view) == disk else None

    return to_view


def _absorb_inode(e, store, umap, gmap, to_view, owner) -> None:
    fd, st = e.fd, e.st
    path = proc_fd(fd)
    privileged: list[str] = []
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        present = set(_tree.list_xattrs(fd))
        for name in sorted(present):
            if not _tree.is_privileged_name(name) or name == "security.selinux":
                continue
            privileged.append(name)
            escaped = _record.escape_xattr_name(name)
            if escaped in present:
                continue  # copied by an earlier, interrupted run: keep that copy
            value = _tree.get_xattr(fd, name)
            if value is None:
                continue
            if name.startswith("system.posix_acl_"):
                value = _tree.map_acl(value, _strict_view(umap), _strict_view(gmap))
            elif name == "security.capability":
                value = _tree.map_capability(value, umap.to_view)
            os.setxattr(path, escaped, value)
            _crash_point("absorb")
    raw = store.read(fd, st)
    if raw is None:
        vu, vg = to_view(e, st)
        raw = _record.encode(Record(vu, vg, st.st_mode, 0))
        store.write(fd, st, raw)
        _crash_point("absorb")
    for name in privileged:
        try:
            os.removexattr(path, name)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
    if (st.st_uid, st.st_gid) != owner:
        fchown_fd(fd, *owner)
        _crash_point("absorb")
    if not stat.S_ISLNK(st.st_mode):
        view_mode = _record.decode(raw, stat.S_IFMT(st.st_mode)).mode
        os.chmod(path, _tree.backing_mode(view_mode))


def _absorb_device(e, store, view_ids, owner, placeholders, root_fd, times: _DirTimes) -> None:
    st = e.st
    key = (st.st_dev, st.st_ino)
    tmp = f"{_TMP_PREFIX}{st.st_ino}"
    first = placeholders.get(key)
    if first is not None:
        # Another name of a device already turned into a placeholder.
        src = _open_beneath(root_fd, first, _PATH_FLAGS)
        try:
            times.begin(e.dirfd)
            os.link(proc_fd(src), tmp, dst_dir_fd=e.dirfd, follow_symlinks=True)
            os.rename(tmp, e.name, src_dir_fd=e.dirfd, dst_dir_fd=e.dirfd)
        finally:
            os.close(src)
        times.end(e.dirfd)
        return
    rec = Record(view_ids[0], view_ids[1], st.st_mode, st.st_rdev)
    times.begin(e.dirfd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=e.dirfd)
    try:
        pst = os.fstat(fd)
        store.write(fd, pst, _record.encode(rec))
        os.fchown(fd, *owner)
        os.fchmod(fd, _tree.backing_mode(rec.mode))
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=e.dirfd)
        raise
    os.close(fd)
    _crash_point("absorb")
    os.rename(tmp, e.name, src_dir_fd=e.dirfd, dst_dir_fd=e.dirfd)
    times.end(e.dirfd)
    placeholders[key] = e.rel
    _crash_point("absorb")


def materialize(root: str, maps: list[str] | None, progress=None) -> list[str]:
    """Turn records back into real ownership (the reverse of :func:`absorb`).

    Per inode: chown to the record's disk ids, restore escaped privileged
    xattrs under their real names (after the chown, which would drop a
    capability), chmod to the record's mode (setuid included), drop the
    escaped copies and only then remove the record. A rerun redoes every
    step of an inode whose record is still there. A placeholder becomes a
    real device node by an atomic rename over it. After a run without
    errors no record is left and the side table directory is removed.
    """
    umap, gmap = parse_map_args(maps or [])
    root_fd = _tree.open_root(root)
    store = _open_store(root_fd, False)
    errors: list[str] = []
    progress = progress or _tree.Progress("materialize", False)
    done: set[tuple[int, int]] = set()
    devices: dict[tuple[int, int], str] = {}
    times = _DirTimes()

    def on_error(rel, exc):
        errors.append(f"{rel}: {exc.strerror or exc}")

    try:
        for e in _tree.walk(root_fd, on_error):
            times.note(e.fd, e.st)
            if not e.rel:
                times.begin(root_fd)  # the side table goes away at the end
            elif _remove_leftovers(e.dirfd, e.name, times):
                continue
            st = e.st
            key = (st.st_dev, st.st_ino)
            try:
                if key in devices:
                    _link_over(e, devices[key], root_fd, times)
                elif key not in done:
                    made = _materialize_inode(e, store, umap, gmap, times)
                    if made is not None:
                        devices[key] = e.rel
            except TreeError as exc:
                errors.append(str(exc))
            except (OSError, ValueError) as exc:
                errors.append(f"{e.display}: {getattr(exc, 'strerror', None) or exc}")
            done.add(key)
            progress.advance(1)
    finally:
        store.close()
    try:
        if not errors:
            try:
                os.stat(STORE_DIR, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                _rmtree_at(root_fd, STORE_DIR)
        times.end(root_fd)
    finally:
        os.close(root_fd)
    return errors


def _rmtree_at(dirfd: int, name: str) -> None:
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        for child in os.listdir(sub):
            st = os.stat(child, dir_fd=sub, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _rmtree_at(sub, child)
            else:
                os.unlink(child, dir_fd=sub)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dirfd)


def _link_over(e, first_rel: str, root_fd: int, times: _DirTimes) -> None:
    """Replace this name of a converted inode by a link to its new inode."""
    src = _open_beneath(root_fd, first_rel, _PATH_FLAGS)
    tmp = f"{_TMP_PREFIX}{e.st.st_ino}"
    try:
        times.begin(e.dirfd)
        os.link(proc_fd(src), tmp, dst_dir_fd=e.dirfd, follow_symlinks=True)
        os.rename(tmp, e.name, src_dir_fd=e.dirfd, dst_dir_fd=e.dirfd)
    finally:
        os.close(src)
    times.end(e.dirfd)


def _materialize_inode(e, store, umap: IdMap, gmap: IdMap, times: _DirTimes):
    fd, st = e.fd, e.st
    raw = store.read(fd, st)
    if raw is None:
        return None
    try:
        rec = _record.decode(raw, stat.S_IFMT(st.st_mode))
    except RecordError as exc:
        raise TreeError(f"{e.display}: {exc}") from None
    du, dg = umap.to_disk(rec.uid), gmap.to_disk(rec.gid)
    if du is None or dg is None:
        raise TreeError(f"{e.display}: record ids {rec.uid}:{rec.gid} have no disk ids in --map; extend the map")
    if stat.S_ISREG(st.st_mode) and rec.is_device:
        tmp = f"{_TMP_PREFIX}{st.st_ino}"
        times.begin(e.dirfd)
        os.mknod(tmp, rec.mode & ~0o7777 | 0o600, rec.rdev, dir_fd=e.dirfd)
        try:
            os.chown(tmp, du, dg, dir_fd=e.dirfd, follow_symlinks=False)
            os.chmod(tmp, stat.S_IMODE(rec.mode), dir_fd=e.dirfd)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=e.dirfd, follow_symlinks=False)
        except BaseException:
            os.unlink(tmp, dir_fd=e.dirfd)
            raise
        _crash_point("materialize")
        os.rename(tmp, e.name, src_dir_fd=e.dirfd, dst_dir_fd=e.dirfd)
        times.end(e.dirfd)
        return e.rel
    if stat.S_IFMT(rec.mode) != stat.S_IFMT(st.st_mode):
        raise TreeError(f"{e.display}: record type disagrees with the backing inode; fix or remove the record")
    fchown_fd(fd, du, dg)  # also drops security.capability and setuid: restored below
    _crash_point("materialize")
    escaped: list[str] = []
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        path = proc_fd(fd)
        for name in _tree.list_xattrs(fd):
            vname = _record.unescape_xattr_name(name)
            if vname is None or not _tree.is_privileged_name(vname):
                continue
            value = _tree.get_xattr(fd, name)
            if value is None:
                continue
            if vname.startswith("system.posix_acl_"):
                value = _tree.map_acl(value, umap.to_disk, gmap.to_disk)
            elif vname == "security.capability":
                value = _tree.capability_for_disk(value, umap.to_disk(0) if not umap.identity else None)
            os.setxattr(path, vname, value)
            escaped.append(name)
            _crash_point("materialize")
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(proc_fd(fd), stat.S_IMODE(rec.mode))
    for name in escaped:
        os.removexattr(proc_fd(fd), name)
    _crash_point("materialize")
    store.remove(fd, st)
    return None


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def _err(cmd: str, message: str) -> None:
    print(f"shiftfs {cmd}: {message}", file=sys.stderr)


def _report(cmd: str, errors: list[str]) -> int:
    for msg in errors:
        _err(cmd, msg)
    return 1 if errors else 0


def _maps(args) -> list[str]:
    maps = list(args.map or [])
    parse_map_args(maps)  # validate early: IdMapError → exit 2
    return maps


def _run(cmd: str, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except IdMapError as exc:
        _err(cmd, str(exc))
        return 2
    except UsageError as exc:
        _err(cmd, str(exc))
        return 2
    except (ArchiveError, TreeError) as exc:
        _err(cmd, str(exc))
        return 1
    except BrokenPipeError:
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _err(cmd, f"{where}{exc.strerror or exc}")
        return 1


def _cmd_export(args) -> int:
    def run() -> int:
        maps = _maps(args)
        from .devtable import DeviceTable, DeviceTableError

        devices = None
        if args.device_table:
            try:
                devices = DeviceTable.from_file(args.device_table)
            except DeviceTableError as exc:
                raise UsageError(str(exc)) from None
        try:
            u, _, g = args.self_owner.partition(":")
            self_owner = (int(u), int(g or u))
        except ValueError:
            raise UsageError(f"bad --self-owner {args.self_owner!r}: give numeric UID:GID, e.g. 0:0") from None
        fmt = args.format
        out_path = args.output
        if fmt is None:
            fmt = "cpio" if out_path and out_path.endswith((".cpio", ".cpio.gz", ".cpio.xz")) else "tar"
        if out_path in (None, "-"):
            if sys.stdout.isatty():
                raise UsageError("refusing to write an archive to a terminal; give -o FILE or redirect stdout")
            raw = sys.stdout.buffer
            close = False
        else:
            try:
                raw = open(out_path, "wb")
            except OSError as exc:
                raise ArchiveError(f"{out_path}: cannot create: {exc.strerror}") from None
            close = True
        out = raw
        if out_path and out_path.endswith((".gz", ".tgz")):
            out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)
        elif out_path and out_path.endswith((".xz", ".txz")):
            out = lzma.LZMAFile(raw, "wb")
        try:
            with _tree.Progress("export") as progress:
                errors = export_tree(args.root, out, fmt, maps, progress, devices=devices, self_owner=self_owner)
        finally:
            if out is not raw:
                out.close()
            if close:
                raw.close()
            else:
                raw.flush()
        return _report("export", errors)

    return _run("export", run)


def _cmd_import(args) -> int:
    def run() -> int:
        if args.archive == "-" and sys.stdin.isatty():
            raise UsageError("refusing to read an archive from a terminal; give ARCHIVE or redirect stdin")
        with _tree.Progress("import") as progress:
            errors = import_archive(args.archive, args.root, args.oci_layer, progress, args.legacy_xattr)
        return _report("import", errors)

    return _run("import", run)


def _cmd_stat(args) -> int:
    def run() -> int:
        umap, gmap = parse_map_args(_maps(args))
        status = 0
        for i, path in enumerate(args.paths):
            try:
                text = _stat_one(path, args.root, umap, gmap)
            except (ArchiveError, TreeError) as exc:
                _err("stat", str(exc))
                status = 1
                continue
            if i:
                print()
            print(text)
        return status

    return _run("stat", run)


def _cmd_ls(args) -> int:
    def run() -> int:
        umap, gmap = parse_map_args(_maps(args))
        return _report("ls", _ls(args.dir, args.long, umap, gmap, sys.stdout))

    return _run("ls", run)


def _cmd_absorb(args) -> int:
    def run() -> int:
        maps = _maps(args)
        owner = _parse_owner(args.owner)
        _need_root("absorb", args.root)
        with _tree.Progress("absorb") as progress:
            errors = absorb(args.root, maps, owner, progress, args.legacy_xattr)
        return _report("absorb", errors)

    return _run("absorb", run)


def _cmd_materialize(args) -> int:
    def run() -> int:
        maps = _maps(args)
        _need_root("materialize", args.root)
        with _tree.Progress("materialize") as progress:
            errors = materialize(args.root, maps, progress)
        return _report("materialize", errors)

    return _run("materialize", run)


def _add_map(p) -> None:
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="u|g|b:DISK:VIEW:COUNT",
        help="id table range (repeatable): disk id DISK+k is seen as VIEW+k",
    )


def register(subparsers) -> None:
    """Add the offline tree commands to the ``shiftfs`` command line."""
    p = subparsers.add_parser(
        "export",
        help="write a tar or cpio archive of a backing tree's view",
        description="Write an archive whose entries carry the view owners, modes, devices and xattrs of ROOT.",
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("-o", "--output", metavar="FILE", help="archive file (- or omitted: stdout; .gz/.xz compress)")
    p.add_argument("--format", choices=("tar", "cpio"), help="tar (pax, default) or cpio (newc)")
    p.add_argument(
        "--device-table",
        metavar="FILE",
        help="add entries from a device table (lines 'PATH TYPE MAJOR MINOR MODE UID GID'; "
        "'python -m shiftfs.devtable mmdebstrap' prints the usual /dev)",
    )
    p.add_argument(
        "--self-owner",
        metavar="UID:GID",
        default="0:0",
        help="what files without a record that you own show as (default 0:0: you are view root "
        "in shiftfs run/exec); ignored with --map",
    )
    _add_map(p)
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser(
        "import",
        help="unpack a tar into a backing tree as records (no privileges needed)",
        description="Unpack ARCHIVE (tar, .gz, .xz, .bz2, .zst; - for stdin) into ROOT, keeping ownership, modes "
        "and devices in records.",
    )
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--oci-layer", action="store_true", help="apply .wh.NAME whiteouts and .wh..wh..opq")
    p.add_argument(
        "--legacy-xattr",
        action="store_true",
        help="also write user.fuseoverlayfs.override_stat (for fuse-overlayfs < 1.14, e.g. Debian 12's 1.10)",
    )
    p.set_defaults(func=_cmd_import)

    p = subparsers.add_parser(
        "stat", help="show the view metadata of backing files", description="Show view metadata from records."
    )
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--root", metavar="ROOT", help="the tree root (default: nearest parent with .shiftfs/)")
    _add_map(p)
    p.set_defaults(func=_cmd_stat)

    p = subparsers.add_parser(
        "ls", help="list a backing directory with view metadata", description="List DIR with view owners and modes."
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    _add_map(p)
    p.set_defaults(func=_cmd_ls)

    p = subparsers.add_parser(
        "absorb",
        help="(root) turn real ownership into records, files owned by one user",
        description="Turn a tree with real ownership into records; backing files become USER's. Safe to interrupt "
        "and rerun.",
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--owner", metavar="USER[:GROUP]", help="owner of the backing files (default: $SUDO_UID)")
    p.add_argument(
        "--legacy-xattr",
        action="store_true",
        help="also write user.fuseoverlayfs.override_stat (for fuse-overlayfs < 1.14, e.g. Debian 12's 1.10)",
    )
    _add_map(p)
    p.set_defaults(func=_cmd_absorb)

    p = subparsers.add_parser(
        "materialize",
        help="(root) turn records back into real ownership",
        description="Apply the records of ROOT as real ownership, modes and device nodes. Safe to interrupt "
        "and rerun.",
    )
    p.add_argument("root", metavar="ROOT")
    _add_map(p)
    p.set_defaults(func=_cmd_materialize)
