"""Mounting: option parsing, checks, backgrounding and the daemon's main loop.

``shiftfs mount`` returns only once the mount is live: the foreground process
forks the daemon, the daemon mounts and reports back through a pipe, and the
foreground process exits 0 on success or prints the daemon's one-line error
and exits non-zero. With ``-f`` the daemon stays in the foreground and logs to
stderr; in the background it logs to syslog (``/dev/log``) or to the file
named by ``-o log=FILE``.
"""

from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field

import pyfuse3
import trio

from .fs import isolate
from .idmap import IdMap, IdMapError, parse_map_args
from .ops import CacheConfig, Operations
from .policy import OwnershipPolicy, TablePolicy, XattrPolicy
from .store import RecordStore

__all__ = ["MountConfig", "UsageError", "MountError", "parse_options", "mount", "unmount", "is_shiftfs_mount"]

log = logging.getLogger("shiftfs")

# Options passed to the kernel / libfuse as they are.
_KERNEL_FLAGS = {
    "allow_other", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "ro", "rw",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nodiratime",
    "sync", "async", "dirsync", "auto_unmount",
}
# mount(8)/fstab words that mean nothing to us.
_IGNORED = {"defaults", "auto", "noauto", "user", "nouser", "users", "nofail", "_netdev", "default_permissions"}


class UsageError(Exception):
    """Bad input from the user (exit status 2); the message names the fix."""


class MountError(Exception):
    """The mount failed (exit status 1); the message says why."""


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


def parse_options(opts: list[str], maps: list[str], xattr: bool, source: str, mountpoint: str) -> MountConfig:
    """Turn ``-o`` lists and ``--map`` arguments into a :class:`MountConfig`."""
    cfg = MountConfig(source=source, mountpoint=mountpoint, xattr=xattr)
    writeback_given = False
    uidmap = gidmap = None
    for group in opts:
        for opt in group.split(","):
            opt = opt.strip()
            if not opt:
                continue
            key, eq, val = opt.partition("=")
            if key in _IGNORED or key.startswith("x-") or key.startswith("X-") or key == "comment":
                continue
            if key in _KERNEL_FLAGS and not eq:
                cfg.kernel_opts.append(key)
            elif key == "xattr" and not eq:
                cfg.xattr = True
            elif key == "uidmap" and eq:
                uidmap = val
            elif key == "gidmap" and eq:
                gidmap = val
            elif key == "cache" and eq:
                if val not in CacheConfig.MODES:
                    raise UsageError(f"bad -o cache={val}: use cache=always, cache=auto or cache=never")
                cfg.cache = val
            elif key == "default_owner" and eq:
                try:
                    u, _, g = val.partition(":")
                    cfg.default_owner = (int(u), int(g or u))
                except ValueError:
                    raise UsageError(f"bad -o default_owner={val}: give numeric UID:GID, e.g. default_owner=0:0") from None
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
                    raise UsageError(f"bad -o read_ahead_kb={val}: give a number of KiB, e.g. read_ahead_kb=1024") from None
            elif key == "xattr_probes" and val in ("on", "off"):
                cfg.xattr_probes = val == "on"
            else:
                raise UsageError(
                    f"unknown -o option {opt!r}; see 'shiftfs mount --help' for the options shiftfs understands"
                )
    if not writeback_given and cfg.cache != "always":
        # With a writeback cache the kernel trusts its own file sizes and
        # mtimes, so changes made to SOURCE behind the mount would not show.
        cfg.writeback = False
    try:
        cfg.uids, cfg.gids = parse_map_args(maps, uidmap, gidmap)
    except IdMapError as e:
        raise UsageError(str(e)) from None
    return cfg


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount we can see."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                fstype = right.split()[0] if right else ""
                mp = parts[4].encode().decode("unicode_escape")
                out.append((mp, fstype))
    except OSError:
        pass
    return out


def is_shiftfs_mount(path: str) -> bool:
    path = os.path.abspath(path)
    return any(mp == path and t == "fuse.shiftfs" for mp, t in _mountinfo())


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount a shiftfs mount (``fusermount3 -u`` or umount2 as root)."""
    mp = os.path.abspath(mountpoint)
    # Decide from the mount table alone: a stat of the mount point would ask
    # the daemon, and a hung (or stopped) daemon would hang us with it.
    if not is_shiftfs_mount(mp):
        try:
            os.lstat(mp)
        except FileNotFoundError:
            raise UsageError(f"mount point {mountpoint} does not exist; give the directory shiftfs is mounted on") from None
        except OSError:
            pass
        raise UsageError(f"{mountpoint} is not a shiftfs mount; see 'findmnt -t fuse.shiftfs' for mounts")
    fm = shutil.which("fusermount3")
    if fm:
        cmd = [fm, "-u"] + (["-z"] if lazy else []) + [mp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return
        err = r.stderr.strip()
    else:
        err = "fusermount3 not found"
    if os.geteuid() == 0:
        r = subprocess.run(["umount"] + (["-l"] if lazy else []) + [mp], capture_output=True, text=True)
        if r.returncode == 0:
            return
        err = r.stderr.strip() or err
    raise MountError(f"cannot unmount {mountpoint}: {err}; close programs using it or use 'shiftfs umount --lazy'")


def _in_init_userns() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def check(cfg: MountConfig) -> None:
    """Validate inputs before forking; raises :class:`UsageError`."""
    src, mp = cfg.source, cfg.mountpoint
    if not os.path.exists(src):
        raise UsageError(f"SOURCE {src} does not exist; give an existing directory to shift")
    if not os.path.isdir(src):
        raise UsageError(f"SOURCE {src} is not a directory; give a directory to shift")
    if not os.access(src, os.R_OK | os.X_OK):
        raise UsageError(f"SOURCE {src} is not readable by uid {os.geteuid()}; fix its permissions or mount as its owner")
    try:
        st = os.stat(mp)
        if is_shiftfs_mount(mp):
            # stat may be answered from the kernel's cache; statfs always asks
            # the daemon, so a dead one shows as ENOTCONN here
            os.statvfs(mp)
    except FileNotFoundError:
        raise UsageError(f"MOUNTPOINT {mp} does not exist; create it with 'mkdir -p {mp}'") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN and is_shiftfs_mount(mp):
            log.info("%s is a stale shiftfs mount (daemon gone); unmounting it first", mp)
            try:
                unmount(mp, lazy=True)
            except (MountError, UsageError) as e2:
                raise UsageError(f"MOUNTPOINT {mp} is a stale mount that cannot be cleared: {e2}") from None
            st = os.stat(mp)
        else:
            raise UsageError(f"MOUNTPOINT {mp} is not usable ({e.strerror}); unmount or recreate it") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"MOUNTPOINT {mp} is not a directory; mount on a directory")
    if is_shiftfs_mount(mp):
        raise UsageError(f"{mp} is already a shiftfs mount; unmount it first with 'shiftfs umount {mp}'")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing; load the fuse module ('modprobe fuse') or give the container /dev/fuse")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UsageError(
            "/dev/fuse is not accessible to this user; run 'make setup' as root (makes it 0666 as udev does) or 'chmod 0666 /dev/fuse'"
        )
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        raise UsageError("fusermount3 is missing; install it with 'apt-get install fuse3'")
    if cfg.xattr and cfg.default_owner is None:
        pass


def _kernel_options(cfg: MountConfig) -> set[str]:
    opts = {"default_permissions", "subtype=shiftfs", f"fsname={cfg.fsname or os.path.abspath(cfg.source)}"}
    flags = list(cfg.kernel_opts)
    if os.geteuid() == 0 and "allow_other" not in flags:
        flags.append("allow_other")
    # Outside a user namespace a setuid file shown as view uid 0 would be
    # real root: nosuid,nodev unless asked. Inside one, ids are the namespace's.
    if not _in_init_userns():
        if "nosuid" not in flags and "suid" not in flags:
            flags.append("suid")
    for f in flags:
        if f == "rw":
            continue
        if f in ("nosuid", "nodev", "exec", "atime", "norelatime", "async"):
            continue  # libfuse's defaults already
        opts.add(f)
    return opts


def build_operations(cfg: MountConfig, root_fd: int) -> Operations:
    policy: OwnershipPolicy
    if cfg.xattr:
        store = RecordStore.open(root_fd, create=True, write_legacy=cfg.legacy_xattr)
        policy = XattrPolicy(cfg.uids, cfg.gids, store, cfg.default_owner)
    else:
        policy = TablePolicy(cfg.uids, cfg.gids)
    ops = Operations(
        root_fd, policy, CacheConfig(cfg.cache), trace=cfg.debug, writeback=cfg.writeback, xattr_probes=cfg.xattr_probes
    )
    # Let the kernel enforce POSIX ACLs (FUSE_POSIX_ACL): without it,
    # default_permissions checks the mode bits only, and a named-user entry
    # that denies access (u:1000:---) is ignored through the mount. The
    # backing filesystem (table mode) or the policy (xattr mode) keeps the
    # mask in step with chmod.
    ops.enable_acl = True
    return ops


def _setup_logging(cfg: MountConfig, background: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level = logging.DEBUG if cfg.debug else logging.INFO
    tag = f"shiftfs[{os.getpid()}] {os.path.abspath(cfg.mountpoint)}: "
    if not background:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("shiftfs: %(levelname)s %(message)s"))
    elif cfg.logfile:
        # The daemon runs with umask 0: create the log 0644, not world-writable.
        fd = os.open(cfg.logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        h = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
        h.setFormatter(logging.Formatter("%(asctime)s " + tag + "%(levelname)s %(message)s"))
    elif os.path.exists("/dev/log"):
        h = logging.handlers.SysLogHandler("/dev/log")
        h.setFormatter(logging.Formatter(tag + "%(levelname)s %(message)s"))
    else:
        h = _default_log_file()
        h.setFormatter(logging.Formatter("%(asctime)s " + tag + "%(levelname)s %(message)s"))
    root.addHandler(h)
    root.setLevel(level)


def _default_log_file() -> logging.Handler:
    """~/.cache/shiftfs/shiftfs.log of the daemon's user, else a file in /tmp."""
    import pwd

    try:
        home = pwd.getpwuid(os.geteuid()).pw_dir
        d = os.path.join(home, ".cache", "shiftfs")
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(d, "shiftfs.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        return logging.StreamHandler(os.fdopen(fd, "a"))
    except (KeyError, OSError):
        pass
    try:
        fd = os.open(f"/tmp/shiftfs-{os.geteuid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        return logging.StreamHandler(os.fdopen(fd, "a"))
    except OSError:
        return logging.NullHandler()


def _write_stats(ops: Operations, path: str | None) -> None:
    if not path:
        return
    try:
        data = {"counts": dict(ops.counts), "inodes": len(ops.table)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)  # umask is 0 here
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
    except OSError as e:
        log.warning("cannot write stats to %s: %s", path, e)


async def _serve(ops: Operations, cfg: MountConfig) -> None:
    async def signals(cancel_scope):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as it:
            async for sig in it:
                if sig == signal.SIGUSR1:
                    _write_stats(ops, cfg.stats)
                    continue
                log.info("signal %d: unmounting", sig)
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(signals, nursery.cancel_scope)
        # Handlers never yield (every backing call is a plain syscall), so more
        # trio tasks only add scheduling: one task measured ~20% less time per
        # request than eight (stat storm, cache=never, interleaved A/B).
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


def _raise_fd_limit() -> None:
    """We hold one O_PATH descriptor per inode the kernel knows: allow many."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = max(hard, int(f.read()))
        except (OSError, ValueError):
            pass
    for limit in ((want, want), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            return
        except (ValueError, OSError):
            continue


class _StderrCapture:
    """Collect what libfuse and its fusermount3 child write to fd 2 while mounting.

    The messages become part of our one-line error instead of extra lines
    on the user's terminal; anything said on success is logged later.
    """

    def __enter__(self):
        import tempfile

        self._buf = tempfile.TemporaryFile()
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        self._saved = os.dup(2)
        os.dup2(self._buf.fileno(), 2)
        return self

    def text(self) -> str:
        try:
            self._buf.seek(0)
            return self._buf.read(8192).decode(errors="replace")
        except OSError:
            return ""

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._buf.close()
        return False


def _tune_readahead(mountpoint: str, kb: int) -> None:
    """Raise the read-ahead of our FUSE bdi (128 KiB by default: small READs).

    Runs in a thread once the loop serves requests (the stat is answered by
    us); only root in the initial namespace may write sysfs, others skip.
    """
    try:
        st = os.stat(mountpoint)
        path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(kb))
        log.debug("set %s to %d", path, kb)
    except OSError as e:
        log.debug("read_ahead_kb left alone: %s", e)


def run_daemon(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Mount and serve until unmounted. Reports readiness on ``ready_fd``."""

    def report(msg: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, msg.encode()[:4000])
                os.close(ready_fd)
            except OSError:
                pass

    os.umask(0)
    _raise_fd_limit()
    captured = ""
    try:
        root_fd = os.open(cfg.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        ops = build_operations(cfg, root_fd)
        with _StderrCapture() as cap:
            try:
                pyfuse3.init(ops, cfg.mountpoint, _kernel_options(cfg))
            finally:
                captured = cap.text()
    except Exception as e:  # report any failure to the foreground process
        msg = str(e) or e.__class__.__name__
        # libfuse and fusermount3 say what went wrong on stderr ("fusermount3:
        # user has no write access to mountpoint ..."): that line is the reason.
        said = [ln.strip() for ln in captured.splitlines() if ln.strip()]
        if said:
            msg = f"{msg}: {said[-1]}"
        elif "fuse" in msg.lower() and os.geteuid() != 0:
            msg += " (is user_allow_other set in /etc/fuse.conf, and /dev/fuse 0666?)"
        report("error: " + msg)
        if ready_fd is None:
            raise MountError(f"cannot mount {cfg.source} on {cfg.mountpoint}: {msg}") from None
        return 1
    if ready_fd is not None:
        try:
            _setup_logging(cfg, background=True)
        except Exception as e:
            report(f"error: cannot set up logging: {e}; give -o log=FILE")
            pyfuse3.close(unmount=True)
            return 1
    if cfg.read_ahead_kb > 0:
        import threading

        # Started before isolating: this thread stays in the served namespace, where /sys is.
        threading.Thread(
            target=_tune_readahead, args=(os.path.abspath(cfg.mountpoint), cfg.read_ahead_kb), daemon=True
        ).start()
    if ready_fd is not None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
    # Before reporting ready: from then on the user may pivot_root into the view.
    cfg.stats = isolate.reachable(cfg.stats)
    isolation = isolate.isolate_daemon(root_fd, cfg.mountpoint)
    if isolation is not None and cfg.xattr:
        ops.policy.store.close()  # SQLite named its files from outside; it reopens them from inside
    report("ok")
    log.info("mounted %s on %s (%s mode)", cfg.source, cfg.mountpoint, "xattr" if cfg.xattr else "table")
    if captured.strip():
        log.warning("while mounting: %s", " / ".join(ln.strip() for ln in captured.splitlines() if ln.strip()))
    clean = False
    try:
        trio.run(_serve, ops, cfg)
        clean = True
    except BaseException:
        log.exception("main loop failed")
    finally:
        _write_stats(ops, cfg.stats)
        try:
            pyfuse3.close(unmount=isolation is None)
        except Exception:
            pass
        if isolation is not None:
            isolation.unmount_served()
    log.info("unmounted %s", cfg.mountpoint)
    return 0 if clean else 1


def mount(cfg: MountConfig) -> int:
    """``shiftfs mount``: check, then serve in the foreground or background."""
    check(cfg)
    if cfg.foreground:
        _setup_logging(cfg, background=False)
        return run_daemon(cfg)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # daemon
        os.close(r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        rc = 1
        try:
            rc = run_daemon(cfg, ready_fd=w)
        finally:
            os._exit(rc)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    msg = b"".join(chunks).decode(errors="replace")
    if msg == "ok":
        return 0
    raise MountError(
        f"cannot mount {cfg.source} on {cfg.mountpoint}: {msg.removeprefix('error: ') or 'the daemon died before mounting'}"
    )
