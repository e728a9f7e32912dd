"""The daemon: backgrounding, logging, signals and the main loop.

``shiftfs mount`` returns only once the mount is live: the foreground process
forks the daemon, the daemon mounts and reports back through a pipe, and the
foreground process exits 0 on success or prints the daemon's one-line error
and exits non-zero. With ``-f`` the daemon stays in the foreground and logs to
stderr; in the background it logs to syslog (``/dev/log``) or to the file
named by ``-o log=FILE``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import sys

import pyfuse3
import trio

from ..errors import MountError
from ..ownership.xattr import XattrPolicy
from . import isolate, loop, sourcelock
from .control import serve_control  # up front: once isolated, the daemon can import nothing
from .mount import build_operations, check, kernel_options
from .ops import Operations
from .options import MountConfig
from .remount import apply_late_flags

__all__ = ["mount", "run_daemon"]

log = logging.getLogger("shiftfs")


def _setup_logging(cfg: MountConfig, background: bool) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
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
    """shiftfs.log of the *real* user behind the daemon (inside a user
    namespace euid 0 is that user): in $XDG_RUNTIME_DIR, else in
    ~/.cache/shiftfs, else in a 0700 /tmp/shiftfs-UID; never in a file or
    directory another user owns (/tmp/shiftfs-0.log was shared by every
    user's namespace)."""
    import pwd

    uid = sourcelock.host_uid()
    dirs = [(os.environ.get("XDG_RUNTIME_DIR") or "", False)]
    try:
        dirs.append((os.path.join(pwd.getpwuid(uid).pw_dir, ".cache", "shiftfs"), True))
    except KeyError:
        pass
    dirs.append((f"/tmp/shiftfs-{uid}", True))
    for d, create in dirs:
        try:
            if not d.startswith("/"):
                continue
            if create:
                os.makedirs(d, mode=0o700, exist_ok=True)
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(dfd)
                if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                    continue
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open("shiftfs.log", flags, 0o600, dir_fd=dfd)
            finally:
                os.close(dfd)
            return logging.StreamHandler(os.fdopen(fd, "a"))
        except OSError:
            continue
    return logging.NullHandler()


def _write_stats(ops: Operations, path: str | None) -> None:
    if not path:
        return
    try:
        closer = ops.table.closer
        cpu = os.times()
        data = {
            "counts": dict(ops.counts),
            "inodes": len(ops.table),
            "closer": {"handed": closer.handed, "closed": closer.closed},
            # releases that started their file's writeback (shiftfs.fs.filedata)
            "early_writeback": ops.writebacks_started,
            # the daemon's own CPU since it forked off (user, system), for builds whose daemon
            # no one else can see
            "cpu_s": {"user": round(cpu.user, 3), "system": round(cpu.system, 3)},
        }
        # NAME itself is not followed either (see isolate.reachable); umask is 0 here
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
    except OSError as e:
        log.warning("cannot write stats to %s: %s", path, e)


async def _serve(ops: Operations, cfg: MountConfig) -> None:
    # The receiver is open before the first request is served: the request
    # loop may serve many requests before trio runs another task
    # (shiftfs.fs.loop), and until the receiver is open a SIGINT is trio's
    # KeyboardInterrupt, raised wherever the loop happens to be.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as received:
        await _serve_with(ops, cfg, received)


async def _serve_with(ops: Operations, cfg: MountConfig, received) -> None:
    async def signals() -> None:
        async for sig in received:
            if sig == signal.SIGUSR1:
                _write_stats(ops, cfg.stats)
                continue
            log.info("signal %d: unmounting", sig)
            pyfuse3.terminate()
            return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(signals)
        if cfg.control_fd is not None:
            nursery.start_soon(serve_control, ops, cfg.control_fd)
        # Handlers never yield (every backing call is a plain syscall), so more
        # trio tasks only add scheduling: one task measured ~20% less time per
        # request than eight (stat storm, cache=never, interleaved A/B). With
        # one task the loop can skip trio's scheduler too (shiftfs.fs.loop).
        loop.install(spin_us=cfg.spin_us)
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
    lock = None
    inited = False
    try:
        root_fd = os.open(cfg.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # Held for our whole life, released by the kernel when we die (shiftfs.fs.sourcelock);
        # opened through root_fd, so it locks exactly the directory we serve.
        lock = sourcelock.SourceLock(f"/proc/self/fd/{root_fd}", cfg.shared, cfg.source)
        ops = build_operations(cfg, root_fd)
        with _StderrCapture() as cap:
            try:
                # -o fuse_fd: the launcher mounted the view from the container's user
                # namespace (shiftfs.container.inner); libfuse serves /dev/fd/N as given.
                where = cfg.mountpoint if cfg.fuse_fd is None else f"/dev/fd/{cfg.fuse_fd}"
                pyfuse3.init(ops, where, kernel_options(cfg))
            finally:
                captured = cap.text()
        inited = True
        apply_late_flags(cfg.mountpoint, cfg.kernel_opts)
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
        if inited:
            pyfuse3.close(unmount=True)
        if lock is not None:
            lock.release()
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
    if cfg.read_ahead_kb > 0 and cfg.fuse_fd is None:  # else the launcher tunes it
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
    lock.announce(cfg.mountpoint)  # its note directory is opened now, while it has a name
    isolation = isolate.isolate_daemon(root_fd, cfg.mountpoint)
    if isolation is not None and isinstance(ops.policy, XattrPolicy):  # built exactly when cfg.xattr
        ops.policy.store.close()  # SQLite named its files from outside; it reopens them from inside
    report("ok")
    log.info("mounted %s on %s (%s mode)", cfg.source, cfg.mountpoint, "xattr" if cfg.xattr else "table")
    for note in cfg.notes:
        log.warning("%s", note)
    if captured.strip():
        log.warning("while mounting: %s", " / ".join(ln.strip() for ln in captured.splitlines() if ln.strip()))
    clean = False
    try:
        trio.run(_serve, ops, cfg)
        clean = True
    except BaseException:
        log.exception("main loop failed")
    finally:
        ops.table.closer.drain()  # removed inodes' descriptors still queued (shiftfs.fs.closer)
        _write_stats(ops, cfg.stats)
        try:
            pyfuse3.close(unmount=isolation is None)
        except Exception:
            pass
        if isolation is not None:
            isolation.unmount_served()
        lock.release()
    log.info("unmounted %s", cfg.mountpoint)
    return 0 if clean else 1


def mount(cfg: MountConfig) -> int:
    """``shiftfs mount``: check, then serve in the foreground or background."""
    from . import idmapped

    if cfg.fuse_fd is None and idmapped.wanted(cfg):
        check(cfg, fuse=False)
        if idmapped.try_mount(cfg):  # table mode as an idmapped bind mount: no daemon
            return 0
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
        f"cannot mount {cfg.source} on {cfg.mountpoint}: "
        f"{msg.removeprefix('error: ') or 'the daemon died before mounting'}"
    )
