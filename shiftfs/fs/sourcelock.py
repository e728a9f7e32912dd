"""One daemon per SOURCE: the lock a daemon holds on its backing directory.

Why. Two daemons serving one SOURCE each keep their own kernel cache (with
``cache=always`` for a year) and their own cached records, so a chown through
one mount stays invisible through the other. By default a daemon therefore
owns its SOURCE, and a second mount of it is refused.

The lock. ``flock`` on a read-only descriptor of the SOURCE directory itself,
taken before the mount and held for the daemon's life: it is keyed by the
inode (``s``, ``./s`` and ``/proc/self/fd/3`` are one SOURCE), works in both
modes and for every user (no file is written into SOURCE), and the kernel
drops it when the process dies, ``kill -9`` included, so a stale lock cannot
exist. The descriptor is O_CLOEXEC, and only the daemon process holds it
(nothing it forks outlives it). Exclusive by default; ``-o shared`` takes a
shared lock, so shared daemons coexist and an exclusive one is refused next
to them (and they next to it).

Who holds it. The lock says only *that* someone serves SOURCE; to name the
daemon in the refusal, each holder leaves a note in its user's runtime
directory (:func:`runtime_dir`): ``DEV-INO.PID`` with its pid as the host
sees it, the process start time, the mount point and what it is (a ``mount``
daemon, or the container of a ``shiftfs run``). A note counts only while
that process lives with that start time; stale ones are removed when seen.
When no note of ours explains the lock (another user's daemon), the pid comes
from ``/proc/locks``. A note directory someone else made first
(``/tmp/shiftfs-UID`` is a name anyone can take) is never used; the refusal
it causes then names it, its owner and the fix (:func:`runtime_dir_problem`).

The kernel backend (table mode as an idmapped bind mount) has no daemon and
no cache of its own, so it holds no lock; it is refused only while an
exclusive daemon serves SOURCE, which would not see its changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from dataclasses import dataclass

from ..errors import MountError

__all__ = [
    "Holder",
    "SourceLock",
    "holders",
    "probe",
    "runtime_dir",
    "runtime_dir_path",
    "runtime_dir_problem",
    "describe",
    "note_path",
]

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class Holder:
    """Who serves a SOURCE: from a note (``mountpoint`` known) or /proc/locks alone."""

    pid: int
    kind: str = "mount"  # "mount": a shiftfs mount daemon; "run": a shiftfs run container
    mountpoint: str = ""
    shared: bool = False
    start: int = 0
    #: st_dev of the /proc that numbers ``pid``: notes from another pid namespace's /proc are not judged
    procdev: int = 0


def host_uid() -> int:
    """The uid behind our euid in the parent user namespace: the real user, for a namespace that
    user made (one uid_map level; the daemon's log directory and the notes both use it)."""
    uid = os.geteuid()
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, outside, count = (int(x) for x in line.split())
                if inside <= uid < inside + count:
                    return outside + uid - inside
    except (OSError, ValueError):
        pass
    return uid


def runtime_dir(create: bool = True) -> int | None:
    """An O_PATH descriptor of this user's note directory, or None.

    Keyed by the real user behind us (a namespace root is the user who made
    the namespace): ``/run/shiftfs`` for root, ``/tmp/shiftfs-UID`` for
    others (the directory the daemon's log falls back to). Mode 0700 and
    owned by us, or not used. Inside ``shiftfs run`` the staging tmpfs may
    cover it: the container's note is written through a descriptor the host
    side opened (:mod:`shiftfs.container.join`).
    """
    path = runtime_dir_path()
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        return None
    return fd


def runtime_dir_path() -> str:
    """Where :func:`runtime_dir` is: ``/run/shiftfs`` for root, ``/tmp/shiftfs-UID`` for others."""
    uid = host_uid()
    return "/run/shiftfs" if uid == 0 else f"/tmp/shiftfs-{uid}"


def runtime_dir_problem() -> str | None:
    """Why the note directory is there but not used (one line with the fix), else None.

    Anyone can make ``/tmp/shiftfs-UID`` before UID does. We never use such
    a directory, so our daemons and containers leave no note: a second
    mount is refused without naming the daemon, and a second ``shiftfs run``
    cannot join the container.
    """
    path = runtime_dir_path()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"shiftfs' note directory {path} cannot be examined ({e.strerror}); fix its path's modes"
    me = os.geteuid()
    what = f"shiftfs' note directory {path}"
    fix = f"have root remove it ('rm -rf {path}'); daemons and containers started after that leave their notes"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{what} is not a directory (uid {st.st_uid} made it, mode {stat.filemode(st.st_mode)}): {fix}"
    if st.st_uid != me:
        return f"{what} is owned by uid {st.st_uid}, not by you (uid {me}), who took the name first: {fix}"
    if st.st_mode & 0o077:
        return (
            f"{what} is open to others (mode {stat.S_IMODE(st.st_mode):04o}): run 'chmod 700 {path}'; "
            f"daemons and containers started after that leave their notes"
        )
    return None


def start_time(pid: int | str) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), which tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def proc_dev() -> int:
    try:
        return os.stat("/proc/self").st_dev
    except OSError:
        return 0


def own_pid() -> int:
    """Our pid as the /proc we see numbers it (the host's, for a daemon of ``run``: A has the host's /proc)."""
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev:x}-{st.st_ino:x}"


def note_path(st: os.stat_result, pid: int) -> str:
    return f"{_key(st)}.{pid}"


def write_note(dir_fd: int, st: os.stat_result, holder: Holder) -> str | None:
    """Record ``holder`` for the SOURCE of ``st``; returns the note's name (None if it cannot be written)."""
    name = note_path(st, holder.pid)
    data = json.dumps(
        {
            "pid": holder.pid,
            "start": holder.start,
            "kind": holder.kind,
            "mountpoint": holder.mountpoint,
            "shared": holder.shared,
            "procdev": holder.procdev,
        }
    ).encode()
    tmp = f".{name}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        return None
    return name


def remove_note(dir_fd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _notes(st: os.stat_result) -> list[Holder]:
    """Live notes of our user for SOURCE ``st``; stale ones are removed."""
    return notes_in(runtime_dir(create=False), st)


def notes_in(dfd: int | None, st: os.stat_result | None) -> list[Holder]:
    """Live notes for SOURCE ``st`` (None: every SOURCE, a sweep) in the note
    directory ``dfd`` (closed here); notes of processes gone are removed."""
    if dfd is None:
        return []
    found = []
    try:
        rfd = os.open(".", _DIR_FLAGS, dir_fd=dfd)
        try:
            names = os.listdir(rfd)
            prefix = _key(st) + "." if st is not None else ""
            for name in names:
                if not name.startswith(prefix) or name.startswith(".") or not name.rpartition(".")[2].isdigit():
                    continue
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=rfd)
                    with os.fdopen(fd, "rb") as f:
                        d = json.loads(f.read(4096))
                    h = Holder(
                        int(d["pid"]),
                        str(d["kind"]),
                        str(d["mountpoint"]),
                        bool(d["shared"]),
                        int(d["start"]),
                        int(d["procdev"]),
                    )
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if h.procdev != proc_dev():
                    continue  # numbered by another /proc: neither believed nor removed
                if start_time(h.pid) != h.start:
                    remove_note(rfd, name)
                    continue
                found.append(h)
        finally:
            os.close(rfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return found


def _lock_pids(st: os.stat_result) -> list[int]:
    """Pids /proc/locks shows holding a FLOCK on SOURCE ``st`` (0 for holders outside our pid namespace)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts:
                    continue  # a waiter, not a holder
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    with contextlib.suppress(ValueError):
                        pids.append(int(parts[4]))
    except OSError:
        pass
    return pids


def holders(st: os.stat_result) -> list[Holder]:
    """Who serves SOURCE ``st``, best known first: our notes, else pids from /proc/locks."""
    notes = _notes(st)
    live = set(_lock_pids(st))
    # A note whose process holds no lock on it (between its lock and its note) still names it best.
    # A run's container first: it is what a second run joins and what the refusal names.
    notes.sort(key=lambda h: (h.kind != "run", h.pid not in live))
    if notes:
        return notes
    return [Holder(pid) for pid in sorted(live) if pid > 0] or [Holder(0)]


def probe(path: str, shared: bool = False) -> list[Holder] | None:
    """Whether a daemon could lock ``path`` now: None if free, else who holds it.

    ``shared=False`` asks for an exclusive daemon (any holder conflicts),
    ``shared=True`` for a shared one or the kernel backend (an exclusive holder conflicts).
    """
    fd = os.open(path, _DIR_FLAGS)
    try:
        st = os.fstat(fd)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return holders(st)
        return None
    finally:
        os.close(fd)


def describe(source: str, found: list[Holder]) -> str:
    """One line: who serves ``source``, and the ways out."""
    h = found[0]
    if h.kind == "run" and h.pid:
        who = f"the container of a 'shiftfs run' (pid {h.pid})"
        way = f"enter it with 'shiftfs run {source} -- COMMAND' (it joins), or stop it first"
    elif h.pid and h.mountpoint:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        who = f"{'a shared' if h.shared else 'the'} shiftfs daemon (pid {h.pid}) on {h.mountpoint}{more}"
        way = f"use that mount, or unmount it first ('shiftfs umount {h.mountpoint}')"
    else:
        who = f"a shiftfs daemon (pid {h.pid})" if h.pid else "a shiftfs daemon (of another user or namespace)"
        way = "use its mount, or unmount it first"
        squatted = runtime_dir_problem()
        if squatted:
            # No note names it because ours cannot be kept: say why, the fix first.
            return (
                f"SOURCE {source} is already served by {who}, which left no note saying what it is "
                f"(a mount, or a container 'shiftfs run' would join): {squatted}"
            )
    return (
        f"SOURCE {source} is already served by {who}; one daemon per SOURCE keeps the view coherent: "
        f"{way}, or mount every view of it with -o shared (coherent caching, slower)"
    )


class SourceLock:
    """The lock of one daemon on its SOURCE (see the module docstring)."""

    def __init__(self, path: str, shared: bool = False, name: str | None = None):
        self.shared = shared
        self.fd = os.open(path, _DIR_FLAGS)
        self.st = os.fstat(self.fd)
        self._note: str | None = None
        self._note_dir: int | None = None
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            found = holders(self.st)
            os.close(self.fd)
            raise MountError(describe(name or path, found)) from None
        except BaseException:
            os.close(self.fd)
            raise

    def announce(self, mountpoint: str, kind: str = "mount") -> None:
        """Leave the note that names us (call once the mount is live, before isolating:
        the note directory is kept open to remove the note at exit)."""
        dfd = runtime_dir()
        if dfd is None:
            problem = runtime_dir_problem()
            if problem:
                log.warning("no note names this daemon: %s", problem)
            return
        notes_in(os.dup(dfd), None)  # sweep the notes of daemons killed meanwhile
        pid = own_pid()
        holder = Holder(pid, kind, os.path.abspath(mountpoint), self.shared, start_time(pid) or 0, proc_dev())
        self._note = write_note(dfd, self.st, holder)
        self._note_dir = dfd

    def release(self) -> None:
        if self._note_dir is not None:
            if self._note:
                remove_note(self._note_dir, self._note)
            os.close(self._note_dir)
            self._note_dir = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
