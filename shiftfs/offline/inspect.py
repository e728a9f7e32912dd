"""``shiftfs stat`` and ``shiftfs ls``: view metadata of backing files, from their records."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from typing import TextIO

from ..errors import ArchiveError, TreeError
from ..ownership.idmap import IdMap
from ..ownership.names import view_name
from ..ownership.view import ViewRule
from ..sys.files import O_PATH_NOFOLLOW
from .walk import find_root, open_root, open_store, view_at

__all__ = ["stat_one", "list_dir"]


_STAT_TYPE_TEXT = {
    stat.S_IFREG: "regular file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character special file",
    stat.S_IFBLK: "block special file",
}


def _fmt_time(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)) + f".{frac:09d}"


def stat_one(
    path: str,
    root: str | None,
    umap: IdMap,
    gmap: IdMap,
    say: Callable[[str], None] | None = None,
    default_owner: tuple[int, int] | None = None,
) -> str:
    """``shiftfs stat`` of one path. Whose records count is the tools' rule
    (shiftfs.ownership.trust.offline_trusted_uid), never the owner of the
    directory the file happens to be in; ``say`` gets the line saying whose
    records count when that is not the running user. What it shows is the
    mount's view rule (``default_owner``: as ``-o default_owner=``)."""
    try:
        fd = os.open(path, O_PATH_NOFOLLOW)
    except FileNotFoundError:
        raise ArchiveError(f"{path}: no such file; give a path inside a backing tree") from None
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        root = root or find_root(path)
        root_fd = open_root(root)
        try:
            store = open_store(root_fd, False, readonly=True, name=root, say=say)
            try:
                st = os.stat(fd)
                raw = store.read(fd, st)
                rule = ViewRule.for_tree(root_fd, store, umap, gmap, default_owner)
                view = view_at(rule, store, fd, st, path)
                xattrs = rule.xattrs(fd, view) if not stat.S_ISLNK(st.st_mode) else {}
            finally:
                store.close()
        finally:
            os.close(root_fd)
    finally:
        os.close(fd)
    ftype = stat.S_IFMT(view.mode)
    lines = [f"  File: {path}" + (f" -> {os.readlink(path)}" if ftype == stat.S_IFLNK else "")]
    size = 0 if view.placeholder else st.st_size
    lines.append(f"  Size: {size:<12} Links: {st.st_nlink:<6} Type: {_STAT_TYPE_TEXT[ftype]}")
    lines.append(
        f"Access: ({stat.S_IMODE(view.mode):04o}/{stat.filemode(view.mode)})  Uid: {view.uid:<8} Gid: {view.gid}"
    )
    if ftype in (stat.S_IFCHR, stat.S_IFBLK):
        lines.append(f"Device: {os.major(view.rdev)},{os.minor(view.rdev)}")
    lines.append(f"Modify: {_fmt_time(st.st_mtime_ns)}")
    if raw is not None and rule.records is not False:
        lines.append(
            f"Record: {raw.decode('ascii', 'replace')}" + (f" (not believed: {view.distrust})" if view.distrust else "")
        )
    elif default_owner is not None:
        lines.append("Record: none (view = the default owner)")
    else:
        lines.append(
            "Record: none (view = backing ids" + (" through --map)" if not umap.identity or not gmap.identity else ")")
        )
    lines.append(
        f"Backing: {st.st_uid}:{st.st_gid} ({stat.S_IMODE(st.st_mode):04o}/{stat.filemode(st.st_mode)})"
        + (" placeholder" if view.placeholder else "")
    )
    if xattrs:
        lines.append("Xattrs: " + ", ".join(xattrs))
    return "\n".join(lines)


def list_dir(
    directory: str,
    long: bool,
    umap: IdMap,
    gmap: IdMap,
    out: TextIO,
    say: Callable[[str], None] | None = None,
    default_owner: tuple[int, int] | None = None,
) -> list[str]:
    """``shiftfs ls [-l]`` of one directory (whose records count and what shows: as :func:`stat_one`)."""
    errors: list[str] = []
    root = find_root(directory)
    root_fd = open_root(root)
    dir_fd = open_root(directory)
    store = open_store(root_fd, False, readonly=True, name=root, say=say if long else None)
    is_root = os.path.samestat(os.fstat(root_fd), os.fstat(dir_fd))
    rule = ViewRule.for_tree(root_fd, store, umap, gmap, default_owner)
    try:
        names = sorted(os.listdir(dir_fd), key=os.fsencode)
        for name in names:
            # Shown by view name, as a mount and export show it; shiftfs' own names are left out.
            vbytes = view_name(os.fsencode(name), is_root)
            if vbytes is None:
                continue
            vname = os.fsdecode(vbytes)
            if not long:
                print(vname, file=out)
                continue
            try:
                fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=dir_fd)
            except OSError as exc:
                errors.append(f"{directory}/{name}: {exc.strerror}")
                continue
            try:
                st = os.stat(fd)
                view = view_at(rule, store, fd, st, f"{directory}/{name}")
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
            line = f"{stat.filemode(view.mode)} {st.st_nlink:>3} {view.uid:>6} {view.gid:>6} {size:>10} {when} {vname}"
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
