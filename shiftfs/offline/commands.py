"""The offline commands on the ``shiftfs`` command line.

``export``, ``import``, ``stat``, ``ls``, ``devtable``, ``absorb`` and ``materialize``
work on a backing tree's records without a mount; each prints one line per
problem and exits 0, 1 (some paths failed) or 2 (bad command line).
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import sys
from collections.abc import Callable

from ..errors import ArchiveError, TreeError, UsageError
from ..ownership.idmap import IdMapError, add_map_argument, parse_map_args
from .absorb import absorb, materialize
from .devtable import DESCRIPTION, EPILOG, add_arguments
from .export import export_tree
from .importer import import_archive
from .inspect import list_dir, stat_one
from .walk import Progress

__all__ = ["register"]


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


def _err(cmd: str, message: str) -> None:
    print(f"shiftfs {cmd}: {message}", file=sys.stderr)


def _report(cmd: str, errors: list[str]) -> int:
    for msg in errors:
        _err(cmd, msg)
    return 1 if errors else 0


def _sayer(cmd: str) -> Callable[[str], None]:
    """Print each note (whose records count) once, on stderr."""
    said: set[str] = set()

    def say(note: str) -> None:
        if note not in said:
            said.add(note)
            _err(cmd, note)

    return say


def _default_owner(args) -> tuple[int, int] | None:
    """``--default-owner UID:GID`` (None when not given)."""
    text = getattr(args, "default_owner", None)
    if text is None:
        return None
    u, _, g = text.partition(":")
    if not u.isdigit() or not (g or u).isdigit():
        raise UsageError(f"bad --default-owner {text!r}: give numeric UID:GID, as the mount's -o default_owner=")
    return int(u), int(g or u)


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
        default_owner = _default_owner(args)
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
            with Progress("export") as progress:
                errors = export_tree(
                    args.root,
                    out,
                    fmt,
                    maps,
                    progress,
                    devices=devices,
                    self_owner=self_owner,
                    default_owner=default_owner,
                )
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
        with Progress("import") as progress:
            errors = import_archive(args.archive, args.root, args.oci_layer, progress, args.legacy_xattr)
        return _report("import", errors)

    return _run("import", run)


def _cmd_stat(args) -> int:
    def run() -> int:
        umap, gmap = parse_map_args(_maps(args))
        default_owner = _default_owner(args)
        status = 0
        say = _sayer("stat")
        for i, path in enumerate(args.paths):
            try:
                text = stat_one(path, args.root, umap, gmap, say, default_owner)
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
        errors = list_dir(args.dir, args.long, umap, gmap, sys.stdout, _sayer("ls"), _default_owner(args))
        return _report("ls", errors)

    return _run("ls", run)


def _cmd_devtable(args) -> int:
    from .devtable import run

    return run(args)


def _cmd_absorb(args) -> int:
    def run() -> int:
        maps = _maps(args)
        owner = _parse_owner(args.owner)
        _need_root("absorb", args.root)
        with Progress("absorb") as progress:
            errors = absorb(args.root, maps, owner, progress, args.legacy_xattr)
        return _report("absorb", errors)

    return _run("absorb", run)


def _cmd_materialize(args) -> int:
    def run() -> int:
        maps = _maps(args)
        _need_root("materialize", args.root)
        with Progress("materialize") as progress:
            errors = materialize(args.root, maps, progress)
        return _report("materialize", errors)

    return _run("materialize", run)


def _add_legacy_xattr(p) -> None:
    p.add_argument(
        "--legacy-xattr",
        action="store_true",
        help="also write user.fuseoverlayfs.override_stat (for fuse-overlayfs < 1.14, e.g. Debian 12's 1.10)",
    )


#: Whose records the readers believe (shiftfs.ownership.trust.offline_trusted_uid).
_TRUST = (
    " Records count only on inodes you own, as in your mount; any other inode shows as 65534 without "
    "setuid/setgid. Run as root, the owner of the tree's root is believed instead, and a line on stderr says so."
)

#: Each offline command's help line and description.
_TEXTS = {
    "export": (
        "write a tar or cpio archive of a backing tree's view",
        "Write an archive whose entries carry the view owners, modes, devices and xattrs of ROOT." + _TRUST,
    ),
    "import": (
        "unpack a tar into a backing tree as records (no privileges needed)",
        "Unpack ARCHIVE (tar, .gz, .xz, .bz2, .zst; - for stdin) into ROOT, keeping ownership, modes "
        "and devices in records. ROOT must be yours (or root's): records on another user's inodes would "
        "not be believed.",
    ),
    "stat": (
        "show the view metadata of backing files",
        "Show view metadata from records." + _TRUST,
    ),
    "ls": (
        "list a backing directory with view metadata",
        "List DIR with view owners and modes." + _TRUST,
    ),
    "devtable": (
        "device tables: print mmdebstrap's /dev, or add a table's entries to a tar",
        DESCRIPTION,
    ),
    "absorb": (
        "(root) turn real ownership into records, files owned by one user",
        "Turn a tree with real ownership into records; backing files become USER's. A record already "
        "there counts only on an inode USER owns; on any other inode the real owner is the truth. "
        "Safe to interrupt and rerun.",
    ),
    "materialize": (
        "(root) turn records back into real ownership",
        "Apply the records of ROOT as real ownership, modes and device nodes. Safe to interrupt and rerun.",
    ),
}


def _add_default_owner(p) -> None:
    p.add_argument(
        "--default-owner",
        metavar="UID:GID",
        help="what files without a (believed) record show as, as a mount with -o default_owner=UID:GID "
        "shows them (give the mount's value to see what it shows)",
    )


def _command(subparsers, func, name: str, **more) -> argparse.ArgumentParser:
    """One offline subcommand: its parser (texts from :data:`_TEXTS`), run by ``func``."""
    help_line, description = _TEXTS[name]
    p = subparsers.add_parser(name, help=help_line, description=description, **more)
    p.set_defaults(func=func)
    return p


def register(subparsers) -> None:
    """Add the offline tree commands to the ``shiftfs`` command line."""
    p = _command(subparsers, _cmd_export, "export")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("-o", "--output", metavar="FILE", help="archive file (- or omitted: stdout; .gz/.xz compress)")
    p.add_argument("--format", choices=("tar", "cpio"), help="tar (pax, default) or cpio (newc)")
    p.add_argument(
        "--device-table",
        metavar="FILE",
        help="add entries from a device table (lines 'PATH TYPE MAJOR MINOR MODE UID GID'; "
        "'shiftfs devtable mmdebstrap' prints the usual /dev)",
    )
    p.add_argument(
        "--self-owner",
        metavar="UID:GID",
        default="0:0",
        help="what files without a record that you own show as (default 0:0: you are view root "
        "in shiftfs run/exec); ignored with --map or --default-owner",
    )
    _add_default_owner(p)
    add_map_argument(p)

    p = _command(subparsers, _cmd_import, "import")
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--oci-layer", action="store_true", help="apply .wh.NAME whiteouts and .wh..wh..opq")
    _add_legacy_xattr(p)

    p = _command(subparsers, _cmd_stat, "stat")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--root", metavar="ROOT", help="the tree root (default: nearest parent with .shiftfs/)")
    _add_default_owner(p)
    add_map_argument(p)

    p = _command(subparsers, _cmd_ls, "ls")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    _add_default_owner(p)
    add_map_argument(p)

    p = _command(
        subparsers, _cmd_devtable, "devtable", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)

    p = _command(subparsers, _cmd_absorb, "absorb")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--owner", metavar="USER[:GROUP]", help="owner of the backing files (default: $SUDO_UID)")
    _add_legacy_xattr(p)
    add_map_argument(p)

    p = _command(subparsers, _cmd_materialize, "materialize")
    p.add_argument("root", metavar="ROOT")
    add_map_argument(p)
