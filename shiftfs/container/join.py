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

Runs started at the same moment. Between a run's check and its container's
note there is a window in which a second run would find ROOT free and start
a daemon the lock then refuses. So a run holds a start lock (``flock`` on
``DEV-INO.start`` in the note directory) from its check until its container
has left its note: pid 1 of B releases it (the descriptor is inherited
across the forks, so its unlock is the launch's). Others wait for it, then
look again and join. If the launch fails, the lock goes with its processes.

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
import fcntl
import os
import signal
import sys
import time

from ..errors import SetupError
from ..fs import sourcelock
from ..sys import mounts
from . import supervise

__all__ = ["divert", "prepare", "wait_turn", "end_turn", "register", "unregister", "find", "enter"]

#: The note directory, opened on the host before the launch (see the module docstring).
_NOTE_DIR: int | None = None
_NOTE: str | None = None
#: The start lock while this run is the one starting a container of ROOT.
_START: int | None = None
_START_WAIT = 60.0

#: Namespaces a joining process enters, user namespace first.
_NAMESPACES = (
    ("user", mounts.CLONE_NEWUSER),
    ("mnt", mounts.CLONE_NEWNS),
    ("uts", mounts.CLONE_NEWUTS),
    ("ipc", mounts.CLONE_NEWIPC),
    ("pid", mounts.CLONE_NEWPID),
)


def divert(prog: str, cfg, body) -> int | None:
    """``run`` on the host, before launching: join the live container of
    ``cfg.root`` and run ``body(cfg)`` there (a second shell into it), or
    refuse as ``--new``/``--join`` (``cfg.attach``) ask; None: launch."""
    prepare()
    wait_turn(cfg.root)  # a run of ROOT starting right now: wait for its container, then join it
    try:
        held = sourcelock.probe(cfg.root)
    except OSError:
        held = None  # the launch's own checks say why
    if not held:
        if cfg.attach == "join":
            raise SetupError(f"--join: no container of ROOT {cfg.root} is running; drop --join to start one")
        return None  # we start it, holding the start lock until its pid 1 has left its note
    end_turn()
    found = find(cfg.root)
    if cfg.attach == "new" or found is None:
        raise SetupError(sourcelock.describe(cfg.root, held))
    if cfg.binds or cfg.hostname:  # the same command line again is the natural second shell: not an error
        print(
            f"{prog}: joining the running container (pid {found.pid}) of {cfg.root}: its binds and host name "
            f"stay as they are (--bind, --hostname ignored; --new refuses instead)",
            file=sys.stderr,
        )
    return enter(prog, found, body, cfg)


def prepare() -> None:
    """On the host, before forking: open the note directory for :func:`register`."""
    global _NOTE_DIR
    if _NOTE_DIR is None:
        _NOTE_DIR = sourcelock.runtime_dir()


def wait_turn(root: str) -> None:
    """On the host: take the start lock of ROOT, waiting (up to a minute) for a
    run of ROOT that is starting right now to have left its note."""
    global _START
    if _NOTE_DIR is None:
        return
    st = os.stat(root)
    try:
        fd = os.open(
            f"{st.st_dev:x}-{st.st_ino:x}.start",
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=_NOTE_DIR,
        )
    except OSError:
        return  # no start lock: the daemon's own lock still decides, less politely
    deadline = time.monotonic() + _START_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return
            time.sleep(0.05)
    _START = fd


def end_turn() -> None:
    """Release the start lock (on the host when not starting, in B once its note is written)."""
    global _START
    if _START is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(_START, fcntl.LOCK_UN)
            os.close(_START)
        _START = None


def register(root: str) -> None:
    """In pid 1 of the container, before it pivots: the note that names it for ROOT."""
    global _NOTE
    if _NOTE_DIR is None:
        return
    pid = sourcelock.own_pid()
    holder = sourcelock.Holder(pid, "run", "", False, sourcelock.start_time(pid) or 0, sourcelock.proc_dev())
    _NOTE = sourcelock.write_note(_NOTE_DIR, os.stat(root), holder)
    end_turn()  # the same open file as the host's: this unlocks it for the waiting runs


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
