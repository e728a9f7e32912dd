"""A throwaway user with a subordinate id range, for the unprivileged image build.

``shiftfs exec`` maps a user's /etc/subuid and /etc/subgid range through
newuidmap, so the benchmark needs a real user that owns one. The user is made
with ``useradd``, gets one 65536-id block that overlaps no range in use, and is
deleted again afterwards -- also when the build fails or the run is stopped --
with exactly the lines we added taken out of /etc/subuid and /etc/subgid, so
both files end byte for byte as they were. Edits take the same lock as the
test suite's throwaway users (tests/ns_util.py), so a bench run and a test run
at the same time don't interleave their edits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import random
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from shiftfs.container import userns

SUBID_FILES = ("/etc/subuid", "/etc/subgid")
LOCK = "/run/lock/shiftfs-test-users.lock"
BLOCK = 0x10000
#: Where blocks are chosen: far above every distribution's default subid area.
SPAN = (0x4000_0000, 0x7000_0000)


@dataclass(frozen=True)
class SubUser:
    name: str
    uid: int
    gid: int
    subid: tuple[int, int]

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run as this user, with a HOME that exists (runuser keeps PATH)."""
        return ["runuser", "-u", self.name, "--", "env", "HOME=/", *argv]


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


def free_block(used: list[tuple[int, int]]) -> int:
    first, last = SPAN[0] // BLOCK, SPAN[1] // BLOCK
    start = random.randrange(first, last)
    for i in range(last - first):
        base = (first + (start - first + i) % (last - first)) * BLOCK
        if all(base + BLOCK <= s or s + n <= base for s, n in used):
            return base
    raise RuntimeError("no free 65536-id block for a throwaway user: clean up /etc/subuid")


@contextlib.contextmanager
def throwaway_user(prefix: str = "sfb") -> Iterator[SubUser]:
    """A new user with a 65536-id block in /etc/subuid and /etc/subgid; removed
    (user and lines) on the way out, whatever happens inside."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    fixed: dict[str, bool] = {}
    try:
        with _locked():
            subprocess.run(
                [
                    "useradd",
                    "-M",
                    "-s",
                    "/bin/sh",
                    "-d",
                    "/nonexistent",
                    "-K",
                    "SUB_UID_COUNT=0",
                    "-K",
                    "SUB_GID_COUNT=0",
                    name,
                ],
                check=True,
                capture_output=True,
            )
            pw = pwd.getpwnam(name)
            start = free_block(userns.ranges_in_use())
            for path in SUBID_FILES:
                data = _read(path)
                fixed[path] = bool(data) and not data.endswith(b"\n")
                _write(path, data + (b"\n" if fixed[path] else b"") + f"{name}:{start}:{BLOCK}\n".encode())
        yield SubUser(name, pw.pw_uid, pw.pw_gid, (start, BLOCK))
    finally:
        with _locked():
            for path in SUBID_FILES:
                if path not in fixed:
                    continue
                data = _read(path)
                keep = [
                    ln for ln in data.splitlines(keepends=True) if ln.split(b":", 1)[0].decode(errors="replace") != name
                ]
                out = b"".join(keep)
                if fixed[path] and out.endswith(b"\n"):
                    out = out[:-1]
                if out != data:
                    _write(path, out)
            subprocess.run(["userdel", name], capture_output=True)
