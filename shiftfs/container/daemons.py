"""
The shiftfs daemons of a launch, started by pid 1 of namespace A.

Each daemon is ``shiftfs mount`` run as the daemons' namespace root, serving
the directory open on descriptor 3 (opened before any mount, so never reached
through a view) over the /dev/fuse descriptor B0 mounted the view with
(:mod:`.inner`): the daemon makes no mount of its own (``-o fuse_fd=N``), so
the view belongs to the container's user namespace while the daemon keeps
the rights of the invoking user on the backing files. The daemon stays
behind as our child in pid namespace A, in its own session (a terminal's ^C
must not reach it), and ends when the last process of B is gone (the view
goes with B's mount namespace and the kernel closes the connection).

Descriptors: the source, log and /dev/fuse descriptors are dup2'd onto fixed
numbers in the daemon only; the daemon's copy of everything else is closed
by exec (every descriptor of the launcher is CLOEXEC).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from ..errors import SetupError
from . import supervise

__all__ = ["start_daemon", "log_tail", "tune_readahead"]

_MOUNT_TIMEOUT = 30.0
#: Descriptor numbers a daemon finds its directory, its log and its connection on.
_SRC_FD = 3
_LOG_FD = 4
#: A single-id namespace's daemons: the private control socket (shiftfs.fs.control).
_CONTROL_FD = 5
_FUSE_FD = 6


def start_daemon(
    prog_args: Sequence[str],
    mount_opts: str,
    source: str,
    src_fd: int,
    log_fd: int,
    fuse_fd: int,
    label: str,
    control_fd: int | None = None,
) -> None:
    """Start the daemon of ``source`` on the connection ``fuse_fd``; return once it serves.

    ``label`` is an existing empty directory the daemon names as its mount
    point (in notes and logs); nothing is mounted there."""
    # allow_shared_source: SOURCE was checked on the host (launcher.check_private_source).
    opts = f"allow_shared_source,{mount_opts + ',' if mount_opts else ''}log=/proc/self/fd/{_LOG_FD}"
    opts += f",fuse_fd={_FUSE_FD}"
    actions = [(os.POSIX_SPAWN_DUP2, fuse_fd, _FUSE_FD)]
    if control_fd is not None:
        opts += f",control_fd={_CONTROL_FD},single_id"
        actions.append((os.POSIX_SPAWN_DUP2, control_fd, _CONTROL_FD))
    if not any(c in source for c in ",\\ \t\n"):
        opts += f",fsname={source}"
    argv = [sys.executable, "-m", "shiftfs", "mount", *prog_args, "-o", opts, f"/proc/self/fd/{_SRC_FD}", label]
    log = f"/proc/self/fd/{log_fd}"
    try:
        mounter = os.posix_spawn(
            sys.executable,
            argv,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
                (os.POSIX_SPAWN_DUP2, src_fd, _SRC_FD),
                (os.POSIX_SPAWN_DUP2, log_fd, _LOG_FD),
                *actions,
            ],
            setsid=True,
            setsigmask=set(),
            setsigdef=(*supervise.RELAYED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD),
        )
    except OSError as e:
        raise SetupError(f"cannot start the shiftfs daemon ({sys.executable}): {e.strerror}") from None
    status = supervise.wait_pid(mounter, _MOUNT_TIMEOUT)
    what = f"'shiftfs mount {source}'"
    if status is None:
        raise SetupError(
            f"{what} did not report a live mount within {_MOUNT_TIMEOUT:.0f} s: {log_tail(log) or 'no output'}"
        )
    if status != 0:
        raise SetupError(f"{what} failed with status {supervise.exit_code(status)}: {log_tail(log) or 'no output'}")


def tune_readahead(dev: int, kb: int = 1024) -> None:
    """Raise a view's read-ahead as ``shiftfs mount`` does for root (128 KiB
    by default: small READs); where we may not write sysfs, leave it."""
    try:
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError:
        pass


def log_tail(path: str, lines: int = 1) -> str:
    """The last non-empty lines of a log, joined into one line."""
    try:
        with open(path, errors="replace") as f:
            text = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])
