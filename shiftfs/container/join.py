"""A second ``shiftfs run`` of one ROOT joins the container already running on it.

Why. One daemon serves a SOURCE (:mod:`shiftfs.fs.sourcelock`), so a second
container on ROOT could only have a second, incoherent view. Opening a
second shell into the same container is what users mean, so a second run of
ROOT by the same user enters the first run's namespaces, as ``podman exec``
does: one view, one daemon, one truth. ``--new`` refuses instead of joining
and ``--join`` refuses when there is nothing to join.

How the container is found. The host side of the run (the ``shiftfs run``
process, outside every namespace of the container) leaves a note
``kind=run`` for ROOT in the invoking user's note directory, naming B0, the
process that made the container's namespaces (shiftfs.container.inner):
B0 reports its pid as the host numbers it over a pipe once pid 1 of the
container stands in its new root. Nothing in the container ever holds the
note directory: that descriptor was the way out of runc's CVE-2024-21626
class. A note counts while that process lives with the same start time and
belongs to us; the host side removes it on exit.

Runs started at the same moment. Between a run's check and its container's
note there is a window in which a second run would find ROOT free and start
a daemon the lock then refuses. So a run holds a start lock (``flock`` on
``DEV-INO.start`` in the note directory) from its check until the note is
written; the host side holds and releases it. Others wait for it, then look
again and join. If the launch fails, the lock goes with the host side.

How it is entered. From the host, the joining process opens B0's user,
mount, UTS and IPC namespaces, the pid namespace its children are in (the
container's) and its root (pid 1's ``pivot_root`` moved it to the
container's root) through ``/proc/PID``, checks the start time again (the
pid was not reused), then a child enters them (user namespace first: being
its owner gives us every capability in it), becomes the container's root,
chroots to the container's root, closes every descriptor but stdio, makes
itself non-dumpable and forks once more, so that COMMAND is in the
container's pid namespace; it then runs as ``run`` runs it (user,
environment, working directory). COMMAND's exit status and signals pass as
in ``run``. When the container's pid 1 exits, the kernel ends the joined
processes with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
import time

from ..errors import SetupError
from ..fs import sourcelock
from ..sys import mounts
from . import supervise

__all__ = [
    "divert",
    "prepare",
    "wait_turn",
    "end_turn",
    "wants_note",
    "await_note",
    "set_pivot_pipe",
    "pivoted",
    "unregister",
    "find",
    "enter",
]

#: The note directory, opened on the host before the launch (see the module docstring).
_NOTE_DIR: int | None = None
_NOTE: str | None = None
#: The start lock while this run is the one starting a container of ROOT.
_START: int | None = None
_START_WAIT = 60.0
#: ROOT of this run, for the note (host side).
_ROOT: str | None = None
#: On the host: the thread that leaves the note (:func:`await_note`).
_WAITER: threading.Thread | None = None
#: In pid 1 of the container: the pipe that tells B0 it has pivoted.
_PIVOTED: int | None = None

#: Namespaces a joining process enters, user namespace first (B0's: the pid
#: namespace its children are in is the container's).
_NAMESPACES = (
    ("user", mounts.CLONE_NEWUSER),
    ("mnt", mounts.CLONE_NEWNS),
    ("uts", mounts.CLONE_NEWUTS),
    ("ipc", mounts.CLONE_NEWIPC),
    ("pid_for_children", mounts.CLONE_NEWPID),
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
    global _START, _ROOT
    if _NOTE_DIR is None:
        return
    _ROOT = root
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


def wants_note() -> bool:
    """On the host: whether this launch registers its container (``run`` with a note directory)."""
    return _NOTE_DIR is not None and _ROOT is not None


def await_note(fd: int) -> None:
    """On the host: a thread waits for B0's report on ``fd`` and leaves the
    note naming it, then releases the start lock (waiting runs then join)."""

    def wait() -> None:
        global _NOTE
        try:
            data = b""
            while chunk := os.read(fd, 4096):
                data += chunk
        except OSError:
            data = b""
        finally:
            os.close(fd)
        try:
            pid = int(json.loads(data)["pid"]) if data else 0
        except (ValueError, KeyError, TypeError):
            pid = 0
        if pid > 0 and _NOTE_DIR is not None and _ROOT is not None:
            holder = sourcelock.Holder(pid, "run", "", False, sourcelock.start_time(pid) or 0, sourcelock.proc_dev())
            with contextlib.suppress(OSError):
                _NOTE = sourcelock.write_note(_NOTE_DIR, os.stat(_ROOT), holder)
        end_turn()

    global _WAITER
    _WAITER = threading.Thread(target=wait, name="shiftfs-note", daemon=True)
    _WAITER.start()


def set_pivot_pipe(fd: int) -> None:
    """In pid 1 of the container: where :func:`pivoted` reports."""
    global _PIVOTED
    _PIVOTED = fd


def pivoted() -> None:
    """In pid 1 of the container, once it stands in its new root: tell B0 (which then registers us)."""
    global _PIVOTED
    if _PIVOTED is not None:
        with contextlib.suppress(OSError):
            os.write(_PIVOTED, b"p")
            os.close(_PIVOTED)
        _PIVOTED = None


def unregister() -> None:
    """On the host, once the container is gone (B0 with it, so the note
    thread has read its pipe's end): the thread finishes first, so that only
    one of us releases the start lock."""
    global _NOTE
    if _WAITER is not None:
        _WAITER.join(5.0)
    if _NOTE_DIR is not None and _NOTE:
        sourcelock.remove_note(_NOTE_DIR, _NOTE)
        _NOTE = None
    end_turn()


def find(root: str) -> sourcelock.Holder | None:
    """The live container of ``root`` that this user started, if ROOT is served by one."""
    st = os.stat(root)
    for h in sourcelock.holders(st):
        if h.kind != "run" or h.pid <= 0:
            continue
        try:
            # root's container process (B0) is non-dumpable and another id's: root may enter any
            if os.getuid() != 0 and os.stat(f"/proc/{h.pid}").st_uid != os.getuid():
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
        # the root must be the container's by now (B0 reports only after the pivot)
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
    # Non-dumpable before anything of the container can see us (the fork
    # below is in its pid namespace), and holding nothing of the host.
    mounts.set_dumpable(False)
    for (name, kind), fd in zip(_NAMESPACES, fds):
        try:
            mounts.setns(fd, kind)
        except OSError as e:
            raise SetupError(f"cannot enter the container's {name} namespace: {e.strerror}") from None
    # The container's root, not ours (root's run: host root is no id of its namespace).
    with contextlib.suppress(PermissionError):
        os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    mounts.set_dumpable(False)  # the id change may have reset it
    os.fchdir(fds[-1])
    os.chroot(".")
    os.chdir("/")
    mounts.close_fds_except()
    return supervise.fork_and_supervise(prog, body, *args, reap_any=False)
