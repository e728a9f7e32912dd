"""A second ``shiftfs run`` of one ROOT joins the container already running on it.

Why. One daemon serves a SOURCE (:mod:`shiftfs.fs.sourcelock`), so a second
container on ROOT could only have a second, incoherent view. Opening a
second shell into the same container is what users mean, so a second run of
ROOT by the same user enters the first run's namespaces, as ``podman exec``
does: one view, one daemon, one truth. ``--new`` refuses instead of joining
and ``--join`` refuses when there is nothing to join.

How the container is found. Pid 1 of the container (namespace B) leaves a
note ``kind=run`` for ROOT in the invoking user's note directory, through a
descriptor the host side opened before anything was forked (inside, the
staging tmpfs may cover that directory), with its pid as the host numbers
it (B's /proc is still the host's then). A note counts while that process
lives with the same start time and belongs to us; B removes it on exit.

How it is entered. From the host, the joining process opens the
container's user, mount, pid, UTS and IPC namespaces and its root through
``/proc/PID``, checks the start time again (the pid was not reused), then
a child enters them (user namespace first: being its owner gives us every
capability in it), chroots to the container's root and forks once more, so
that COMMAND is in the container's pid namespace; it then runs as ``run``
runs it (user, environment, working directory). COMMAND's exit status and
signals pass as in ``run``. When the container's pid 1 exits, the kernel
ends the joined processes with it.
"""

from __future__ import annotations

import contextlib
import os
import signal

from ..errors import SetupError
from ..fs import sourcelock
from ..sys import mounts
from . import supervise

__all__ = ["prepare", "register", "unregister", "find", "enter"]

#: The note directory, opened on the host before the launch (see the module docstring).
_NOTE_DIR: int | None = None
_NOTE: str | None = None

#: Namespaces a joining process enters, user namespace first.
_NAMESPACES = (
    ("user", mounts.CLONE_NEWUSER),
    ("mnt", mounts.CLONE_NEWNS),
    ("uts", mounts.CLONE_NEWUTS),
    ("ipc", mounts.CLONE_NEWIPC),
    ("pid", mounts.CLONE_NEWPID),
)


def prepare() -> None:
    """On the host, before forking: open the note directory for :func:`register`."""
    global _NOTE_DIR
    if _NOTE_DIR is None:
        _NOTE_DIR = sourcelock.runtime_dir()


def register(root: str) -> None:
    """In pid 1 of the container, before it pivots: the note that names it for ROOT."""
    global _NOTE
    if _NOTE_DIR is None:
        return
    pid = sourcelock.own_pid()
    holder = sourcelock.Holder(pid, "run", "", False, sourcelock.start_time(pid) or 0, sourcelock.proc_dev())
    _NOTE = sourcelock.write_note(_NOTE_DIR, os.stat(root), holder)


def unregister() -> None:
    """In pid 1 of the container, once COMMAND is gone."""
    if _NOTE_DIR is not None and _NOTE:
        sourcelock.remove_note(_NOTE_DIR, _NOTE)


def find(root: str) -> sourcelock.Holder | None:
    """The live container of ``root`` that this user started, if ROOT is served by one."""
    st = os.stat(root)
    for h in sourcelock.holders(st):
        if h.kind != "run" or h.pid <= 0:
            continue
        try:
            if os.stat(f"/proc/{h.pid}").st_uid != os.getuid():
                continue
        except OSError:
            continue
        return h
    return None


def enter(prog: str, holder: sourcelock.Holder, body, *args: object) -> int:
    """Run ``body(*args)`` inside the container of ``holder`` (see the module
    docstring); returns its exit code, relaying signals meanwhile."""
    fds: list[int] = []
    try:
        for name, _ in _NAMESPACES:
            fds.append(os.open(f"/proc/{holder.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC))
        fds.append(os.open(f"/proc/{holder.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise SetupError(
            f"cannot enter the container (pid {holder.pid}) of ROOT: {e.strerror}; it may have just exited"
        ) from None
    try:
        if sourcelock.start_time(holder.pid) != holder.start:
            raise SetupError(f"the container (pid {holder.pid}) of ROOT has just exited; run again to start a new one")
        old_mask = supervise.block_signals()
        try:
            pid = os.fork()
            if pid == 0:
                supervise.child(prog, _inside, prog, fds, body, args)
            return supervise.exit_code(supervise.supervise(pid))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _inside(prog: str, fds: list[int], body, args: tuple) -> int:
    """The joining child: enter the namespaces and the root, then fork into the pid namespace."""
    mounts.set_parent_death_signal()
    for (name, kind), fd in zip(_NAMESPACES, fds):
        try:
            mounts.setns(fd, kind)
        except OSError as e:
            raise SetupError(f"cannot enter the container's {name} namespace: {e.strerror}") from None
    os.fchdir(fds[-1])
    os.chroot(".")
    os.chdir("/")
    return supervise.fork_and_supervise(prog, body, *args, reap_any=False)
