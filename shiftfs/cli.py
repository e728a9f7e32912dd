"""The ``shiftfs`` command line.

Subcommands: ``mount``, ``umount`` and those registered by the other modules
(``run``, ``exec``, the offline tree tools). The mount-helper form
``shiftfs SOURCE MOUNTPOINT -o opt,opt`` — what ``mount -t fuse.shiftfs`` and
fstab lines run through ``mount.fuse3`` — is ``shiftfs mount``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import MountError, UsageError
from .ownership.idmap import add_map_argument

__all__ = ["main"]

# Modules that add subcommands through ``register(subparsers)``; missing ones are skipped.
_COMMAND_MODULES = ["shiftfs.container.run", "shiftfs.container.exec", "shiftfs.offline.commands"]

MOUNT_HELP = """\
options (-o, comma separated):
  backend=auto|kernel|fuse
                        table mode: kernel = an idmapped bind mount of SOURCE
                        (no daemon; root on a filesystem that supports it),
                        fuse = the daemon, auto (default) = kernel when the
                        kernel allows it, else fuse, saying which in one line.
                        FUSE-only options are ignored on the kernel backend
                        (one warning); xattr mode is always fuse. See
                        docs/kernel-backend.md for how the backends differ
  xattr                 xattr mode (same as --xattr)
  uidmap=D:V:C[:D:V:C]  uid table, fuse-overlayfs' colon form
  gidmap=D:V:C[:...]    gid table
  cache=always|auto|never
                        how long the kernel may cache entries, attributes and
                        data: always (default; the mount owns SOURCE), auto
                        (1 s), never (SOURCE is changed by others too)
  shared, coherent      let other daemons serve SOURCE too (refused otherwise:
                        one daemon per SOURCE): coherent caching (cache=never,
                        or cache=auto), no writeback, records read again on
                        every request; every mount of SOURCE needs it. In
                        mount(8) and fstab write 'coherent': mount(8) takes
                        'shared' as its propagation flag and never passes it
  default_owner=UID:GID xattr mode: owner shown for files without a record
  legacy_xattr          xattr mode: also write user.fuseoverlayfs.override_stat
                        (for fuse-overlayfs < 1.14, e.g. Debian 12's 1.10,
                        using the tree as its upper layer)
  allow_shared_source   xattr mode: mount a SOURCE that other users could write
                        into (refused otherwise: they could plant records); its
                        mode is left as it is, and records count only on inodes
                        you own that others cannot write
  single_id             show every id the mounter's user namespace cannot map
                        as its root (0), so root of a one-id namespace
                        (unshare -r, no subordinate range) keeps its rights
                        over such files; records keep the real ids. What
                        shiftfs run/exec use in a single-id namespace
  fsname=NAME           source name in mount tables (default: SOURCE)
  allow_other           let other users in (default when mounted by uid 0)
  suid, dev, ro, noexec, noatime, ...
                        passed to the kernel (nosuid,nodev are the default
                        outside a user namespace, fstab lines included:
                        mount(8) hands helpers no plain suid/dev)
  nowriteback           no kernel writeback cache (on by default with
                        cache=always: writes are cached and sent in large
                        requests; off with cache=auto|never unless
                        'writeback' is given)
  xattr_probes=off      answer the kernel's first GETXATTR with ENOSYS so it
                        stops asking (no security.capability probe before each
                        write); xattrs can be set but not read through the mount
  acl=off               the kernel does not enforce POSIX ACLs through the
                        mount (they are still stored, translated and read
                        back; mode bits still apply): no GETXATTR of the
                        directory's ACL after each create or unlink in it
  spin=US               microseconds the daemon polls for the next request
                        before it sleeps (default 100; 0: sleep at once).
                        Busy only while requests keep coming: one sleep and
                        wake-up per request cost more CPU and time
  closer=on             close removed files' descriptors in a worker thread,
                        not inside FORGET (where the backing fs frees the
                        inode): helps rm -rf when the disk is contended, costs
                        CPU otherwise (docs/speed-round4.md)
  early_writeback=off   no writeback hint: by default, while a program fsyncs
                        its files (dpkg), closing a written file starts its
                        writeback on disk, as its sync_file_range asked
  read_ahead_kb=N       read-ahead of the mount in KiB (default 1024; the
                        kernel's 128 makes many small READ requests; root only)
  log=FILE              daemon log file in the background (default: syslog)
  stats=FILE            write per-request counters as JSON at exit / SIGUSR1
  debug                 trace every request in the log
  remount               change a live mount: ro/rw and the nosuid, nodev,
                        noexec and atime flags (what 'mount -o remount,ro'
                        asks); the other options stay as mounted
"""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"shiftfs: {message}; see '{self.prog} --help'\n")


def _add_mount(sub) -> None:
    p = sub.add_parser(
        "mount",
        help="mount a shifted view of SOURCE on MOUNTPOINT",
        description="Mount a view of SOURCE on MOUNTPOINT whose file ownership is translated.",
        epilog=MOUNT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_map_argument(p)
    p.add_argument("--xattr", action="store_true", help="keep view ownership in user.containers.override_stat records")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS", help="mount options (see below)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    p.set_defaults(func=_cmd_mount)

    u = sub.add_parser("umount", help="unmount a shiftfs mount", description="Unmount a shiftfs mount.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("-l", "--lazy", action="store_true", help="detach now, clean up when no longer busy")
    u.set_defaults(func=_cmd_umount)


def _cmd_mount(args) -> int:
    from .fs.daemon import mount
    from .fs.options import parse_options

    cfg = parse_options(args.options, args.map, args.xattr, args.source, args.mountpoint)
    if cfg.remount:
        from .fs.remount import remount

        return remount(cfg, parse_mount_argv)
    cfg.foreground = args.foreground
    return mount(cfg)


def parse_mount_argv(argv: list[str]):
    """A ``shiftfs`` command line of a mount (either form) → its ``MountConfig``; raises UsageError."""
    from .fs.options import parse_options

    parser = build_parser()
    commands = {"mount", "umount"}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands = set(action.choices)
    argv = _helper_form(list(argv), commands)
    if not argv or argv[0] != "mount":
        raise UsageError("not a mount command line")
    args = parser.parse_args(argv)
    return parse_options(args.options, args.map, args.xattr, args.source, args.mountpoint)


def _cmd_umount(args) -> int:
    from .fs.mount import unmount

    unmount(args.mountpoint, lazy=args.lazy)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="shiftfs", description="A FUSE filesystem that shifts file ownership.")
    parser.add_argument("--version", action="version", version=f"shiftfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    _add_mount(sub)
    for modname in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue
            raise
        mod.register(sub)
    return parser


def _helper_form(argv: list[str], commands: set[str]) -> list[str]:
    """``shiftfs SOURCE MOUNTPOINT [-o OPTS]`` → ``shiftfs mount …``."""
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        return ["mount"] + _drop_mount_fuse_defaults(argv)
    return argv


def _drop_mount_fuse_defaults(argv: list[str]) -> list[str]:
    """Undo the ``dev,suid`` that mount.fuse3 appends to every helper call.

    mount.fuse3 adds ``dev`` unless ``nodev`` was given and ``suid`` unless
    ``nosuid`` was given (mount(8)'s defaults for block devices), so an fstab
    line would silently turn our ``nosuid,nodev`` default off: a setuid file
    owned by view uid 0 would run as real root. An explicit ``suid``/``dev``
    earlier in the list still counts.
    """
    last = max((i for i, a in enumerate(argv[:-1]) if a == "-o"), default=None)
    if last is None:
        return argv
    opts = argv[last + 1].split(",")
    tail = (["dev"] if "nodev" not in opts else []) + (["suid"] if "nosuid" not in opts else [])
    if tail and opts[-len(tail) :] == tail:
        opts = opts[: -len(tail)]
        argv = argv[: last + 1] + [",".join(opts)] + argv[last + 2 :]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands = set(action.choices)
    if len(argv) == 1 and not argv[0].startswith("-") and argv[0] not in commands:
        # not the helper form (that has SOURCE and MOUNTPOINT): a mistyped command
        print(f"shiftfs: unknown command {argv[0]!r}; see 'shiftfs --help'", file=sys.stderr)
        return 2
    argv = _helper_form(argv, commands)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        print("shiftfs: no command given; see 'shiftfs --help'", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"shiftfs: {e}", file=sys.stderr)
        return 2
    except MountError as e:
        print(f"shiftfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
