"""``shiftfs exec`` in a single-id namespace (a user without /etc/subuid range):
chown and device mknod are trapped with seccomp user notification and
recorded by the view's daemon (shiftfs.container.seccomp_notify).

Each trapped call is made as the raw system call (ctypes ``syscall`` with the
x86_64 numbers), in every dirfd/flag form, by a throwaway user without a
range; the result is read back with ``shiftfs export``. Targets outside the
views must get the kernel's own answers, and a race that swaps a symlink
under a chown must change nothing outside the user's tree.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile

import pytest
from ns_util import User, host_owners, remove_tree, users_fixture, workdir
from records import RECORD

from shiftfs.container import launcher, preflight

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates test users: run as root"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the script uses x86_64 system call numbers"),
]


users = users_fixture(0, 1)


@pytest.fixture(scope="module")
def user(users):
    try:
        import seccomp  # noqa: F401
    except ImportError:
        pytest.skip("python3-seccomp is not linked into the venv (make setup)")
    bad = preflight.blocked_component(launcher.__file__, 65533, {65533}, 4)
    if bad:
        pytest.skip(f"{bad} is not searchable by other users; move the checkout (see README)")
    return users[0]


@pytest.fixture
def wd(user):
    d = workdir()
    os.chown(d, user.uid, user.gid)
    for sub in ("r", "outside"):
        os.mkdir(os.path.join(d, sub), 0o700)
        os.chown(os.path.join(d, sub), user.uid, user.gid)
    yield d
    remove_tree(d)


def shiftfs_exec(user: User, wd: str, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = user.wrap([sys.executable, "-m", "shiftfs", "exec", "--shift", "r", "--", *command])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=wd)


def export(user: User, wd: str) -> dict[str, tarfile.TarInfo]:
    out = os.path.join(wd, "out.tar")
    subprocess.run(
        user.wrap([sys.executable, "-m", "shiftfs", "export", os.path.join(wd, "r"), "-o", out]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    with tarfile.open(out) as tf:
        entries = {m.name.removeprefix("./"): m for m in tf}
    os.unlink(out)
    return entries


# Runs inside the namespace as namespace root: every trapped call as a raw system call.
#: The start of a script run as namespace root: ``call(tag, name, *args)`` makes the raw system
#: call ``name`` and records 0 or its errno in ``res[tag]``; umask 0, in the directory argv[1].
SYSCALLS = r"""
import ctypes, json, os, stat, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = dict(chown=92, fchown=93, lchown=94, fchownat=260, mknod=133, mknodat=259)
AT_FDCWD, NOFOLLOW, EMPTY = -100, 0x100, 0x1000
res = {}
def call(tag, name, *args):
    cargs = [ctypes.c_char_p(a) if isinstance(a, bytes) else ctypes.c_long(a) for a in args]
    rc = libc.syscall(NR[name], *cargs)
    res[tag] = 0 if rc == 0 else ctypes.get_errno()
os.umask(0)
os.chdir(sys.argv[1])
"""

CALLS = (
    SYSCALLS
    + r"""
for n in "a b c d e f g h i s".split():
    open("r/" + n, "w").close()
os.mkdir("r/sub")
os.symlink("b", "r/lnk")
os.symlink("c", "r/lnk2")
os.symlink("f", "r/lnk3")
os.symlink(os.path.abspath("outside/y"), "r/out")
open("outside/x", "w").close()
open("outside/y", "w").close()
call("chown", "chown", b"r/a", 42, 43)
call("lchown", "lchown", b"r/lnk", 44, 45)
call("chown-follows", "chown", b"r/lnk2", 46, 47)
fd = os.open("r/d", os.O_RDONLY)
call("fchown", "fchown", fd, 48, 49)
os.close(fd)
r = os.open("r", os.O_RDONLY | os.O_DIRECTORY)
call("fchownat-dirfd", "fchownat", r, b"e", 50, 51, 0)
call("fchownat-nofollow", "fchownat", r, b"lnk3", 52, 53, NOFOLLOW)
g = os.open("r/g", os.O_RDONLY)
call("fchownat-empty", "fchownat", g, b"", 54, 55, EMPTY)
os.close(g)
os.chdir("r/sub")
call("fchownat-empty-cwd", "fchownat", AT_FDCWD, b"", 56, 57, EMPTY)
call("fchownat-dotdot", "fchownat", AT_FDCWD, b"../h", 58, -1, 0)
os.chdir("../..")
call("chown-absolute", "chown", os.path.abspath("r/i").encode(), 60, 61)
os.chmod("r/s", 0o6755)
call("chown-kills-setuid", "chown", b"r/s", 62, 62)
call("mknod-chr", "mknod", b"r/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
call("mknodat-blk", "mknodat", r, b"sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
call("mknodat-fifo", "mknodat", AT_FDCWD, b"r/fifo", stat.S_IFIFO | 0o640, 0)
call("mknod-exists", "mknod", b"r/null", stat.S_IFCHR | 0o666, os.makedev(1, 5))
call("mknod-no-parent", "mknod", b"r/nodir/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
up = os.path.abspath("r/sub").encode() + b"/../zero"
call("mknod-abs-dotdot", "mknod", up, stat.S_IFCHR | 0o644, os.makedev(1, 5))
# outside the views: the kernel's answers
call("outside-chown", "chown", b"outside/x", 42, 42)
call("outside-follow", "chown", b"r/out", 42, 42)
call("outside-lchown-of-link", "lchown", b"r/out", 63, 63)
x = os.open("outside/x", os.O_RDONLY)
call("outside-fchown", "fchown", x, 42, 42)
os.close(x)
call("outside-mknod", "mknod", b"outside/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
# the kernel's own checks stay
p = os.open("r/a", os.O_PATH)
call("fchown-opath", "fchown", p, 42, 42)
os.close(p)
call("fchownat-bad-flags", "fchownat", r, b"e", 42, 42, 0x4)
call("fchownat-empty-without-flag", "fchownat", r, b"", 42, 42, 0)
call("chown-missing", "chown", b"r/missing", 42, 42)
call("chown-nothing", "chown", b"r/a", -1, -1)
# after the chown, root of the namespace still owns it for the kernel: chmod, utime, rename work
os.chmod("r/a", 0o4750)
os.utime("r/a", (1, 1))
os.rename("r/a", "r/a2")
st = os.stat("r/a2")
res["inside-stat"] = [st.st_uid, st.st_gid, oct(st.st_mode)]
st = os.stat("r/null")
res["inside-dev"] = [stat.S_ISCHR(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev)]
print(json.dumps(res))
"""
)

WANT = {
    # name: (type, mode, uid, gid, (major, minor) or None)
    "a2": ("reg", 0o4750, 42, 43),
    "lnk": ("sym", 0o777, 44, 45),
    "b": ("reg", 0o666, 0, 0),
    "c": ("reg", 0o666, 46, 47),
    "lnk2": ("sym", 0o777, 0, 0),
    "d": ("reg", 0o666, 48, 49),
    "e": ("reg", 0o666, 50, 51),
    "lnk3": ("sym", 0o777, 52, 53),
    "f": ("reg", 0o666, 0, 0),
    "g": ("reg", 0o666, 54, 55),
    "sub": ("dir", 0o777, 56, 57),
    "h": ("reg", 0o666, 58, 0),
    "i": ("reg", 0o666, 60, 61),
    "s": ("reg", 0o755, 62, 62),
    "null": ("chr", 0o666, 0, 0),
    "sda": ("blk", 0o660, 0, 0),
    "fifo": ("fifo", 0o640, 0, 0),
    "zero": ("chr", 0o644, 0, 0),
    "out": ("sym", 0o777, 63, 63),
}
_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.SYMTYPE: "sym",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "chr",
    tarfile.BLKTYPE: "blk",
    tarfile.FIFOTYPE: "fifo",
}


def test_every_trapped_call(user, wd):
    res = shiftfs_exec(user, wd, sys.executable, "-c", CALLS, wd)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.splitlines()[-1])
    ok = [
        "chown",
        "lchown",
        "chown-follows",
        "fchown",
        "fchownat-dirfd",
        "fchownat-nofollow",
        "fchownat-empty",
        "fchownat-empty-cwd",
        "fchownat-dotdot",
        "chown-absolute",
        "chown-kills-setuid",
        "mknod-chr",
        "mknodat-blk",
        "mknodat-fifo",
        "mknod-abs-dotdot",
        "outside-lchown-of-link",
        "chown-nothing",
    ]
    assert {k: got[k] for k in ok} == dict.fromkeys(ok, 0)
    import errno

    assert got["mknod-exists"] == errno.EEXIST
    assert got["mknod-no-parent"] == errno.ENOENT
    # outside the views the kernel answers as it always did
    assert got["outside-chown"] == errno.EINVAL
    assert got["outside-follow"] == errno.EINVAL
    assert got["outside-fchown"] == errno.EINVAL
    assert got["outside-mknod"] == errno.EPERM
    assert got["fchown-opath"] == errno.EBADF
    assert got["fchownat-bad-flags"] == errno.EINVAL
    assert got["fchownat-empty-without-flag"] == errno.ENOENT
    assert got["chown-missing"] == errno.ENOENT
    # the kernel is shown ids it can map: the namespace's root
    assert got["inside-stat"] == [0, 0, oct(0o104750)]
    assert got["inside-dev"] == [True, 1, 3]

    entries = export(user, wd)
    for name, (kind, mode, uid, gid) in WANT.items():
        m = entries[name]
        assert (_TYPES[m.type], m.mode, m.uid, m.gid) == (kind, mode, uid, gid), name
    assert (entries["null"].devmajor, entries["null"].devminor) == (1, 3)
    assert (entries["sda"].devmajor, entries["sda"].devminor) == (8, 0)
    assert (entries["zero"].devmajor, entries["zero"].devminor) == (1, 5)
    # on the host, everything stays the user's; devices are placeholders; nothing outside got a record
    assert host_owners(wd) == {(user.uid, user.gid)}
    for n in ("null", "sda", "zero"):
        assert os.path.isfile(os.path.join(wd, "r", n))
    for n in ("x", "y"):
        assert RECORD not in os.listxattr(os.path.join(wd, "outside", n))


def test_without_cap_chown_the_kernel_answers(user, wd):
    script = "touch r/f; chown 42 r/f; echo chown=$?; mknod r/n c 1 3; echo mknod=$?"
    res = shiftfs_exec(user, wd, "setpriv", "--bounding-set", "-chown,-mknod", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    assert "chown=1" in res.stdout and "mknod=1" in res.stdout
    assert export(user, wd)["f"].uid == 0
    # root of a user namespace the command made has its capabilities there, not in ours
    script = "unshare -r sh -c 'chown 43 r/f; echo nested=$?; mknod r/n2 c 1 3; echo nested-mknod=$?'"
    res = shiftfs_exec(user, wd, "sh", "-c", script)
    assert "nested=1" in res.stdout and "nested-mknod=1" in res.stdout, res.stdout + res.stderr
    assert export(user, wd)["f"].uid == 0


RACE = r"""
import ctypes, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
os.chdir(sys.argv[1])
victim = os.path.abspath("outside/victim")
open(victim, "w").close()
open("r/target", "w").close()
os.mkdir("r/dir")
stop = False
def swap():
    while not stop:
        for dest in (victim, "target"):
            try:
                os.symlink(dest, "r/tmp")
                os.rename("r/tmp", "r/race")
            except OSError:
                pass
        try:  # a path component that changes under the chown too
            os.rename("r/dir", "r/dir2")
            os.symlink(os.path.abspath("outside"), "r/dir")
            os.unlink("r/dir")
            os.rename("r/dir2", "r/dir")
        except OSError:
            pass
t = threading.Thread(target=swap)
t.start()
results = {}
for i in range(300):
    rc = libc.chown(b"r/race", 42, 42)
    e = 0 if rc == 0 else ctypes.get_errno()
    results[e] = results.get(e, 0) + 1
    libc.chown(b"r/dir/victim", 43, 43)
stop = True
t.join()
print(sorted(results.items()))
"""


def test_a_race_changes_nothing_outside_the_users_tree(user, wd):
    res = shiftfs_exec(user, wd, sys.executable, "-c", RACE, wd, timeout=300)
    assert res.returncode == 0, res.stderr
    results = dict(eval(res.stdout.splitlines()[-1]))  # [(errno, count), ...]
    import errno

    assert set(results) <= {0, errno.EINVAL, errno.ENOENT}
    assert results.get(0, 0) > 0
    assert host_owners(wd) == {(user.uid, user.gid)}
    assert RECORD not in os.listxattr(os.path.join(wd, "outside", "victim"))
    assert export(user, wd)["target"].uid in (0, 42)


COPY = """
set -e
cd r
touch f
chown 42:43 f
chmod 2755 f
getfattr --only-values -n user.shiftfs.owner f; echo
cp -a f copy
setfattr -n user.shiftfs.owner -v 7:8 g 2>/dev/null && echo set-refused-missing || true
touch g
setfattr -n user.shiftfs.owner -v 7:8 g
if setpriv --bounding-set -chown setfattr -n user.shiftfs.owner -v 9:9 g 2>/dev/null; then echo nocap-set; fi
if setfattr -n user.shiftfs.owner -v bad g 2>/dev/null; then echo bad-set; fi
touch ../outside/h
setfattr -n user.shiftfs.owner -v 5:5 ../outside/h
stat -c '%u:%g %a' copy
"""


def test_cp_a_keeps_the_owner_through_the_owner_xattr(user, wd):
    """cp -a copies owners by stat, which shows 0 inside; the view's read-only
    owner xattr, copied by cp too, carries the real owner to the copy."""
    res = shiftfs_exec(user, wd, "sh", "-c", COPY)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["42:43", "0:0", "2755"]
    entries = export(user, wd)
    assert (entries["copy"].uid, entries["copy"].gid, entries["copy"].mode) == (42, 43, 0o2755)
    assert (entries["g"].uid, entries["g"].gid) == (7, 8)
    # outside the views it is an ordinary xattr, set by the kernel
    assert os.getxattr(os.path.join(wd, "outside", "h"), "user.shiftfs.owner") == b"5:5"
    assert host_owners(wd) == {(user.uid, user.gid)}


#: What ``--aptopt='APT::Sandbox::User "root"'`` itself leaves in the image: mmdebstrap keeps
#: the option in a file, and apt makes its partial directories root's instead of _apt's.
APT_OPTION_TRACES = {
    "./etc/apt/apt.conf.d/99mmdebstrap": (None, ("reg", "0644", 0, 0, "", None, None)),
    "./var/cache/apt/archives/partial": (("dir", "0700", 42, 0, "", None, None), ("dir", "0700", 0, 0, "", None, None)),
    "./var/lib/apt/lists/partial": (("dir", "0700", 42, 0, "", None, None), ("dir", "0700", 0, 0, "", None, None)),
}


@pytest.mark.timeout(2400)  # may build the shared real-root tarball first
def test_mmdebstrap_matches_a_real_root_build(user, debian_tar, tmp_path):
    """The issue's acceptance: an unprivileged user without a range builds
    Debian minbase with mmdebstrap --mode=root inside shiftfs exec; the
    export equals real root's build in every entry (type, mode, owner,
    group, device numbers, link target, hard links). /dev: mmdebstrap makes
    device nodes only when it can open them, which no mount in a user
    namespace allows, so they come from the device table (as with a range)."""
    import shutil

    from ns_util import mirror_reachable
    from test_exec import _dpkg_versions, diff_entries, reference_and_build, tar_entries

    from shiftfs.offline import devtable

    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is missing (apt-get install mmdebstrap)")
    if not mirror_reachable():
        pytest.skip("the Debian mirror is not reachable")
    d = workdir()
    try:
        os.chown(d, user.uid, user.gid)
        rootfs = os.path.join(d, "rootfs")
        os.mkdir(rootfs, 0o700)
        os.chown(rootfs, user.uid, user.gid)
        argv = [sys.executable, "-m", "shiftfs", "exec", "--shift", "./rootfs", "--", "mmdebstrap"]
        argv += ["--mode=root", "--variant=minbase", '--aptopt=APT::Sandbox::User "root"', "bookworm", "./rootfs"]
        res = subprocess.run(user.wrap(argv), capture_output=True, text=True, timeout=2000, cwd=d)
        assert res.returncode == 0, res.stderr[-3000:]
        assert host_owners(d) == {(user.uid, user.gid)}
        tar = os.path.join(d, "rootfs.tar")
        subprocess.run(
            user.wrap([sys.executable, "-m", "shiftfs", "export", rootfs, "-o", tar]),
            check=True,
            capture_output=True,
            timeout=600,
        )
        with open(os.path.join(rootfs, "var/lib/dpkg/status"), "rb") as f:
            versions = _dpkg_versions(f.read())
        full = str(tmp_path / "rootfs-dev.tar")
        want, got = reference_and_build(debian_tar, versions, tar, full)
        assert len(want) > 5000
        for name, (before, after) in APT_OPTION_TRACES.items():
            assert (want.get(name), got.get(name)) == (before, after), name
            want.pop(name, None)
            got.pop(name, None)
        assert diff_entries(want, got) == []
        # setgid, non-root groups and other owners made it through dpkg, tar, cp -a (usrmerge)
        assert got["./usr/sbin/unix_chkpwd"][:4] == ("reg", "2755", 0, 42)
        assert got["./etc/shadow"][:4] == ("reg", "0640", 0, 42)
        assert got["./usr/bin/passwd"][:4] == ("reg", "4755", 0, 0)
        assert host_owners(d) == {(user.uid, user.gid)}
        # The README's step after the build undoes the apt option's traces: then every entry is equal.
        undo = (
            "rm rootfs/etc/apt/apt.conf.d/99mmdebstrap && chroot rootfs "
            "chown _apt:root /var/cache/apt/archives/partial /var/lib/apt/lists/partial"
        )
        argv = [sys.executable, "-m", "shiftfs", "exec", "--shift", "./rootfs", "--", "sh", "-c", undo]
        res = subprocess.run(user.wrap(argv), capture_output=True, text=True, timeout=300, cwd=d)
        assert res.returncode == 0, res.stderr
        os.unlink(tar)
        subprocess.run(
            user.wrap([sys.executable, "-m", "shiftfs", "export", rootfs, "-o", tar]),
            check=True,
            capture_output=True,
            timeout=600,
        )
        assert diff_entries(*reference_and_build(debian_tar, versions, tar, full)) == []
        assert host_owners(d) == {(user.uid, user.gid)}
    finally:
        remove_tree(d)


# O_PATH descriptors as dirfd and as the AT_EMPTY_PATH target: systemd-tmpfiles
# chowns what it made through them, e.g. fchownat(fd, "", -1, 999, AT_EMPTY_PATH).
O_PATH_CALLS = (
    SYSCALLS
    + r"""
for n in "a b".split():
    open("r/" + n, "w").close()
os.mkdir("r/journal")
os.symlink("a", "r/lnk")
r = os.open("r", os.O_PATH | os.O_DIRECTORY)
call("dirfd-name", "fchownat", r, b"a", 70, 71, 0)
call("dirfd-symlink-nofollow", "fchownat", r, b"lnk", 72, 73, NOFOLLOW)
j = os.open("r/journal", os.O_PATH | os.O_DIRECTORY)
call("empty-path-group-only", "fchownat", j, b"", -1, 999, EMPTY)
b = os.open("r/b", os.O_PATH)
call("empty-path-file", "fchownat", b, b"", 74, 75, EMPTY)
call("mknodat-dirfd", "mknodat", r, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
# the descriptor named through the caller's /proc (libacl, systemd: setxattr of an O_PATH fd)
open("r/c", "w").close()
c = os.open("r/c", os.O_PATH)
NR["chown"] = 92
call("proc-self-fd", "chown", b"/proc/self/fd/%d" % c, 76, 77)
import struct
value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in
    [(1, 6, 0xFFFFFFFF), (4, 4, 0xFFFFFFFF), (8, 5, 4), (0x10, 5, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)])
try:
    os.setxattr("/proc/thread-self/fd/%d" % c, "system.posix_acl_access", value)
    res["proc-fd-acl"] = 0
except OSError as e:
    res["proc-fd-acl"] = e.errno
# the kernel's own answers stay: fchown of an O_PATH descriptor is EBADF
call("fchown-opath", "fchown", b, 42, 42)
x = os.open("outside", os.O_PATH | os.O_DIRECTORY)
open("outside/x", "w").close()
call("outside-dirfd", "fchownat", x, b"x", 42, 42, 0)
call("outside-mknodat", "mknodat", x, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
print(json.dumps(res))
"""
)


def test_o_path_descriptors(user, wd):
    """fchownat and mknodat through an O_PATH dirfd, and fchownat of an O_PATH
    descriptor with AT_EMPTY_PATH (systemd-tmpfiles' form), are recorded."""
    import errno

    res = shiftfs_exec(user, wd, sys.executable, "-c", O_PATH_CALLS, wd)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.splitlines()[-1])
    ok = ["dirfd-name", "dirfd-symlink-nofollow", "empty-path-group-only", "empty-path-file", "mknodat-dirfd"]
    ok += ["proc-self-fd", "proc-fd-acl"]
    assert {k: got[k] for k in ok} == dict.fromkeys(ok, 0)
    assert got["fchown-opath"] == errno.EBADF
    assert got["outside-dirfd"] == errno.EINVAL
    assert got["outside-mknodat"] == errno.EPERM
    entries = export(user, wd)
    want = {
        "a": ("reg", 0o666, 70, 71),
        "lnk": ("sym", 0o777, 72, 73),
        "journal": ("dir", 0o777, 0, 999),
        "b": ("reg", 0o666, 74, 75),
        "null": ("chr", 0o666, 0, 0),
        "c": ("reg", 0o654, 76, 77),
    }
    for name, (kind, mode, uid, gid) in want.items():
        m = entries[name]
        assert (_TYPES[m.type], m.mode, m.uid, m.gid) == (kind, mode, uid, gid), name
    assert host_owners(wd) == {(user.uid, user.gid)}


ACLS = """
cd r
touch f s m
mkdir journal
chown 0:999 journal
chmod 2755 journal
setfacl -d -m g:4:r-x journal && echo default=0
setfacl -m g:4:r-x journal && echo access=0
getfacl journal >/dev/null 2>&1 || echo read=EINVAL
setfacl -m u:5:rwx f && echo named-user=0
setfacl -m g:0:rw m && echo mappable=0
chown 0:42 s
chmod 2755 s
setpriv --bounding-set -fsetid setfacl -m u:6:r s && echo nofsetid=0
touch ../outside/x
setfacl -m g:4:r ../outside/x 2>/dev/null || echo outside=EINVAL
setpriv --bounding-set -fowner setfacl -m g:4:r f 2>/dev/null || echo nofowner=EINVAL
touch new
mkdir journal/sub && touch journal/sub/file
stat -c '%a' f
"""


def test_acls_naming_unmappable_ids_are_recorded(user, wd):
    """setfacl (systemd-tmpfiles too) of an ACL that names ids the single-id
    namespace cannot map: the kernel refuses it (EINVAL); the view's daemon
    stores it as with a range, the mode in step, and export carries it."""
    from shiftfs.ownership import acl

    res = shiftfs_exec(user, wd, "sh", "-c", ACLS)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    for tag in ("access=0", "default=0", "named-user=0", "mappable=0", "nofsetid=0"):
        assert tag in lines, res.stdout + res.stderr
    assert "outside=EINVAL" in lines and "nofowner=EINVAL" in lines
    # the kernel cannot show such an ACL inside (a limit, see the README): it reads as EINVAL
    assert "read=EINVAL" in lines
    assert lines[-1] == "674"  # the mask (rwx) is the group class of the mode
    entries = export(user, wd)

    def acl_of(name: str, which: str = "access") -> list[tuple[int, int, int]] | None:
        raw = entries[name].pax_headers.get(f"SCHILY.xattr.system.posix_acl_{which}")
        return None if raw is None else acl.parse(raw.encode("utf-8", "surrogateescape"))

    U, G, M = acl.USER, acl.GROUP, acl.MASK
    journal = entries["journal"]
    assert (journal.mode, journal.uid, journal.gid) == (0o2755, 0, 999)
    assert (G, 5, 4) in (acl_of("journal") or [])
    assert (G, 5, 4) in (acl_of("journal", "default") or [])
    assert (U, 7, 5) in (acl_of("f") or []) and (M, 7, 0xFFFFFFFF) in (acl_of("f") or [])
    assert entries["f"].mode == 0o674
    assert (G, 6, 0) in (acl_of("m") or [])
    # no CAP_FSETID and not in group 42: the setgid bit goes, as the kernel does it
    assert (entries["s"].mode, entries["s"].gid) == (0o755, 42)
    assert (U, 4, 6) in (acl_of("s") or [])
    # the default ACL is inherited by what is made below
    assert (G, 5, 4) in (acl_of("journal/sub") or [])
    assert (G, 5, 4) in (acl_of("journal/sub/file") or [])
    assert acl_of("new") is None
    assert host_owners(wd) == {(user.uid, user.gid)}
    assert not [n for n in os.listxattr(os.path.join(wd, "outside", "x")) if "acl" in n]


SETGROUPS = r"""
import json, os
res = {}
before = os.getgroups()
for tag, groups in (("own", [0]), ("empty", []), ("other", [5]), ("own-and-other", [0, 5])):
    try:
        os.setgroups(groups)
        res[tag] = 0
    except OSError as e:
        res[tag] = e.errno
res["unchanged"] = os.getgroups() == before
print(json.dumps(res))
"""


def test_setgroups_of_the_own_gid_succeeds_as_a_no_op(user, wd):
    """A single-id namespace denies setgroups; mkosi 24 calls setgroups([0])
    before each sync and stopped there. The caller's own gid (or none) succeeds and
    changes nothing; any other list keeps the kernel's EPERM."""
    import errno

    res = shiftfs_exec(user, wd, sys.executable, "-c", SETGROUPS)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.splitlines()[-1])
    assert got == {"own": 0, "empty": 0, "other": errno.EPERM, "own-and-other": errno.EPERM, "unchanged": True}
