"""The mount table and the daemons the tests start: what ``fsutil.Mount`` stands on.

* :func:`mountinfo` / :func:`find_mount` / :func:`is_mounted` read
  ``/proc/self/mountinfo``; :func:`unmount_lazy` detaches whatever is on a
  mount point.
* :func:`spawn_daemons` runs a mounting command and learns the pid(s) of the
  daemon(s) it left behind; :func:`reap` waits for one (then SIGTERM, SIGKILL).

How daemons are tracked: ``shiftfs mount`` forks twice and the daemon's
parent exits, so the daemon would be re-parented to pid 1. While a mount
command runs we make this process a *child subreaper* (``prctl``), so the
daemon becomes our child instead: we know its pid exactly, can wait for it,
read its exit status, and never have to signal anything by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

# -- mount table -----------------------------------------------------------------


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return s.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


@dataclass
class MountInfo:
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    dev: str
    root: str
    mountpoint: str
    options: list[str]
    fstype: str
    source: str
    super_options: list[str]


def mountinfo(pid: str = "self") -> list[MountInfo]:
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            p = left.split()
            r = right.split()
            out.append(
                MountInfo(
                    int(p[0]),
                    p[2],
                    _unescape(p[3]),
                    _unescape(p[4]),
                    p[5].split(","),
                    r[0],
                    _unescape(r[1]) if len(r) > 1 else "",
                    r[2].split(",") if len(r) > 2 else [],
                )
            )
    return out


def find_mount(mp) -> MountInfo | None:
    """The topmost mount on ``mp`` (absolute path), or None."""
    mp = os.path.abspath(str(mp))
    found = None
    for m in mountinfo():
        if m.mountpoint == mp:
            found = m
    return found


def is_mounted(mp, fstype: str | None = None) -> bool:
    """Whether something (of ``fstype``, if given) is mounted on ``mp``."""
    mp = os.path.abspath(str(mp))
    return any(m.mountpoint == mp and (fstype is None or m.fstype == fstype) for m in mountinfo())


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``pred()`` until it returns a true value; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_until(cond, timeout: float = 10.0, step: float = 0.05) -> bool:
    """Poll ``cond()`` until true: True, or False after ``timeout`` s (for ``assert wait_until(...)``)."""
    try:
        wait_for(cond, timeout, step)
    except TimeoutError:
        return False
    return True


# -- daemon tracking -------------------------------------------------------------

_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_subreaper_lock = threading.Lock()


def _children() -> set[int]:
    """Pids whose parent is this process (threads' children included)."""
    me = os.getpid()
    out = set()
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children") as f:
                out.update(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


@contextlib.contextmanager
def adopting() -> Iterator[list[int]]:
    """While the block runs, this process is a child subreaper: processes started in it and
    orphaned (a daemon that double-forks) become our children. Afterwards the list it gave
    holds their pids; the caller owns them: wait for them with :func:`reap`."""
    adopted: list[int] = []
    with _subreaper_lock:
        before = _children()
        if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        try:
            yield adopted
        finally:
            _libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
            adopted.extend(sorted(_children() - before))


def spawn_daemons(cmd, *, env=None, timeout: float = 60, input=None) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run a mounting command; return its result and the pids of the daemons it left (see :func:`adopting`)."""
    with adopting() as new:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=timeout, input=input)
    return r, new


def _exited(pid: int) -> int | None:
    """Reap ``pid`` if it has exited: its wait status, or None while it runs."""
    try:
        p, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1  # not ours (any more): gone
    return status if p == pid else None


def reap(pid: int, timeout: float = 10.0, kill: bool = True) -> int | None:
    """Wait for our child ``pid`` to exit; then (if ``kill``) SIGTERM, then SIGKILL it.

    Returns the wait status (``-1`` when it was not our child), or None if it
    is still running and ``kill`` is false.
    """
    deadline = time.monotonic() + timeout
    while True:
        st = _exited(pid)
        if st is not None:
            return st
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if not kill:
        return None
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            st = _exited(pid)
            if st is not None:
                return st
            time.sleep(0.02)
    return None


def unmount_lazy(mp) -> None:
    """Detach whatever is mounted on ``mp`` (all stacked mounts, stale ones too), never blocking on a daemon."""
    mp = os.path.abspath(str(mp))
    for _ in range(20):
        if not is_mounted(mp):
            return
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", mp], capture_output=True, text=True)
        if is_mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, text=True)
        if is_mounted(mp):
            time.sleep(0.05)


def _proc_state(pid: int) -> str:
    """The state letter of ``pid`` (``R``, ``S``, ``Z`` ...), or "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][:1]
    except OSError:
        return ""


def shiftfs_pids(mp) -> list[int]:
    """Pids of shiftfs daemons serving ``mp`` (cmdline names it and /dev/fuse is open)."""
    mp = os.path.abspath(str(mp))
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if mp.encode() not in argv or not any(b"shiftfs" in a for a in argv[:3]):
                continue
            fds = os.listdir(f"/proc/{p}/fd")
            if any(os.readlink(f"/proc/{p}/fd/{fd}") == "/dev/fuse" for fd in fds):
                out.append(int(p))
        except OSError:
            continue
    return out
