"""Throwaway users, some with a subordinate id range: the one copy, for the bench and the tests.

``shiftfs exec`` maps a user's /etc/subuid and /etc/subgid range through
newuidmap, so the benchmark's unprivileged image build needs a real user that
owns one, and the test suite needs such users (and users without a range) for
``shiftfs run``/``exec``, the trust and the escape tests. Users are made with
``useradd``; each one with a range gets a 65536-id block that overlaps no range
in use (``shiftfs.container.userns.free_block``). On the way out -- also when
the body fails or the run is stopped -- the users are deleted and exactly the
lines we added are taken out of /etc/subuid and /etc/subgid, so both files end
byte for byte as they were, whatever other lines changed meanwhile. Edits take
one lock file, so a bench run and test sessions at the same time never
interleave their edits. ``tests/ns_util.py`` imports this module; the package
never does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from shiftfs.container import userns

SUBID_FILES = ("/etc/subuid", "/etc/subgid")
LOCK = "/run/lock/shiftfs-test-users.lock"


@dataclass(frozen=True)
class User:
    """Who runs a command: root, or a throwaway user (``subid``: its range, if it has one)."""

    name: str
    uid: int
    gid: int
    subid: tuple[int, int] | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run as this user, with a HOME that exists (runuser keeps PATH); root's as it is."""
        if self.is_root:
            return argv
        return ["runuser", "-u", self.name, "--", "env", "HOME=/", *argv]


#: The bench's name for a user that has a range.
SubUser = User


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    os.makedirs(os.path.dirname(LOCK), exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:  # in place: the file's mode and owner stay
        f.write(data)


def _add_lines(path: str, lines: list[str]) -> bool:
    """Append ``lines``; returns whether a newline had to be added first."""
    data = _read(path)
    fixed = bool(data) and not data.endswith(b"\n")
    _write(path, data + (b"\n" if fixed else b"") + "".join(lines).encode())
    return fixed


def _remove_lines(path: str, names: set[str], newline_added: bool) -> None:
    """Drop the lines of ``names``: the file is then byte for byte what it was
    before we added them, whatever other lines changed meanwhile."""
    data = _read(path)
    keep = [ln for ln in data.splitlines(keepends=True) if ln.split(b":", 1)[0].decode(errors="replace") not in names]
    out = b"".join(keep)
    if newline_added and out.endswith(b"\n"):
        out = out[:-1]
    if out != data:
        _write(path, out)


def _useradd(name: str) -> None:
    argv = ["useradd", "-M", "-s", "/bin/sh", "-d", "/nonexistent"]
    argv += ["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0", name]
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def throwaway_users(with_range: int = 1, without_range: int = 1, prefix: str = "sft") -> Iterator[list[User]]:
    """New users; the first ``with_range`` get a 65536-id block in /etc/subuid
    and /etc/subgid. Removed again (users and lines) whatever happens inside."""
    users: list[User] = []
    added: dict[str, bool] = {}
    names: set[str] = set()
    try:
        with _locked():
            used = userns.ranges_in_use()
            lines: list[str] = []
            for i in range(with_range + without_range):
                name = f"{prefix}{uuid.uuid4().hex[:8]}"
                names.add(name)
                _useradd(name)
                pw = pwd.getpwnam(name)
                subid = None
                if i < with_range:
                    start = userns.free_block(used)
                    used.append((start, userns.BLOCK))
                    subid = (start, userns.BLOCK)
                    lines.append(f"{name}:{start}:{userns.BLOCK}\n")
                users.append(User(name, pw.pw_uid, pw.pw_gid, subid))
            for path in SUBID_FILES:
                added[path] = _add_lines(path, lines)
        yield users
    finally:
        with _locked():
            for path in SUBID_FILES:
                if path in added:
                    _remove_lines(path, names, added[path])
            for name in names:
                subprocess.run(["userdel", name], capture_output=True)


@contextlib.contextmanager
def throwaway_user(prefix: str = "sfb") -> Iterator[User]:
    """One new user with a 65536-id block (the bench's unprivileged image build)."""
    with throwaway_users(with_range=1, without_range=0, prefix=prefix) as users:
        yield users[0]
