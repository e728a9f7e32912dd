"""
Helpers for the ``shiftfs run`` tests: throwaway users with subordinate id
ranges (``bench/subusers.py``, shared with the bench), small root filesystems
that borrow the host's /usr, a cached Debian minbase tarball, and
process/mount leak checks.
"""

from __future__ import annotations

import errno
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import artifacts  # noqa: E402
from bench.subusers import SUBID_FILES, User, throwaway_users  # noqa: E402,F401  (the one copy, shared with the bench)

#: Cached artifacts; ``SHIFTFS_CACHE_DIR`` moves them (CI empties it every run).
CACHE = artifacts.cache_dir("/var/cache/shiftfs-test")
DEBIAN_TAR = os.path.join(CACHE, "bookworm-minbase.tar")
MIRROR = "http://deb.debian.org/debian/dists/bookworm/InRelease"

#: Host binaries inside a container: ROOT gets Debian's merged-/usr symlinks
#: and the host's /usr bound read-only.
HOST_USR = ["--bind", "/usr:/usr:ro"]


def run_argv() -> list[str]:
    return [sys.executable, "-m", "shiftfs", "run"]


#: root, as a :class:`User` (its ``wrap`` leaves argv as it is).
ROOT_USER = User("root", 0, 0)


def users_fixture(with_range: int, without_range: int, *, one: bool = False):
    """A module's throwaway users, as a module-scoped fixture: ``users = users_fixture(1, 1)``
    (the first ``with_range`` of them with a subordinate id range); with ``one`` the fixture is
    that one user, not a list. Skips unless root has useradd."""

    @pytest.fixture(scope="module")
    def users() -> Iterator:
        if os.geteuid() != 0:
            pytest.skip("needs root to create throwaway users")
        if not os.path.exists("/usr/sbin/useradd"):
            pytest.skip("useradd is missing (package passwd)")
        with throwaway_users(with_range=with_range, without_range=without_range) as us:
            yield us[0] if one else us

    return users


def pty_run(argv: list[str], cwd: str, *, when: bytes, send: bytes, timeout: float = 30) -> tuple[str, int]:
    """Run ``argv`` on a new pseudo-terminal (the one pty driver); once its output holds
    ``when``, type ``send`` (``b"\\x03"``: ^C). Returns what it printed and its exit code."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.execv(argv[0], argv)
    buf = b""
    deadline = time.monotonic() + timeout
    sent = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 1024)
            except OSError as e:
                if e.errno == errno.EIO:  # the terminal's other side is closed: it exited
                    break
                raise
            if not chunk:
                break
            buf += chunk
        if not sent and when in buf:
            time.sleep(0.2)
            os.write(fd, send)
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return buf.decode(errors="replace"), os.waitstatus_to_exitcode(status)


def wait_for_line(stream, text: str, timeout: float) -> None:
    """Read lines of ``stream`` until one holds ``text``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([stream], [], [], 0.1)
        if r and text in stream.readline():
            return
    raise AssertionError(f"no {text!r} within {timeout}s")


def command_pid(p: subprocess.Popen, owner: User, what: str) -> int:
    """The pid of the command ``p`` started: ``p`` itself for root, its child under runuser for a test user."""
    if owner.is_root:
        return p.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        ppid = int(f.read().rpartition(")")[2].split()[1])
                except OSError:
                    continue
                if ppid == p.pid:
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"{what} is not running under runuser")


def stop(p: subprocess.Popen, grace: float = 10) -> None:
    """End a ``shiftfs run`` started with Popen, if it still runs: SIGTERM (runuser and shiftfs run
    pass it on to the command), then SIGKILL after ``grace`` s."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


#: ``shiftfs run`` and ``exec`` end with the command's exit status (128+N for signal N, 127 not
#: found, 126 not executable).
EXIT_CASES = [
    (["true"], 0),
    (["sh", "-c", "exit 7"], 7),
    (["sh", "-c", "kill -9 $$"], 137),
    (["no-such-command"], 127),
    (["/etc"], 126),
]


def assert_usage_error(code: int, err: str, needle: str, prog: str, args) -> None:
    """``shiftfs PROG ARGS`` refused its arguments: exit 125 and one line naming the problem."""
    assert code == 125, (args, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], (args, err)
    assert lines[0].startswith(f"shiftfs {prog}: ")


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
