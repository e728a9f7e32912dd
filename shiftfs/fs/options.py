"""Mount options: ``-o`` lists and ``--map`` arguments into a :class:`MountConfig`.

Every option shiftfs does not know is refused with a one-line message; the
kernel's own flags pass through, and mount(8)/fstab words that mean nothing
to us are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from ..ownership.idmap import IdMap, IdMapError, parse_map_args

__all__ = ["MountConfig", "CacheConfig", "parse_options", "CACHE_MODES"]

#: The ``-o cache=`` values (see :class:`CacheConfig`).
CACHE_MODES = ("always", "auto", "never")


class CacheConfig:
    """How long the kernel may trust what we tell it.

    ``always`` (default): the mount owns SOURCE; entries and attributes are
    cached for a long time, misses are cached too, and file pages survive
    reopening. ``auto``: one second. ``never``: nothing is cached, for a
    SOURCE that other programs change at the same time.
    """

    MODES = CACHE_MODES

    def __init__(self, mode: str = "always"):
        if mode not in self.MODES:
            raise ValueError(f"unknown cache mode {mode!r}; use one of {', '.join(self.MODES)}")
        self.mode = mode
        if mode == "always":
            self.timeout, self.negative_timeout, self.keep_cache, self.xattr_cache = (
                86400.0 * 365,
                86400.0 * 365,
                True,
                True,
            )
        elif mode == "auto":
            self.timeout, self.negative_timeout, self.keep_cache, self.xattr_cache = 1.0, 1.0, False, False
        else:
            self.timeout, self.negative_timeout, self.keep_cache, self.xattr_cache = 0.0, 0.0, False, False


# Options passed to the kernel / libfuse as they are.
_KERNEL_FLAGS = {
    "allow_other",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "ro",
    "rw",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "sync",
    "async",
    "dirsync",
    "auto_unmount",
}
# mount(8)/fstab words that mean nothing to us.
_IGNORED = {"defaults", "auto", "noauto", "user", "nouser", "users", "nofail", "_netdev", "default_permissions"}
# The kernel's FUSE options, which mount(8) copies from the mount table into a remount.
_FUSE_SHOWN = {"user_id", "group_id", "max_read", "blksize", "rootmode"}


@dataclass
class MountConfig:
    source: str
    mountpoint: str
    xattr: bool = False
    uids: IdMap = field(default_factory=lambda: IdMap(what="uid"))
    gids: IdMap = field(default_factory=lambda: IdMap(what="gid", overflow=65534))
    cache: str = "always"
    default_owner: tuple[int, int] | None = None
    legacy_xattr: bool = False
    fsname: str | None = None
    kernel_opts: list[str] = field(default_factory=list)
    debug: bool = False
    logfile: str | None = None
    stats: str | None = None
    foreground: bool = False
    writeback: bool = True
    read_ahead_kb: int = 1024
    xattr_probes: bool = True
    #: the kernel enforces POSIX ACLs through the mount (FUSE_POSIX_ACL); ``-o acl=off`` trades that for fewer requests
    acl: bool = True
    #: microseconds the request loop polls for the next request before it sleeps (shiftfs.fs.loop)
    spin_us: int = 100
    #: ``-o closer=on``: close removed inodes' descriptors in a worker thread (shiftfs.fs.closer)
    closer: bool = False
    #: ``-o early_writeback=off``: no writeback hint at release while a program syncs (shiftfs.fs.filedata)
    early_writeback: bool = True
    # kernel backend (shiftfs/fs/idmapped.py): which backend, and the -o keys given
    backend: str = "auto"
    option_keys: list[str] = field(default_factory=list)
    #: ``-o remount``: change the flags of a live mount instead of mounting
    remount: bool = False
    #: the daemon's own options given (a remount cannot change them)
    daemon_opts: list[str] = field(default_factory=list)
    #: the list carries the kernel's FUSE options (user_id=…): mount(8) built it from the mount table and fstab
    from_mount_table: bool = False
    #: xattr mode: mount a SOURCE that other users could write into (shiftfs.ownership.trust)
    allow_shared_source: bool = False
    #: ``-o shared``: other daemons (or programs) may serve SOURCE too: coherent caching, a shared lock
    shared: bool = False
    #: what securing the backing tree did, logged once the log is set up
    notes: list = field(default_factory=list)
    #: shiftfs run/exec in a single-id namespace: the control socket (shiftfs.fs.control)
    control_fd: int | None = None
    #: present ids the daemon's namespace cannot map as 0 (shiftfs.fs.control)
    single_id: bool = False
    #: shiftfs run/exec: serve the connection the launcher mounted (``/dev/fd/N``), mount nothing
    fuse_fd: int | None = None
    #: shiftfs run/exec: SOURCE was found private on the host (inside the namespace the owners
    #: above it are unmapped, so the daemon cannot tell); everything else as a private SOURCE
    source_checked: bool = False


def _coherent(cfg: MountConfig, cache_given: bool, writeback_given: bool) -> None:
    """``-o shared``: nothing the kernel or the daemon caches may hide another daemon's change.

    ``cache=never`` unless ``cache=auto`` (1 s) is asked; no writeback cache
    (the kernel would trust its own sizes and times); records are re-read on
    every request (see ``OwnershipPolicy.reread``).
    """
    if cache_given and cfg.cache == "always":
        raise UsageError(
            "-o shared needs coherent caching: drop cache=always, or use cache=never (default) or cache=auto"
        )
    if writeback_given and cfg.writeback:
        raise UsageError("-o shared cannot use the writeback cache (sizes and times would go stale); drop writeback")
    if not cache_given:
        cfg.cache = "never"


def parse_options(opts: list[str], maps: list[str], xattr: bool, source: str, mountpoint: str) -> MountConfig:
    """Turn ``-o`` lists and ``--map`` arguments into a :class:`MountConfig`."""
    cfg = MountConfig(source=source, mountpoint=mountpoint, xattr=xattr)
    writeback_given = cache_given = False
    uidmap = gidmap = None
    fuse_shown: list[str] = []
    for group in opts:
        for opt in group.split(","):
            opt = opt.strip()
            if not opt:
                continue
            key, eq, val = opt.partition("=")
            if key in _IGNORED or key.startswith("x-") or key.startswith("X-") or key == "comment":
                continue
            cfg.option_keys.append(key)
            if key == "remount" and not eq:
                cfg.remount = True
                continue
            if key in _FUSE_SHOWN and eq:
                fuse_shown.append(opt)
                continue
            if key not in _KERNEL_FLAGS:
                cfg.daemon_opts.append(key)
            if key in _KERNEL_FLAGS and not eq:
                cfg.kernel_opts.append(key)
            elif key == "xattr" and not eq:
                cfg.xattr = True
            elif key == "uidmap" and eq:
                uidmap = val
            elif key == "gidmap" and eq:
                gidmap = val
            elif key == "cache" and eq:
                if val not in CACHE_MODES:
                    raise UsageError(f"bad -o cache={val}: use cache=always, cache=auto or cache=never")
                cfg.cache = val
                cache_given = True
            elif key == "default_owner" and eq:
                try:
                    u, _, g = val.partition(":")
                    cfg.default_owner = (int(u), int(g or u))
                except ValueError:
                    raise UsageError(
                        f"bad -o default_owner={val}: give numeric UID:GID, e.g. default_owner=0:0"
                    ) from None
            elif key in ("legacy_xattr", "fuseoverlayfs_compat") and not eq:
                cfg.legacy_xattr = True
            elif key == "fsname" and eq:
                cfg.fsname = val
            elif key == "debug" and not eq:
                cfg.debug = True
            elif key == "log" and eq:
                cfg.logfile = val
            elif key == "stats" and eq:
                cfg.stats = val
            elif key in ("writeback", "nowriteback") and not eq:
                cfg.writeback = key == "writeback"
                writeback_given = True
            elif key == "read_ahead_kb" and eq:
                try:
                    cfg.read_ahead_kb = int(val)
                except ValueError:
                    raise UsageError(
                        f"bad -o read_ahead_kb={val}: give a number of KiB, e.g. read_ahead_kb=1024"
                    ) from None
            elif key == "backend" and eq:
                if val not in ("auto", "kernel", "fuse"):
                    raise UsageError(f"bad -o backend={val}: use backend=auto, backend=kernel or backend=fuse")
                cfg.backend = val
            elif key in ("shared", "coherent") and not eq:
                # 'coherent': the spelling mount(8) and fstab pass on ('shared' is their propagation flag)
                cfg.shared = True
            elif key == "allow_shared_source" and not eq:
                cfg.allow_shared_source = True
            elif key == "xattr_probes" and val in ("on", "off"):
                cfg.xattr_probes = val == "on"
            elif key == "acl" and val in ("on", "off"):
                cfg.acl = val == "on"
            elif key == "closer" and val in ("on", "off"):
                cfg.closer = val == "on"
            elif key == "early_writeback" and val in ("on", "off"):
                cfg.early_writeback = val == "on"
            elif key == "spin" and eq:
                if not val.isdigit() or int(val) > 10000:
                    raise UsageError(f"bad -o spin={val}: give microseconds from 0 (never) to 10000, e.g. spin=50")
                cfg.spin_us = int(val)
            elif key == "control_fd" and val.isdigit():
                cfg.control_fd = int(val)
            elif key == "single_id" and not eq:
                cfg.single_id = True
            elif key == "fuse_fd" and val.isdigit():
                cfg.fuse_fd = int(val)
            elif key == "source_checked" and not eq:
                cfg.source_checked = True
            else:
                raise UsageError(
                    f"unknown -o option {opt!r}; see 'shiftfs mount --help' for the options shiftfs understands"
                )
    if fuse_shown and not cfg.remount:
        raise UsageError(
            f"unknown -o option {fuse_shown[0]!r}; see 'shiftfs mount --help' for the options shiftfs understands"
        )
    cfg.from_mount_table = bool(fuse_shown)
    if cfg.remount:
        if xattr:
            cfg.daemon_opts.insert(0, "--xattr")
        if maps:
            cfg.daemon_opts.insert(0, "--map")
        # parsed like a mount, so a remount can tell options equal to the live ones (shiftfs.fs.remount)
        try:
            cfg.uids, cfg.gids = parse_map_args(maps, uidmap, gidmap)
        except IdMapError as e:
            raise UsageError(str(e)) from None
        if cfg.shared and not cache_given:
            cfg.cache = "never"
        return cfg
    if cfg.shared:
        _coherent(cfg, cache_given, writeback_given)
    if not writeback_given and cfg.cache != "always":
        # With a writeback cache the kernel trusts its own file sizes and
        # mtimes, so changes made to SOURCE behind the mount would not show.
        cfg.writeback = False
    try:
        cfg.uids, cfg.gids = parse_map_args(maps, uidmap, gidmap)
    except IdMapError as e:
        raise UsageError(str(e)) from None
    return cfg
