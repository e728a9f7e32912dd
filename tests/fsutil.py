"""The one mount helper of the tests, and what it stands on: the mount table and daemon tracking.

Everything goes through the ``shiftfs`` command line and the kernel: a test
mounts with :class:`Mount` (or :func:`mount_shiftfs`, or conftest's
``shiftfs_mount`` fixture), then uses ordinary syscalls or tools on the mount
point. No mocks.

* :class:`Mount` — ``shiftfs mount`` (background form), wait until the mount
  is live; unmount, remount, and on the way out (also when the test failed)
  detach lazily and make sure the daemon *it started* is gone.
* :func:`make_scratch` / :func:`remove_scratch` — world-searchable scratch
  directories, removed only once nothing is mounted below them.

Acting as other users (``run_as``, ``py_as``) lives in ``asuser.py``, the
syscalls Python lacks in ``sysx.py``, records in ``records.py``.

The mount table and daemon tracking (:func:`spawn_daemons`, :func:`reap`)
live in ``mounttab.py``; the daemon a :class:`Mount` starts is our child, so
it is waited for, never signalled by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from asuser import USER_ENV
from mounttab import (  # noqa: F401  (re-exported: the tests' one import for mounting)
    MountInfo,
    _exited,
    _proc_state,
    find_mount,
    is_mounted,
    mountinfo,
    reap,
    shiftfs_pids,
    spawn_daemons,
    unmount_lazy,
    wait_for,
    wait_until,
)

#: The project's ``shiftfs`` command (the venv's console script).
SHIFTFS = str(Path(sys.executable).with_name("shiftfs"))
#: The usual container map: disk 100000+k is view k, for k < 65536.
MAP = "b:100000:0:65536"
#: The command-line arguments of each mode, for the tests that run in both (conftest's ``mode`` fixture).
MODE_ARGS = {"table": ("--map", MAP), "xattr": ("--xattr",)}
#: The usual container map as numbers: disk ``MAP_BASE + k`` is view ``k`` for ``k < MAP_COUNT``.
MAP_BASE, MAP_COUNT = 100000, 65536


def have(*cmds: str) -> bool:
    return all(shutil.which(c) for c in cmds)


def need(*cmds: str) -> None:
    """Skip the test, naming them, unless every command is on PATH."""
    missing = [c for c in cmds if not shutil.which(c)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


# -- mounting ----------------------------------------------------------------------

#: Every :class:`Mount` that mounted, in order: the conftest shows the logs of those a failed test used.
MOUNTS: list[Mount] = []


def _opt_groups(args) -> list[str]:
    """The ``-o`` option words in ``args``, in order."""
    args = list(args)
    out = []
    for i, a in enumerate(args):
        group = args[i + 1] if a == "-o" and i + 1 < len(args) else a[2:] if a.startswith("-o") else ""
        out += [o for o in group.split(",") if o]
    return out


def _has_opt(args, name: str) -> bool:
    return any(o.partition("=")[0] == name for o in _opt_groups(args))


def _opt_value(args, name: str) -> str | None:
    """The value of the last ``-o name=VALUE`` in ``args``."""
    val = None
    for o in _opt_groups(args):
        k, eq, v = o.partition("=")
        if k == name and eq:
            val = v
    return val


class Mount:
    """A shiftfs mount made through the CLI (``shiftfs mount``, background form): the one mount helper.

    ``Mount(SRC, MP, *ARGS, **options).mount()``, or ``with Mount(...) as m:``
    (mounts, and on the way out detaches lazily and reaps the daemon), or
    :func:`mount_shiftfs`. ``ARGS`` go to the command line as they are
    (``"--map", MAP``, ``"--xattr"``, ``"-o", "cache=never"``). What differs
    between tests is an option:

    * ``mode``: ``"table"`` adds ``--map`` for each of ``maps`` (default
      :data:`MAP`), ``"xattr"`` adds ``--xattr`` (and ``maps`` if given);
      ``opts`` are ``-o`` words.
    * ``as_uid``/``as_gid`` run the mount (so the daemon) as that user;
      ``nofile`` runs it under ``prlimit --nofile``.
    * ``log``: ``-o log=`` goes to ``MP.log`` (or the path given; ``False``:
      no log file) unless the arguments name one; ``stats=True`` adds
      ``-o stats=MP.stats.json``.
    * ``check_log``: whether a traceback or "unexpected error" in the daemon's
      log fails the test when it unmounts (off for tests that provoke them).

    Tests are FUSE-engine tests (``-o backend=fuse``) unless they pick a backend;
    ``backend=kernel`` is an idmapped bind mount: no daemon, no log. The daemon
    is our child (see :func:`spawn_daemons`), so it is waited for, never
    signalled by name. The log policy is one for every mount: a failing test
    shows the logs of the mounts it used (``conftest.py``).
    """

    def __init__(
        self,
        source,
        mountpoint,
        *args,
        mode: str | None = None,
        maps=None,
        opts=(),
        as_uid: int | None = None,
        as_gid: int | None = None,
        log: bool | str | os.PathLike = True,
        stats: bool = False,
        nofile: int | None = None,
        check_log: bool = True,
        timeout: float = 60,
    ) -> None:
        assert mode in (None, "table", "xattr"), mode
        self.source = os.path.abspath(str(source))
        self.mountpoint = os.path.abspath(str(mountpoint))
        self.mode = mode
        self.args = [str(a) for a in args]
        if mode == "xattr":
            self.args.insert(0, "--xattr")
        for m in [MAP] if maps is None and mode == "table" else list(maps or []):
            self.args += ["--map", m]
        if opts:
            self.args += ["-o", ",".join(opts)]
        self.as_uid, self.as_gid, self.nofile = as_uid, as_gid, nofile
        self.check_log, self.timeout = check_log, timeout
        self.kernel = _opt_value(self.args, "backend") == "kernel"
        self.extra = [] if _has_opt(self.args, "backend") else ["backend=fuse"]
        fg = "-f" in self.args or "--foreground" in self.args
        self.log: str | None = _opt_value(self.args, "log")
        if log and not self.kernel and not fg and self.log is None:
            self.log = self.mountpoint.rstrip("/") + ".log" if log is True else os.path.abspath(str(log))
            self.extra.append(f"log={self.log}")
        self.stats: str | None = _opt_value(self.args, "stats")
        if stats and self.stats is None:
            self.stats = self.mountpoint.rstrip("/") + ".stats.json"
            self.extra.append(f"stats={self.stats}")
        self.pids: list[int] = []
        self.status: int | None = None  # wait status of the daemon once it exited

    # -- the daemon -------------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert len(self.pids) == 1, f"expected one daemon, have {self.pids}"
        return self.pids[0]

    @pid.setter
    def pid(self, pid: int | None) -> None:
        """Adopt a daemon started by other means (``None``: the test reaped it itself)."""
        self.pids = [] if pid is None else [pid]
        self.status = None

    def command(self) -> list[str]:
        cmd = [SHIFTFS, "mount", *self.args] + (["-o", ",".join(self.extra)] if self.extra else [])
        cmd += [self.source, self.mountpoint]
        if self.nofile:
            cmd = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--"] + cmd
        if self.as_uid is not None:
            gid = self.as_uid if self.as_gid is None else self.as_gid
            cmd = ["setpriv", f"--reuid={self.as_uid}", f"--regid={gid}", "--clear-groups", "--"] + cmd
        return cmd

    def mount(self) -> Mount:
        """Mount; fails the test (AssertionError, with the command's stderr) unless exactly one daemon serves it."""
        with contextlib.suppress(FileExistsError):  # (also a stale mount point, which stats as ENOTCONN)
            os.mkdir(self.mountpoint)
        env = None
        if self.as_uid is not None:
            env = USER_ENV
            if self.log:  # the daemon runs as that user: let it write its log
                with open(self.log, "a"):
                    pass
                os.chown(self.log, self.as_uid, self.as_uid if self.as_gid is None else self.as_gid)
        cmd = self.command()
        r, self.pids = spawn_daemons(cmd, env=env, timeout=self.timeout)
        self.status = None
        if self not in MOUNTS:
            MOUNTS.append(self)
        try:
            if r.returncode != 0:
                raise AssertionError(f"mount failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr.strip()}")
            if not is_mounted(self.mountpoint):
                raise AssertionError(f"'shiftfs mount' exited 0 but {self.mountpoint} is not mounted\n{r.stderr}")
            if len(self.pids) != (0 if self.kernel else 1):
                raise AssertionError(f"expected {0 if self.kernel else 1} daemon process(es), found {self.pids}")
            if not self.kernel and shiftfs_pids(self.mountpoint) != self.pids:
                raise AssertionError(f"expected one daemon for {self.mountpoint}: {shiftfs_pids(self.mountpoint)}")
        except BaseException:
            self.cleanup()
            raise
        return self

    def alive(self) -> bool:
        """Whether the daemon still runs (reaps it, keeping its status, if it exited)."""
        if self.status is not None:
            return False
        if self.kernel:  # no daemon: alive while mounted
            m = find_mount(self.mountpoint)
            return m is not None and "idmapped" in m.options
        running = False
        for p in self.pids:
            st = _exited(p)
            if st is None:
                running = True
            elif st == -1:  # not our child: look at its state
                running = running or _proc_state(p) not in ("", "Z", "X")
            else:
                self.status = st
        return running

    def wait_exit(self, timeout: float = 10.0) -> int | None:
        """Wait for the daemon to exit by itself; its wait status (None if still running)."""
        for p in self.pids:
            st = reap(p, timeout, kill=False)
            if st is None:
                return None
            self.status = st
        return self.status

    # -- unmounting ---------------------------------------------------------------------
    def umount(self, lazy: bool = False, check: bool = True) -> subprocess.CompletedProcess | None:
        """``shiftfs umount`` (retried while busy, up to 10 s), then wait for the daemon to exit.

        Returns the last ``shiftfs umount`` result (None if nothing was mounted).
        If the mount stays, it is detached lazily and (``check``) the test fails.
        """
        r = None
        deadline = time.monotonic() + 10
        while is_mounted(self.mountpoint):
            argv = [SHIFTFS, "umount"] + (["--lazy"] if lazy else []) + [self.mountpoint]
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if is_mounted(self.mountpoint) and (r is None or r.returncode != 0):
            unmount_lazy(self.mountpoint)
            if check:
                raise AssertionError(f"cannot unmount {self.mountpoint}: {r.stderr.strip() if r else ''}")
        self._reap(20.0)
        self.assert_log_clean()
        return r

    def remount(self) -> Mount:
        self.umount()
        return self.mount()

    def cleanup(self) -> None:
        """Detach the mount lazily and make sure our daemon is gone (idempotent)."""
        m = find_mount(self.mountpoint)
        if m is not None and (m.fstype.startswith("fuse") or (self.kernel and "idmapped" in m.options)):
            unmount_lazy(self.mountpoint)
        self._reap(10.0)

    def _reap(self, timeout: float) -> None:
        if self.status is None:
            for p in self.pids:
                st = reap(p, timeout, kill=True)
                if st is not None:
                    self.status = st

    def __enter__(self) -> Mount:
        return self.mount()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.cleanup()
        if exc_type is None:
            self.assert_log_clean()

    # -- looking at it -----------------------------------------------------------------
    @property
    def info(self) -> MountInfo | None:
        return find_mount(self.mountpoint)

    def path(self, *parts) -> str:
        return os.path.join(self.mountpoint, *map(str, parts))

    def backing(self, *parts) -> str:
        return os.path.join(self.source, *map(str, parts))

    def log_text(self) -> str:
        if not self.log:
            return ""
        try:
            return Path(self.log).read_text(errors="replace")
        except OSError:
            return ""

    def bad_log_lines(self) -> list[str]:
        """Log lines that report an unexpected error (traceback, ERROR, 'unexpected')."""
        return [
            ln
            for ln in self.log_text().splitlines()
            if "ERROR" in ln or "Traceback" in ln or "unexpected" in ln.lower() or "CRITICAL" in ln
        ]

    def assert_log_clean(self) -> None:
        """With ``check_log``: an engine bug turned into EIO (a traceback, "unexpected error") fails the test."""
        text = self.log_text() if self.check_log else ""
        if "Traceback" in text or "unexpected error" in text:
            raise AssertionError(f"the daemon logged an unexpected error:\n{text[-4000:]}")

    def read_stats(self) -> dict:
        """Ask the daemon to write its counters (``-o stats=``) and read them."""
        stats = self.stats
        assert stats, "mounted without stats"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stats)
        os.kill(self.pid, signal.SIGUSR1)
        wait_for(lambda: os.path.exists(stats) and os.path.getsize(stats) > 0, 10, what="stats file")
        time.sleep(0.05)
        return json.loads(Path(stats).read_text())


@contextlib.contextmanager
def mount_shiftfs(source, mountpoint, *args, **options) -> Iterator[Mount]:
    """``with mount_shiftfs(SRC, MP, *ARGS, **options) as m``: a :class:`Mount`, mounted for the block."""
    with Mount(source, mountpoint, *args, **options) as m:
        yield m


# -- scratch directories -------------------------------------------------------------


def make_scratch(prefix: str = "shiftfs-test-", base: str | None = None) -> Path:
    """A fresh world-searchable directory (0755) so other users can reach mounts in it."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base or os.environ.get("SHIFTFS_TEST_DIR") or "/var/tmp"))
    d.chmod(0o755)
    return d


def remove_scratch(d) -> None:
    """Remove a scratch dir, after detaching anything still mounted below it."""
    d = os.path.abspath(str(d))
    for m in sorted(mountinfo(), key=lambda m: -len(m.mountpoint)):
        if m.mountpoint == d or m.mountpoint.startswith(d + "/"):
            unmount_lazy(m.mountpoint)
    if any(m.mountpoint == d or m.mountpoint.startswith(d + "/") for m in mountinfo()):
        return  # never recurse into a live mount
    subprocess.run(["chattr", "-R", "-i", d], capture_output=True)  # in case a test made something immutable
    shutil.rmtree(d, ignore_errors=True)
