"""Helpers for the offline tool tests: a rootfs-like tree, runs, snapshots."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from asuser import run_as

#: An unprivileged uid/gid with no passwd entry, for imports and exports.
USER = 4242
#: Ids used in ACLs; they have no names on the host, so GNU tar stores numbers.
ACL_UID = 3456
ACL_GID = 3457

SHIFTFS = [sys.executable, "-m", "shiftfs"]

HAVE_TOOLS = all(shutil.which(t) for t in ("tar", "bsdtar", "cpio", "setcap", "setfacl", "getfattr", "setpriv"))
IS_ROOT = os.geteuid() == 0

LONG = "l" * 150
NON_UTF8 = b"bad-\xff\xfe-name"


def workdir() -> Path:
    """A scratch directory the unprivileged test user can enter."""
    d = Path(tempfile.mkdtemp(prefix="shiftfs-archive-"))
    d.chmod(0o755)
    return d


def run(argv, *, user: int | None = None, env=None, check=True, input=None, cwd=None) -> subprocess.CompletedProcess:
    """``argv`` (as ``user``, through ``asuser.run_as``, if given) with our environment and the
    checkout on PYTHONPATH; output as bytes."""
    full_env = dict(os.environ)
    full_env.pop("SUDO_UID", None)
    full_env.pop("SUDO_GID", None)
    full_env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    if env:
        full_env.update(env)
    if user is not None:
        proc = run_as(user, user, argv, env=full_env, input=input, cwd=cwd, timeout=None, text=False)
    else:
        proc = subprocess.run(argv, capture_output=True, env=full_env, input=input, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{argv} failed with {proc.returncode}:\nstdout: {proc.stdout.decode(errors='replace')}\n"
            f"stderr: {proc.stderr.decode(errors='replace')}"
        )
    return proc


def shiftfs(*args, user: int | None = None, env=None, check=True, input=None) -> subprocess.CompletedProcess:
    return run([*SHIFTFS, *map(str, args)], user=user, env=env, check=check, input=input)


def _touch(path: Path, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def build_rootfs(root: Path, with_socket: bool = False) -> None:
    """A small tree with what a real root filesystem has (run as root)."""
    root.mkdir()
    for d in ("etc", "dev/pts", "usr/bin", "usr/lib", "var/spool/mail", "tmp", "home/u", "srv/setgid"):
        (root / d).mkdir(parents=True)
    _touch(root / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n")
    _touch(root / "etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640, 0, 42)
    _touch(root / "etc/empty", b"", 0o600)
    true_bin = Path("/bin/true").read_bytes()
    _touch(root / "usr/bin/su", true_bin, 0o4755)
    _touch(root / "usr/bin/wall", true_bin, 0o2755, 0, 5)
    _touch(root / "usr/bin/ping", true_bin, 0o755)
    subprocess.run(["setcap", "cap_net_raw+ep", str(root / "usr/bin/ping")], check=True)
    os.link(root / "usr/bin/su", root / "usr/bin/su-link")
    os.link(root / "etc/passwd", root / "usr/lib/passwd-hardlink")
    _touch(root / "usr/lib/big.bin", os.urandom(1 << 20) + b"tail", 0o644)
    os.symlink("../usr/bin/su", root / "usr/lib/su-symlink")
    os.symlink("/" + "x" * 200, root / "usr/lib/long-target")
    os.lchown(root / "usr/lib/su-symlink", 33, 44)
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev/sda1", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.chown(root / "dev/sda1", 0, 6)
    os.mknod(root / "dev/pts/ptmx", stat.S_IFCHR | 0o000, os.makedev(5, 2))
    for dev, perm in (("null", 0o666), ("sda1", 0o660), ("pts/ptmx", 0o000)):
        os.chmod(root / "dev" / dev, perm)  # mknod applied the umask
    os.link(root / "dev/null", root / "dev/null-link")
    os.mkfifo(root / "dev/initctl", 0o600)
    os.mkfifo(root / "var/spool/fifo", 0o620)
    os.chmod(root / "var/spool/fifo", 0o620)
    os.chown(root / "var/spool/fifo", 100, 101)
    os.chown(root / "var/spool/mail", 0, 8)
    os.chmod(root / "var/spool/mail", 0o2775)
    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "home/u", 1000, 1000)
    os.chmod(root / "home/u", 0o700)
    _touch(root / "home/u/.profile", b"# profile\n", 0o644, 1000, 1000)
    os.chown(root / "srv/setgid", 0, 50)
    os.chmod(root / "srv/setgid", 0o2770)
    _touch(root / "srv/r-only", b"read only\n", 0o444, 2, 3)
    _touch(root / "srv/no-perm", b"secret\n", 0o000, 7, 7)
    (root / "srv/unreadable-dir").mkdir(mode=0o000)
    _touch(root / f"srv/{LONG}", b"long name\n")
    deep = root / "srv" / "/".join(["d" * 60] * 5)
    deep.mkdir(parents=True)
    _touch(deep / "deep-file", b"deep\n")
    _touch(root / "srv/h\u00e9llo w\u00f6rld \u2603", b"unicode\n")
    _touch(Path(os.fsdecode(bytes(root) + b"/srv/" + NON_UTF8)), b"not utf-8\n")
    _touch(root / "srv/acl-file", b"acl\n", 0o640)
    subprocess.run(["setfacl", "-m", f"u:{ACL_UID}:rw,g:{ACL_GID}:r", str(root / "srv/acl-file")], check=True)
    subprocess.run(["setfacl", "-d", "-m", f"u:{ACL_UID}:rwx", str(root / "srv/setgid")], check=True)
    os.setxattr(root / "etc/passwd", "user.comment", b"hello")
    os.setxattr(root / "srv/acl-file", "user.bin", bytes(range(256)))
    # Deterministic times, some with nanoseconds, one before 1970.
    for i, (dirpath, dirnames, filenames) in enumerate(os.walk(root, topdown=False)):
        for n in filenames + dirnames:
            p = os.path.join(dirpath, n)
            os.utime(
                p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000 + i * 1_000_123_457), follow_symlinks=False
            )
    os.utime(root / "etc/empty", ns=(0, 86400 * 1_000_000_000))
    if with_socket:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(root / "srv/sock"))
        s.close()
        os.chown(root / "srv/sock", 9, 9)
    os.utime(root / "srv", ns=(1_600_000_000_000_000_000, 1_650_000_000_123_456_789))
    os.utime(root, ns=(1_600_000_000_000_000_000, 1_650_000_000_000_000_000))


def gnu_tar_create(src: Path, out: Path) -> None:
    run(
        [
            "tar",
            "--xattrs",
            "--acls",
            "--xattrs-include=*",
            "--numeric-owner",
            "--sort=name",
            "-C",
            str(src),
            "-cf",
            str(out),
            ".",
        ]
    )


def gnu_tar_extract(archive: Path, dest: Path) -> None:
    dest.mkdir()
    run(["tar", "--xattrs", "--acls", "--xattrs-include=*", "--numeric-owner", "-xpf", str(archive), "-C", str(dest)])


def listing(archive: Path, *extra: str) -> str:
    return run(["tar", "--numeric-owner", *extra, "-tvf", str(archive)]).stdout.decode("utf-8", "surrogateescape")


def snapshot(root: Path, xattrs: bool = True, dir_mtimes: bool = True, skip=(b".shiftfs",)) -> dict:
    """Every path's metadata, content hash, link target, xattrs and link group."""
    out: dict[bytes, tuple] = {}
    first_name: dict[tuple[int, int], bytes] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        if dirpath == base:
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in [b"."] + sorted(dirnames + filenames) if dirpath == base else sorted(dirnames + filenames):
            p = dirpath if name == b"." else os.path.join(dirpath, name)
            rel = os.path.relpath(p, base)
            st = os.lstat(p)
            key = (st.st_dev, st.st_ino)
            group = first_name.setdefault(key, rel) if not stat.S_ISDIR(st.st_mode) else rel
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            xa = None
            if xattrs:
                xa = tuple(
                    sorted(
                        (n, os.getxattr(p, n, follow_symlinks=False)) for n in os.listxattr(p, follow_symlinks=False)
                    )
                )
            mtime = st.st_mtime_ns if (dir_mtimes or not stat.S_ISDIR(st.st_mode)) else None
            rdev = st.st_rdev if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else 0
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, rdev, st.st_size, mtime, content, target, xa, group)
    return out


def diff_snapshots(a: dict, b: dict) -> list[str]:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{k!r}:\n  {a.get(k)}\n  {b.get(k)}")
    return lines
