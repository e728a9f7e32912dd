"""
Helpers for the ``shiftfs run`` tests: throwaway users with subordinate id
ranges, small root filesystems that borrow the host's /usr, a cached Debian
minbase tarball, and process/mount leak checks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import artifacts  # noqa: E402

#: Cached artifacts; ``SHIFTFS_CACHE_DIR`` moves them (CI empties it every run).
CACHE = artifacts.cache_dir("/var/cache/shiftfs-test")
DEBIAN_TAR = os.path.join(CACHE, "bookworm-minbase.tar")
MIRROR = "http://deb.debian.org/debian/dists/bookworm/InRelease"
SUBID_FILES = ("/etc/subuid", "/etc/subgid")

#: Host binaries inside a container: ROOT gets Debian's merged-/usr symlinks
#: and the host's /usr bound read-only.
HOST_USR = ["--bind", "/usr:/usr:ro"]


def run_argv() -> list[str]:
    return [sys.executable, "-m", "shiftfs", "run"]


@dataclass(frozen=True)
class User:
    """Who runs ``shiftfs run``: root, or a throwaway unprivileged user."""

    name: str
    uid: int
    gid: int
    subid: tuple[int, int] | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def wrap(self, argv: list[str]) -> list[str]:
        if self.is_root:
            return argv
        return ["runuser", "-u", self.name, "--", "env", "HOME=/", *argv]


ROOT_USER = User("root", 0, 0)


_USERS_LOCK = "/run/lock/shiftfs-test-users.lock"


@contextlib.contextmanager
def _users_lock() -> Iterator[None]:
    """Serialise edits of /etc/subuid, /etc/subgid and the user database
    between test sessions running at the same time."""
    os.makedirs(os.path.dirname(_USERS_LOCK), exist_ok=True)
    fd = os.open(_USERS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
    with open(path, "wb") as f:  # in place: mode and owner stay
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
    keep = [
        line for line in data.splitlines(keepends=True) if line.split(b":", 1)[0].decode(errors="replace") not in names
    ]
    out = b"".join(keep)
    if newline_added and out.endswith(b"\n"):
        out = out[:-1]
    if out != data:
        _write(path, out)


@contextlib.contextmanager
def throwaway_users(with_range: int = 1, without_range: int = 1) -> Iterator[list[User]]:
    """Create throwaway users; the first ``with_range`` get a 65536-id range
    in /etc/subuid and /etc/subgid (chosen clear of every range in use).
    Afterwards the users are deleted and exactly the lines we added are
    removed again, so the files are restored byte for byte."""
    from shiftfs.container import userns as ns

    users: list[User] = []
    added: dict[str, bool] = {}
    names: set[str] = set()
    try:
        with _users_lock():
            used = ns.ranges_in_use()
            lines: list[str] = []
            for i in range(with_range + without_range):
                name = f"sft{uuid.uuid4().hex[:8]}"
                names.add(name)
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
                subid = None
                if i < with_range:
                    start = ns.free_block(used)
                    used.append((start, ns.BLOCK))
                    subid = (start, ns.BLOCK)
                    lines.append(f"{name}:{start}:{ns.BLOCK}\n")
                users.append(User(name, pw.pw_uid, pw.pw_gid, subid))
            for path in SUBID_FILES:
                added[path] = _add_lines(path, lines)
        yield users
    finally:
        with _users_lock():
            for path in SUBID_FILES:
                _remove_lines(path, names, added.get(path, False))
            for name in names:
                subprocess.run(["userdel", name], capture_output=True)


def workdir() -> str:
    """A fresh directory every test user can enter (pytest's tmp_path is
    private to root)."""
    d = tempfile.mkdtemp(prefix="shiftfs-run-", dir="/var/tmp")
    os.chmod(d, 0o755)
    return d


def make_host_root(path: str, owner: User) -> str:
    """A ROOT that runs host binaries: merged-/usr symlinks, an empty /usr to
    bind the host's onto, /etc with passwd and group for names."""
    os.makedirs(os.path.join(path, "usr"), exist_ok=True)
    os.makedirs(os.path.join(path, "etc"), exist_ok=True)
    # As in any root filesystem; a nested shiftfs run stages its mounts there
    # when the checkout (bound in) lives under /tmp.
    os.makedirs(os.path.join(path, "mnt"), exist_ok=True)
    for name in ("bin", "sbin", "lib", "lib64"):
        if os.path.isdir(f"/usr/{name}"):
            os.symlink(f"usr/{name}", os.path.join(path, name))
    with open(os.path.join(path, "etc/passwd"), "w") as f:
        f.write(
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
    with open(os.path.join(path, "etc/group"), "w") as f:
        f.write("root:x:0:\ntty:x:5:\nalice:x:1000:\nnogroup:x:65534:\n")
    chown_tree(path, owner)
    return path


def chown_tree(path: str, owner: User) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            os.lchown(n, owner.uid, owner.gid)


def remove_tree(path: str) -> None:
    """rm -rf as root, after lifting modes a test may have dropped."""
    subprocess.run(["chmod", "-R", "u+rwx", path], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def mounts_mentioning(text: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if text in line]


def processes_mentioning(text: str) -> list[str]:
    found = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def mirror_reachable() -> bool:
    """Whether the Debian mirror answers (mmdebstrap needs it)."""
    try:
        req = urllib.request.Request(MIRROR, method="HEAD")
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status == 200
    except OSError:
        return False


def debian_tarball_unavailable() -> str | None:
    """Why the minbase tarball cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "building the Debian tarball needs root"
    if not shutil.which("mmdebstrap"):
        return "mmdebstrap is missing (apt-get install mmdebstrap)"
    if artifacts.dpkg_status(DEBIAN_TAR) is None and not mirror_reachable():
        return f"{MIRROR} is not reachable, so mmdebstrap cannot build the Debian tarball"
    return None


def build_debian_tarball(timeout: float = 900) -> str:
    """The cached ``mmdebstrap --variant=minbase bookworm`` tarball, built (or
    rebuilt, if what is cached is not a readable Debian root tarball) on first
    use. Raises RuntimeError if mmdebstrap fails."""
    return artifacts.cached_minbase(DEBIAN_TAR, timeout=timeout)


def host_owners(top: str) -> set[tuple[int, int]]:
    """Every (uid, gid) that owns something under ``top`` on the host, ``top`` included."""
    owners = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            st = os.lstat(n)
            owners.add((st.st_uid, st.st_gid))
    return owners
