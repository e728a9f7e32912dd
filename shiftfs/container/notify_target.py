"""Resolving the target of a trapped call the way the kernel would, for the supervisor.

A trapped ``chown``/``mknod`` names its target by a path in the caller's
memory, relative to the caller's root and working directory or to one of its
descriptors, or by a descriptor alone. The supervisor (a process of namespace
A, see :mod:`shiftfs.container.seccomp_notify`) reads those through a procfs
of its own pid namespace (``/proc/PID/mem``, ``cwd``, ``root``, ``fd/N``):

* the path string is read from ``/proc/PID/mem`` (at most PATH_MAX bytes);
* the start is ``/proc/PID/fd/N`` (a ``dirfd``), ``/proc/PID/cwd``
  (``AT_FDCWD``), each opened ``O_PATH`` through the magic link, which names
  the very object the caller holds, in the caller's mount tree;
* the supervisor then ``chroot``s to ``/proc/PID/root`` for the one
  ``openat(O_PATH)`` of the path (``O_NOFOLLOW`` when the call does not follow
  the last symlink) and returns to its own root right after, so absolute
  paths, absolute symlinks and ``..`` resolve inside the caller's root, as the
  kernel resolves them for the caller. No module may be imported while the
  root is the caller's: everything used is imported at load time.

A path through the caller's ``/proc/self/fd/N`` (or ``thread-self``; libacl
and systemd name an O_PATH descriptor so for ``setxattr``) is the caller's
descriptor N when the caller's ``/proc`` is a procfs (its mountinfo says so):
opened by the supervisor, ``self`` would name the supervisor.

Races: the caller (another thread) may change the path or a component
between our read and our action. We act on what we resolved, and only on an
inode in one of the run's views, which the caller could reach and change
through the view anyway; everything else is handed back to the kernel, which
then checks the call itself. So a race can at most pick another file of the
user's own tree, never a host file, and gains no host privilege: the action
is a record written by the user's own daemon.
"""

from __future__ import annotations

import errno
import os
import re

from ..sys.libc import AT_FDCWD

__all__ = ["Caller", "read_path", "PATH_MAX"]

PATH_MAX = 4096
_O_PATH = os.O_PATH | os.O_CLOEXEC
_O_PATH_OPEN = 0o10000000  # O_PATH as /proc/PID/fdinfo shows it (octal flags)
_PROC_FD = re.compile(rb"/proc/(?:self|thread-self)/fd/([0-9]+)")


class Caller:
    """The traced process ``pid`` as seen through ``proc_fd`` (a procfs of the supervisor's pid namespace)."""

    def __init__(self, proc_fd: int, own_root: int, pid: int):
        self.proc = proc_fd
        self.own_root = own_root
        self.pid = pid

    def _open_proc(self, name: str, flags: int = _O_PATH) -> int:
        return os.open(f"{self.pid}/{name}", flags, dir_fd=self.proc)

    def status(self) -> dict[str, str]:
        fd = self._open_proc("status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 8192).decode(errors="replace")
        finally:
            os.close(fd)
        out = {}
        for line in text.splitlines():
            key, _, val = line.partition(":")
            out[key] = val.strip()
        return out

    def _proc_is_procfs(self) -> bool:
        fd = self._open_proc("mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while data := os.read(fd, 65536):
                chunks.append(data)
        finally:
            os.close(fd)
        return _proc_mounted(b"".join(chunks).decode(errors="replace"))

    def read_path(self, addr: int) -> bytes:
        """The NUL-terminated string at ``addr`` in the caller's memory (OSError: EFAULT, ENAMETOOLONG)."""
        fd = self._open_proc("mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = b""
            while len(out) < PATH_MAX:
                at = addr + len(out)
                chunk = 4096 - at % 4096  # to the end of this page: the next may be unmapped
                try:
                    data = os.pread(fd, chunk, at)
                except OSError:
                    data = b""
                if not data:
                    raise OSError(errno.EFAULT, "cannot read the path")
                nul = data.find(b"\0")
                if nul >= 0:
                    return out + data[:nul]
                out += data
            raise OSError(errno.ENAMETOOLONG, "path too long")
        finally:
            os.close(fd)

    def read_bytes(self, addr: int, size: int) -> bytes:
        """``size`` bytes at ``addr`` in the caller's memory (OSError: EFAULT)."""
        fd = self._open_proc("mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, size, addr)
        finally:
            os.close(fd)
        if len(data) != size:
            raise OSError(errno.EFAULT, "cannot read the value")
        return data

    def open_fd(self, fd: int, o_path: bool = False) -> int:
        """An O_PATH descriptor of the caller's open file ``fd`` (EBADF: not open).

        ``o_path``: the caller's descriptor may itself be an O_PATH one, as
        for a ``dirfd`` or the target of ``AT_EMPTY_PATH``; ``fchown`` and
        ``fsetxattr`` of an O_PATH descriptor are EBADF in the kernel."""
        if fd < 0:
            raise OSError(errno.EBADF, "bad descriptor")
        if not o_path:
            info = self._open_proc(f"fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                text = os.read(info, 4096).decode()
            finally:
                os.close(info)
            for line in text.splitlines():
                if line.startswith("flags:") and int(line.split()[1], 8) & _O_PATH_OPEN:
                    raise OSError(errno.EBADF, "an O_PATH descriptor")
        return self._open_proc(f"fd/{fd}")

    def _start(self, dirfd: int) -> int:
        return self._open_proc("cwd") if dirfd == AT_FDCWD else self.open_fd(dirfd, o_path=True)

    def resolve(self, dirfd: int, path: bytes, follow: bool, directory: bool = False) -> int:
        """An O_PATH descriptor of what ``path`` (relative to ``dirfd``) names for the caller.

        An empty path names ``dirfd`` itself (the caller checked AT_EMPTY_PATH)."""
        if not path:
            return self._start(dirfd)
        magic = _PROC_FD.fullmatch(path)
        if magic and follow and self._proc_is_procfs():
            return self.open_fd(int(magic.group(1)), o_path=True)
        root = self._open_proc("root")
        try:
            start = None if path.startswith(b"/") else self._start(dirfd)
            try:
                flags = _O_PATH | (0 if follow else os.O_NOFOLLOW) | (os.O_DIRECTORY if directory else 0)
                os.fchdir(root)
                os.chroot(".")
                try:
                    return os.open(path, flags, dir_fd=AT_FDCWD if start is None else start)
                finally:
                    os.fchdir(self.own_root)
                    os.chroot(".")
            finally:
                if start is not None:
                    os.close(start)
        finally:
            os.close(root)


def _proc_mounted(mountinfo: str) -> bool:
    """Whether a mountinfo text has a procfs on ``/proc`` (mount points are relative to the process's root)."""
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts = fields.split()
        if len(parts) > 4 and parts[4] == "/proc" and tail.split()[:1] == ["proc"]:
            return True
    return False


def read_path(caller: Caller, addr: int) -> bytes:
    return caller.read_path(addr)
