"""POSIX corners where shiftfs differed from ext4 and a kernel idmapped mount (project issue 15).

Each test drives a real mount through the CLI, in both ownership modes where
the behaviour applies: ``table`` (``--map b:100000:0:65536``, disk 100000+k is
view k) and ``xattr`` (``--xattr``). Root runs the tests; other users act
through ``setpriv`` (no capabilities).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import time

import pytest
from asuser import py_as, run_as
from fsutil import MAP, MODE_ARGS, SHIFTFS, find_mount, have
from sysx import renameat2

pytestmark = [pytest.mark.root, pytest.mark.fuse]

RENAME_WHITEOUT = 4


@pytest.fixture
def m(shiftfs_mount, mode):
    """A fresh mount of SOURCE in ``mode``, reachable by other users."""
    mnt = shiftfs_mount(*MODE_ARGS[mode])
    os.chmod(mnt.mountpoint, 0o755)
    return mnt


# -- 1: ctime on chown of objects whose record lives in the side table ----------------


def _make_special(path: str, kind: str) -> None:
    if kind == "file":
        open(path, "w").close()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.symlink("target", path)
    else:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(path)
        finally:
            s.close()


@pytest.mark.parametrize("kind", ["fifo", "socket", "symlink"])
def test_chown_updates_ctime(m, kind):
    p = m.path("obj")
    _make_special(p, kind)
    before = os.lstat(p)
    time.sleep(0.05)  # the kernel's timestamp clock is coarse (jiffies)
    os.lchown(p, 5, 6)
    after = os.lstat(p)
    assert (after.st_uid, after.st_gid) == (5, 6)
    assert after.st_ctime_ns > before.st_ctime_ns, "chown must update ctime (POSIX)"
    # and not only in the kernel's cache: the daemon reports it too
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
    assert os.lstat(p).st_ctime_ns > before.st_ctime_ns


def test_chmod_to_same_mode_updates_ctime(m):
    """A chmod of a FIFO that leaves the bits as they are still changes ctime (ext4 does)."""
    p = m.path("obj")
    _make_special(p, "fifo")
    os.chmod(p, 0o644)
    before = os.lstat(p)
    time.sleep(0.05)
    os.chmod(p, 0o644)
    assert os.lstat(p).st_ctime_ns > before.st_ctime_ns


# -- 2: RENAME_WHITEOUT gives the whiteout the caller's ids --------------------------


def test_rename_whiteout_owner_table(shiftfs_mount):
    """As on a kernel idmapped mount: the whiteout belongs to the caller (view 0:0, disk 100000)."""
    mnt = shiftfs_mount("--map", MAP)
    a, b = mnt.path("a"), mnt.path("b")
    with open(a, "w") as f:
        f.write("x")
    renameat2(a, b, RENAME_WHITEOUT)
    st = os.lstat(a)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (st.st_uid, st.st_gid) == (0, 0)
    bst = os.lstat(mnt.backing("a"))
    assert (bst.st_uid, bst.st_gid) == (100000, 100000)
    assert os.lstat(b).st_uid == 0


def test_rename_whiteout_setgid_dir_table(shiftfs_mount):
    """Under a setgid directory the whiteout takes the directory's group, as any new inode does."""
    mnt = shiftfs_mount("--map", MAP)
    d = mnt.path("d")
    os.mkdir(d)
    os.chown(d, 0, 7)
    os.chmod(d, 0o2775)
    with open(os.path.join(d, "a"), "w") as f:
        f.write("x")
    renameat2(os.path.join(d, "a"), os.path.join(d, "b"), RENAME_WHITEOUT)
    st = os.lstat(os.path.join(d, "a"))
    assert (st.st_uid, st.st_gid) == (0, 7)
    bst = os.lstat(mnt.backing("d", "a"))
    assert (bst.st_uid, bst.st_gid) == (100000, 100007)


def test_rename_whiteout_xattr(shiftfs_mount):
    """xattr mode (root daemon): the whiteout shows as a char 0:0 device of the caller's."""
    mnt = shiftfs_mount("--xattr")
    a, b = mnt.path("a"), mnt.path("b")
    open(a, "w").close()
    renameat2(a, b, RENAME_WHITEOUT)
    st = os.lstat(a)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and (st.st_uid, st.st_gid) == (0, 0)
    assert sorted(os.listdir(mnt.mountpoint)) == ["a", "b"]


# -- 5: an ACL write that changes the mode clears SGID like chmod does ----------------


def _acl_rwx_as_100(p) -> int:
    """uid 100 (group 101, no other groups) sets the ACL of ``p`` to rwx for all; the mode bits after."""
    run_as(100, 101, ["setfacl", "-m", "u::rwx,g::rwx,o::rwx", p], check=True)
    return os.stat(p).st_mode & 0o7777


@pytest.mark.skipif(not have("setfacl"), reason="needs setfacl")
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_setfacl_clears_sgid_outside_group(m, kind):
    p = m.path("obj")
    if kind == "dir":
        os.mkdir(p)
    else:
        open(p, "w").close()
    os.chown(p, 100, 0)
    os.chmod(p, 0o2755)
    assert os.stat(p).st_mode & 0o7777 == 0o2755
    # the chmod path, for reference: uid 100 is not in group 0
    run_as(100, 101, ["chmod", "2777", p], check=True)
    assert os.stat(p).st_mode & 0o7777 == 0o777
    os.chmod(p, 0o2755)
    assert oct(_acl_rwx_as_100(p)) == oct(0o777)


@pytest.mark.skipif(not have("setfacl"), reason="needs setfacl")
def test_setfacl_keeps_sgid_in_group(m):
    """A member of the file's group keeps SGID (nothing to clear)."""
    p = m.path("f")
    open(p, "w").close()
    os.chown(p, 100, 101)
    os.chmod(p, 0o2755)
    assert oct(_acl_rwx_as_100(p)) == oct(0o2777)


# -- 6: a default ACL shapes the mode of new objects ------------------------------------


@pytest.mark.skipif(not have("setfacl"), reason="needs setfacl")
def test_default_acl_masks_create(m):
    d = m.path("d")
    os.mkdir(d)
    subprocess.run(["setfacl", "-d", "-m", "u::r-x,g::r--,o::---", d], check=True)
    r = py_as(
        0,
        0,
        f"fd = os.open({os.path.join(d, 'f')!r}, os.O_CREAT | os.O_WRONLY, 0o666)\n"
        f"os.close(fd)\nreturn os.stat({os.path.join(d, 'f')!r}).st_mode",
        umask=0,
    )
    assert stat.filemode(r["ok"]) == "-r--r-----"


@pytest.mark.skipif(not have("setfacl"), reason="needs setfacl")
def test_default_acl_masks_mkdir(m):
    d = m.path("d")
    os.mkdir(d)
    subprocess.run(["setfacl", "-d", "-m", "u::rwx,g::rwx,o::---", d], check=True)
    sub = os.path.join(d, "sub")
    r = py_as(0, 0, f"os.mkdir({sub!r}, 0o777)\nreturn os.stat({sub!r}).st_mode", umask=0)
    assert stat.filemode(r["ok"]) == "drwxrwx---"
    # it inherits the default ACL itself
    out = subprocess.run(["getfacl", "-cd", sub], capture_output=True, text=True, check=True).stdout
    assert "other::---" in out and "group::rwx" in out


@pytest.mark.skipif(not have("setfacl"), reason="needs setfacl")
def test_default_acl_replaces_umask_both_modes(m):
    """Under a default ACL the umask is ignored and the ACL masks the mode (POSIX, ext4): the mount
    asks for FUSE_DONT_MASK, so the kernel no longer applies the umask before the daemon sees the
    mode. Without a default ACL the umask still applies."""
    d = m.path("d")
    os.mkdir(d)
    os.chmod(d, 0o777)
    subprocess.run(["setfacl", "-d", "-m", "u::rwx,g::r-x,o::r-x", d], check=True)
    plain = m.path("plain")
    os.mkdir(plain)
    os.chmod(plain, 0o777)
    code = f"""
os.close(os.open({d + "/f"!r}, os.O_CREAT | os.O_WRONLY, 0o666))
os.mkdir({d + "/s"!r}, 0o777)
os.mkfifo({d + "/p"!r}, 0o666)
os.close(os.open({plain + "/f"!r}, os.O_CREAT | os.O_WRONLY, 0o666))
return [os.stat(p).st_mode & 0o7777 for p in ({d + "/f"!r}, {d + "/s"!r}, {d + "/p"!r}, {plain + "/f"!r})]
"""
    assert py_as(1000, 1000, code, umask=0o077)["ok"] == [0o644, 0o755, 0o644, 0o600]


# -- 7: remount ro/rw ----------------------------------------------------------------------


def _helper(src, mp, opts) -> subprocess.CompletedProcess:
    """What mount.fuse3 runs for ``mount -o remount,...`` (measured: the mount's options from mountinfo)."""
    return subprocess.run([SHIFTFS, str(src), str(mp), "-o", opts], capture_output=True, text=True, timeout=60)


def test_remount_ro_rw_helper_form(m):
    p = m.path("f")
    with open(p, "w") as f:
        f.write("x")
    base = "nosuid,nodev,relatime,remount,user_id=0,group_id=0,default_permissions,allow_other"
    r = _helper(m.source, m.mountpoint, "ro," + base)
    assert r.returncode == 0, r.stderr
    assert "ro" in find_mount(m.mountpoint).options
    with pytest.raises(OSError) as e:
        open(p, "w")
    assert e.value.errno == errno.EROFS
    assert open(p).read() == "x"
    r = _helper(m.source, m.mountpoint, "rw," + base)
    assert r.returncode == 0, r.stderr
    with open(p, "w") as f:
        f.write("y")
    assert open(p).read() == "y"
    opts = find_mount(m.mountpoint).options
    assert "nosuid" in opts and "nodev" in opts
    assert m.alive()


def test_remount_keeps_nosuid_when_not_given(m):
    """``shiftfs mount -o remount,ro`` must not drop the mount's nosuid/nodev."""
    r = subprocess.run(
        [SHIFTFS, "mount", "-o", "remount,ro", m.source, m.mountpoint], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    opts = find_mount(m.mountpoint).options
    assert "ro" in opts and "nosuid" in opts and "nodev" in opts


def test_remount_of_fstab_mount(m, mode):
    """mount(8) merges an fstab line's options (uidmap=…, backend=fuse) into a remount: they stay as
    mounted, with one line saying so when they differ from the live ones (xattr mode was mounted
    without a table; the table mount with this one: nothing to say), and ro still applies."""
    r = _helper(
        m.source,
        m.mountpoint,
        "ro,nosuid,nodev,relatime,remount,user_id=0,group_id=0,default_permissions,"
        "allow_other,backend=fuse,uidmap=100000:0:65536,gidmap=100000:0:65536",
    )
    assert r.returncode == 0, r.stderr
    if mode == "xattr":
        assert len(r.stderr.strip().splitlines()) == 1 and "leaves uidmap, gidmap as mounted" in r.stderr, r.stderr
    else:
        assert r.stderr == "", r.stderr
    assert "ro" in find_mount(m.mountpoint).options
    assert m.alive()


def test_remount_refuses_what_cannot_change(m):
    r = _helper(m.source, m.mountpoint, "rw,remount,cache=never")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "cache" in r.stderr and "remount" in r.stderr
    r = _helper(m.source, m.source, "ro,remount")
    assert r.returncode != 0 and "not a shiftfs mount" in r.stderr
    assert "ro" not in find_mount(m.mountpoint).options


def test_remount_with_the_original_options_unchanged(shiftfs_mount):
    """A harness that remounts with the whole original list (``mount -t fuse.shiftfs -o
    remount,ro,uidmap=…,gidmap=…,backend=…,log=…`` names SOURCE, so mount(8) adds no
    ``user_id=``) is accepted when every value equals the live one, as ext4 and bindfs
    accept theirs; a real change is refused, naming only what changed."""
    mnt = shiftfs_mount("-o", "uidmap=100000:0:65536,gidmap=100000:0:65536,cache=auto")
    same = f"uidmap=100000:0:65536,gidmap=100000:0:65536,cache=auto,backend=fuse,log={mnt.log}"
    r = _helper(mnt.source, mnt.mountpoint, "remount,ro," + same)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "ro" in find_mount(mnt.mountpoint).options
    r = subprocess.run(
        [SHIFTFS, "mount", "--map", "b:100000:0:65536", "-o", "remount,rw,backend=auto", mnt.source, mnt.mountpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "rw" in find_mount(mnt.mountpoint).options
    r = _helper(mnt.source, mnt.mountpoint, "remount,ro,uidmap=100000:0:65535,gidmap=100000:0:65536,cache=auto")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot change uidmap on a remount" in r.stderr, r.stderr
    assert "ro" not in find_mount(mnt.mountpoint).options
    assert mnt.alive()


@pytest.mark.parametrize(
    "opts,shown,absent",
    [
        ("relatime", {"relatime"}, {"noatime"}),
        ("strictatime", set(), {"relatime", "noatime"}),
        ("nodiratime", {"nodiratime", "relatime"}, set()),
        ("noatime,nodiratime", {"noatime", "nodiratime"}, set()),
    ],
)
def test_atime_flags_at_mount(shiftfs_mount, opts, shown, absent):
    """``-o relatime|strictatime|nodiratime`` are the kernel's flags: the mount takes them
    (libfuse knows none of them; ext4 and bindfs mounts take all three)."""
    mnt = shiftfs_mount("--map", MAP, "-o", opts)
    got = set(find_mount(mnt.mountpoint).options)
    assert shown <= got and not absent & got, got
    assert mnt.alive()


def test_atime_flag_refused_for_an_unprivileged_mount(scratch):
    """An ordinary user's FUSE mount (fusermount3) cannot be remounted: ``-o strictatime`` is
    one line saying so, and nothing stays mounted."""
    import ns_util

    src, mp = scratch / "usrc", scratch / "ump"
    with ns_util.throwaway_users(with_range=0, without_range=1) as users:  # fusermount3 needs a name
        uid = users[0].uid
        for d in (src, mp):
            d.mkdir(mode=0o700)
            os.chown(d, uid, uid)
        r = run_as(uid, uid, [SHIFTFS, "mount", "--xattr", "-o", "strictatime", str(src), str(mp)])
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "strictatime" in r.stderr and "drop them" in r.stderr and "user_allow_other" not in r.stderr, r.stderr
    assert find_mount(mp) is None


def test_remount_through_mount8(m, shiftfs_on_path):
    """``mount -o remount,ro`` (mount(8) → mount.fuse3 → shiftfs from PATH)."""
    if os.path.realpath(shiftfs_on_path) != os.path.realpath(SHIFTFS):
        pytest.skip(f"{shiftfs_on_path} runs another checkout ({os.path.realpath(shiftfs_on_path)})")
    r = subprocess.run(["mount", "-o", "remount,ro", m.mountpoint], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ro" in find_mount(m.mountpoint).options
    r = subprocess.run(["mount", "-o", "remount,rw", m.mountpoint], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "rw" in find_mount(m.mountpoint).options


# -- 4: trusted.* xattrs on symlinks and FIFOs -------------------------------------------


@pytest.mark.parametrize("kind", ["symlink", "fifo", "file"])
def test_trusted_xattr_on_special(m, kind):
    """Stored and read back as on ext4 as root; listed only to CAP_SYS_ADMIN, as ext4 lists them."""
    p = m.path("obj")
    _make_special(p, kind)
    os.setxattr(p, "trusted.t", b"v1", follow_symlinks=False)
    assert os.getxattr(p, "trusted.t", follow_symlinks=False) == b"v1"
    assert "trusted.t" in os.listxattr(p, follow_symlinks=False)
    os.setxattr(p, "trusted.t", b"v2", follow_symlinks=False)
    # survives the kernel forgetting the inode
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
    assert os.getxattr(p, "trusted.t", follow_symlinks=False) == b"v2"
    # unprivileged users see none of it
    r = py_as(100, 100, f"return os.listxattr({p!r}, follow_symlinks=False)")
    assert "trusted.t" not in r.get("ok", [])
    os.removexattr(p, "trusted.t", follow_symlinks=False)
    assert "trusted.t" not in os.listxattr(p, follow_symlinks=False)
    with pytest.raises(OSError) as e:
        os.getxattr(p, "trusted.t", follow_symlinks=False)
    assert e.value.errno == errno.ENODATA


def test_trusted_xattr_symlink_gone_with_inode(shiftfs_mount):
    """xattr mode: a symlink's stored xattrs go with its last name (no stale rows)."""
    mnt = shiftfs_mount("--xattr")
    p = mnt.path("l")
    os.symlink("t", p)
    os.setxattr(p, "trusted.t", b"v", follow_symlinks=False)
    os.unlink(p)
    os.symlink("t", p)
    assert "trusted.t" not in os.listxattr(p, follow_symlinks=False)


# -- 3: O_DIRECT writes and buffered readers -----------------------------------------------


def test_direct_write_seen_by_buffered_reader(m):
    p = m.path("f")
    size = 1 << 20
    with open(p, "wb") as f:
        f.write(b"\x55" * size)
    with open(p, "rb") as f:  # fill the page cache
        assert f.read() == b"\x55" * size
    import mmap

    buf = mmap.mmap(-1, size)
    buf.write(b"\xaa" * size)
    fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], 0) == size
    finally:
        os.close(fd)
    with open(p, "rb") as f:
        data = f.read()
    assert data == b"\xaa" * size, f"stale pages: {data[:4]!r}...{data[-4:]!r}"


def test_direct_writes_racing_buffered_reader(m):
    """O_DIRECT writes while another process keeps reading the same ranges buffered: once the
    writes are done, a buffered read sees them (ext4 and bindfs do; stale pages must not stay)."""
    p = m.path("f")
    size, chunk = 8 << 20, 64 << 10
    with open(p, "wb") as f:
        f.write(b"\x55" * size)
    code = f"""
import os, sys, time
fd = os.open({p!r}, os.O_RDONLY)
end = time.time() + 30
while not os.path.exists({p + ".done"!r}) and time.time() < end:
    for off in range(0, {size}, {chunk}):
        os.pread(fd, {chunk}, off)
"""
    reader = subprocess.Popen([sys.executable, "-c", code])
    try:
        import mmap

        buf = mmap.mmap(-1, chunk)
        buf.write(b"\xaa" * chunk)
        fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
        try:
            for _ in range(3):
                for off in range(0, size, chunk):
                    assert os.pwritev(fd, [buf], off) == chunk
        finally:
            os.close(fd)
        time.sleep(0.3)
    finally:
        open(p + ".done", "w").close()
        reader.wait(60)
    with open(p, "rb") as f:
        data = f.read()
    stale = sum(1 for off in range(0, size, 4096) if data[off] != 0xAA)
    assert stale == 0, f"{stale} of {size // 4096} pages stale after the direct writes"


# -- fallocate: what the README's limits say ------------------------------------------------


def test_readme_limits_say_what_fallocate_does(m):
    """The README's limits say ``fallocate(2)`` fails with EOPNOTSUPP exactly while it
    does (pyfuse3 3.5 has no handler); once the engine serves it, the line must go."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(m.path("fa"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        rc = libc.fallocate(fd, 0, 0, 65536)
        err = ctypes.get_errno() if rc != 0 else 0
        os.posix_fallocate(fd, 0, 65536)  # glibc writes zeros where fallocate is refused
        assert os.fstat(fd).st_size == 65536
    finally:
        os.close(fd)
    import readme_util

    said = "`fallocate(2)` fails with `EOPNOTSUPP`" in readme_util.section("## Limits")
    assert said == (err == errno.EOPNOTSUPP), (errno.errorcode.get(err), said)
