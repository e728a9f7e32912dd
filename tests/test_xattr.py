"""xattr mode on real mounts (project issue 3).

Everything here mounts ``shiftfs mount --xattr`` for real and checks what the
view shows, what lands on the backing filesystem, and what survives a
remount. Needs root (setpriv to act as view users, mknod, setcap) and
/dev/fuse; the interop tests also need Debian's fuse-overlayfs.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
from asuser import run_as, sh
from fsutil import Mount, have
from records import LEGACY, RECORD, backing_xattrs, record, side_rows
from xattr_util import diff_snapshots, fuse_overlayfs, snapshot

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="xattr-mode tests act as several users: run as root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(
        not have("setpriv", "fusermount3", "setfattr", "getfattr"), reason="needs util-linux, fuse3, attr"
    ),
]

U1, U2 = 1000, 1001  # view users
G_SHARED = 1500  # a group U1 is a member of (supplementary)


# -- fixtures -------------------------------------------------------------------

_MOUNTS: list[Mount] = []  # mounts of the running test, undone by the work fixture


@pytest.fixture
def work(scratch):
    """``scratch`` (0755, reachable by other users) with ``src`` and ``mp``; mounts undone afterwards."""
    (scratch / "src").mkdir()
    (scratch / "mp").mkdir()
    try:
        yield scratch
    finally:
        while _MOUNTS:
            _MOUNTS.pop().__exit__(None, None, None)  # detach, reap, check the log


def new_mount(work, opts=(), src="src", mp="mp", **kw) -> Mount:
    m = Mount(work / src, work / mp, mode="xattr", opts=opts, **kw)
    _MOUNTS.append(m)
    return m.mount()


@pytest.fixture
def xm(work):
    """An xattr-mode mount of work/src on work/mp, run by root."""
    return new_mount(work)


def chown_chmod(p, uid: int, gid: int, mode: int) -> None:
    """chown, then chmod (a chown drops setuid/setgid)."""
    os.chown(p, uid, gid)
    os.chmod(p, mode)


def lst(p):
    return os.lstat(p)


def owner(p):
    st = os.lstat(p)
    return st.st_uid, st.st_gid


def perm(p):
    return stat.S_IMODE(os.lstat(p).st_mode)


# -- creation: records and plain backing files ----------------------------------------


def test_create_stamps_records_backing_stays_plain(xm, work):
    mp, src = work / "mp", work / "src"
    os.umask(0o022)
    (mp / "f").write_text("x")
    os.chmod(mp / "f", 0o4755)
    os.mkdir(mp / "d", 0o2775)
    os.chmod(mp / "d", 0o3775)  # setgid + sticky
    os.symlink("f", mp / "l")
    os.mkfifo(mp / "p", 0o600)
    os.mknod(mp / "c", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(mp / "b", stat.S_IFBLK | 0o640, os.makedev(8, 1))
    os.chmod(mp / "c", 0o666)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(mp / "s"))
    s.close()
    os.chown(mp / "c", U1, U2)
    (mp / "x").write_text("")
    os.chmod(mp / "x", 0o000)

    # the view
    assert stat.filemode(lst(mp / "f").st_mode) == "-rwsr-xr-x"
    assert stat.filemode(lst(mp / "d").st_mode) == "drwxrwsr-t"
    assert stat.S_ISLNK(lst(mp / "l").st_mode)
    assert stat.filemode(lst(mp / "p").st_mode) == "prw-------"
    c = lst(mp / "c")
    assert stat.S_ISCHR(c.st_mode) and c.st_rdev == os.makedev(1, 3) and (c.st_uid, c.st_gid) == (U1, U2)
    assert stat.filemode(c.st_mode) == "crw-rw-rw-"
    b = lst(mp / "b")
    assert stat.S_ISBLK(b.st_mode) and b.st_rdev == os.makedev(8, 1) and perm(mp / "b") == 0o640
    assert stat.S_ISSOCK(lst(mp / "s").st_mode)
    assert perm(mp / "x") == 0

    # the backing tree: the daemon's, no privilege bits, no devices, always usable by the daemon
    me = os.geteuid()
    for name in ("f", "d", "l", "p", "c", "b", "s", "x"):
        st = lst(src / name)
        assert st.st_uid == me, name
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), (name, oct(st.st_mode))
        assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), name
    for name in ("f", "c", "b", "x"):
        st = lst(src / name)
        assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o600 == 0o600, name
    assert lst(src / "c").st_size == 0
    assert lst(src / "d").st_mode & 0o700 == 0o700
    assert stat.S_ISFIFO(lst(src / "p").st_mode) and perm(src / "p") == 0o600  # FIFOs keep the creator's mode
    assert stat.S_ISSOCK(lst(src / "s").st_mode)

    # the records, in the format fuse-overlayfs and containers/storage read
    assert record(src / "f") == b"0:0:104755"
    assert record(src / "d") == b"0:0:43775"
    assert record(src / "c") == b"%d:%d:0666:char-1-3" % (U1, U2)
    assert record(src / "b") == b"0:0:0640:block-8-1"
    assert record(src / "x") == b"0:0:100000"
    rows = side_rows(src)
    assert rows[lst(src / "l").st_ino] == b"0:0:120777"
    assert rows[lst(src / "p").st_ino] == b"0:0:10600"
    assert rows[lst(src / "s").st_ino].startswith(b"0:0:14")
    # a record change is on disk before the reply
    os.chown(mp / "f", U1, U1)
    assert record(src / "f") == b"%d:%d:100755" % (U1, U1)  # chown as root drops setuid, as on any fs
    os.lchown(mp / "l", U2, U2)
    assert side_rows(src)[lst(src / "l").st_ino] == b"%d:%d:120777" % (U2, U2)


# -- view users: ownership rules and permission checks on view modes --------------


def test_view_users_chown_chmod_setuid_matrix(xm, work):
    mp, src = work / "mp", work / "src"
    os.umask(0o022)
    os.mkdir(mp / "shared", 0o1777)
    os.chmod(mp / "shared", 0o1777)
    (mp / "secret").write_text("s3cret")
    os.chmod(mp / "secret", 0o600)
    os.mkdir(mp / "private", 0o700)
    (mp / "private" / "f").write_text("p")
    os.mkdir(mp / "grp")
    chown_chmod(mp / "grp", 0, G_SHARED, 0o2775)

    def as1(cmd, **kw):
        return run_as(U1, U1, cmd, groups=(U1, G_SHARED), **kw)

    def as2(cmd, **kw):
        return run_as(U2, U2, cmd, **kw)

    # the view's 0600 root file and 0700 root dir are closed to view users,
    # although the daemon owns (and could read) the backing files
    assert lst(work / "src" / "secret").st_uid == os.geteuid()
    r = as1(f"cat {mp}/secret")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as1(f"ls {mp}/private")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as1(f"echo x >> {mp}/secret")
    assert r.returncode != 0

    # U1 makes its own files in the sticky dir
    as1(f"umask 022; echo hi > {mp}/shared/mine && chmod 4755 {mp}/shared/mine", check=True)
    mine = mp / "shared" / "mine"
    assert owner(mine) == (U1, U1) and stat.filemode(lst(mine).st_mode) == "-rwsr-xr-x"
    assert record(src / "shared" / "mine") == b"%d:%d:104755" % (U1, U1)
    assert lst(src / "shared" / "mine").st_uid == os.geteuid()  # backing stays the daemon's
    # owner may not give a file away or pick a group it is not in
    assert as1(f"chown {U2} {mine}").returncode != 0
    assert as1(f"chown 0 {mine}").returncode != 0
    assert as1(f"chgrp {U2} {mine}").returncode != 0
    assert owner(mine) == (U1, U1)
    # ...but may use a supplementary group; chgrp by the owner clears setuid? (no: only setgid rules)
    as1(f"chgrp {G_SHARED} {mine}", check=True)
    assert owner(mine)[1] == G_SHARED
    # others may not chmod, chown, delete (sticky) or write it
    assert as2(f"chmod 777 {mine}").returncode != 0
    assert as2(f"rm -f {mine}").returncode != 0
    assert as2(f"echo x >> {mine}").returncode != 0
    assert mine.exists()
    # writing a setuid file as its (unprivileged) owner drops setuid, as on any fs
    as1(f"echo more >> {mine}", check=True)
    assert not lst(mine).st_mode & stat.S_ISUID
    assert not int(record(src / "shared" / "mine").split(b":")[2], 8) & stat.S_ISUID
    # root's chown of a setuid file drops setuid too
    as1(f"chmod 4755 {mine}", check=True)
    os.chown(mine, U2, U2)
    assert owner(mine) == (U2, U2) and not lst(mine).st_mode & stat.S_ISUID
    # a file of mode 0000: closed to its owner, open to root
    as1(f"echo z > {mp}/shared/zero && chmod 0 {mp}/shared/zero", check=True)
    assert as1(f"cat {mp}/shared/zero").returncode != 0
    assert (mp / "shared" / "zero").read_text() == "z\n"
    # umask of the caller applies
    as1(f"umask 077; touch {mp}/shared/um; mkdir {mp}/shared/umd", check=True)
    assert perm(mp / "shared" / "um") == 0o600 and perm(mp / "shared" / "umd") == 0o700
    # setgid directory: group and setgid inherited, as on any fs
    as1(f"umask 022; mkdir {mp}/grp/sub && touch {mp}/grp/f", check=True)
    assert owner(mp / "grp" / "sub") == (U1, G_SHARED) and lst(mp / "grp" / "sub").st_mode & stat.S_ISGID
    assert owner(mp / "grp" / "f") == (U1, G_SHARED)
    assert not lst(src / "grp" / "sub").st_mode & stat.S_ISGID  # not on the backing dir
    # U2 (not in the group) cannot create in the 2775 dir
    assert as2(f"touch {mp}/grp/u2").returncode != 0
    # chmod by a non-owner fails; g+s by an owner outside the file's group is dropped silently
    as2(f"touch {mp}/shared/u2f", check=True)
    assert as1(f"chmod 2755 {mp}/shared/u2f").returncode != 0
    as1(f"touch {mp}/shared/g1", check=True)
    os.chown(mp / "shared" / "g1", U1, 1234)
    as1(f"chmod 2755 {mp}/shared/g1", check=True)
    assert perm(mp / "shared" / "g1") == 0o755
    as1(f"touch {mp}/shared/g2 && chgrp {G_SHARED} {mp}/shared/g2 && chmod 2755 {mp}/shared/g2", check=True)
    assert perm(mp / "shared" / "g2") == 0o2755  # a group of U1's: kept

    # everything above survives a remount
    before = snapshot(mp)
    xm.remount()
    assert diff_snapshots(before, snapshot(mp)) == []


# -- persistence ----------------------------------------------------------------------


def _populate(mp: Path):
    os.umask(0)
    for i, (uid, gid, mode) in enumerate(
        [(0, 0, 0o4755), (U1, U1, 0o640), (5, 6, 0o2711), (65534, 65534, 0o1604), (4294967294, 7, 0o444), (0, 42, 0o0)]
    ):
        f = mp / f"f{i}"
        f.write_text("x" * i)
        chown_chmod(f, uid, gid, mode)
    os.makedirs(mp / "a" / "b" / "c")
    chown_chmod(mp / "a" / "b", U2, 100, 0o3750)
    os.chmod(mp / "a", 0o555)
    os.symlink("../f0", mp / "a" / "b" / "ln")
    os.lchown(mp / "a" / "b" / "ln", 33, 34)
    os.mkfifo(mp / "fifo", 0o620)
    os.chown(mp / "fifo", U1, 0)
    os.mknod(mp / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(mp / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.chown(mp / "sda", 0, 6)
    os.link(mp / "f1", mp / "a" / "f1-link")


def test_persistence_across_remount(xm, work):
    mp = work / "mp"
    _populate(mp)
    before = snapshot(mp)
    assert stat.filemode(before["f0"][0]) == "-rwsr-xr-x"
    assert before["f4"][1] == 4294967294
    assert stat.filemode(before["a/b"][0]) == "drwxr-s--T"
    assert before["a/b/ln"][1:3] == (33, 34)
    assert before["null"][3] == os.makedev(1, 3)
    xm.remount()
    assert diff_snapshots(before, snapshot(mp)) == []
    # and a third time, after changes in the second mount
    os.chmod(mp / "f1", 0o600)
    os.lchown(mp / "a" / "b" / "ln", 1, 2)
    before = snapshot(mp)
    xm.remount()
    assert diff_snapshots(before, snapshot(mp)) == []


# -- the side table: symlinks, FIFOs, sockets ----------------------------------------


def test_side_table_follows_inodes(xm, work):
    mp, src = work / "mp", work / "src"
    os.mkdir(mp / "d")
    d = mp / "d"
    for n, uid in (("s1", 11), ("s2", 12), ("s3", 13)):
        os.symlink(f"target-{n}", d / n)
        os.lchown(d / n, uid, uid)
    sh(f"chown -h 21:22 {d}/s3")  # the CLI, for good measure
    os.mkfifo(d / "p1")
    os.chown(d / "p1", 31, 31)
    os.mkfifo(d / "p2")
    os.chown(d / "p2", 32, 32)

    os.rename(d / "s1", mp / "moved")  # rename across directories
    os.link(d / "s2", d / "s2-hard", follow_symlinks=False)  # a hard link to a symlink
    os.lchown(d / "s2-hard", 14, 15)
    assert owner(d / "s2") == (14, 15)
    os.rename(d / "s3", d / "s2")  # rename-over: s2's inode keeps its other name
    os.rename(d / "p1", d / "p2")  # rename-over: the old p2 is gone
    assert owner(mp / "moved") == (11, 11)
    assert owner(d / "s2") == (21, 22) and os.readlink(d / "s2") == "target-s3"
    assert owner(d / "s2-hard") == (14, 15) and os.readlink(d / "s2-hard") == "target-s2"
    assert owner(d / "p2") == (31, 31)
    before = snapshot(mp)
    xm.remount()
    assert diff_snapshots(before, snapshot(mp)) == []
    # rows follow the live inodes: one per inode, none for the removed FIFO
    live = {lst(p).st_ino for p in (src / "moved", src / "d" / "s2", src / "d" / "s2-hard", src / "d" / "p2")}
    assert set(side_rows(src)) == live
    os.unlink(d / "s2-hard")
    os.unlink(d / "s2")
    os.unlink(mp / "moved")
    os.unlink(d / "p2")
    xm.remount()  # rows of unlinked inodes the kernel still held go when it forgets them
    assert side_rows(src) == {}


@pytest.mark.timeout(240)
def test_symlink_ownership_at_scale(xm, work):
    mp, src = work / "mp", work / "src"
    n = 10_000
    d = mp / "many"
    os.mkdir(d)
    t0 = time.monotonic()
    for i in range(n):
        p = d / f"l{i:05d}"
        os.symlink(f"t{i}", p)
        os.lchown(p, 1000 + i % 5000, 2000 + i % 7)
    t_create = time.monotonic() - t0
    xm.remount()
    t0 = time.monotonic()
    names = os.listdir(d)
    assert len(names) == n
    bad = []
    for i in range(n):
        st = os.lstat(d / f"l{i:05d}")
        if (st.st_uid, st.st_gid) != (1000 + i % 5000, 2000 + i % 7):
            bad.append((i, st.st_uid, st.st_gid))
    t_read = time.monotonic() - t0
    assert bad == []
    assert len(side_rows(src)) == n
    # ls -ln through a fresh mount, all 10k entries
    xm.remount()
    t0 = time.monotonic()
    out = sh(f"ls -ln {d} | tail -n +2").stdout.splitlines()
    t_ls = time.monotonic() - t0
    assert len(out) == n and all(line.split()[2] != "0" for line in out)
    # bounded time on a shared 2-core VM: generous limits, numbers in the output
    print(f"10k symlinks: create+lchown {t_create:.1f}s, lstat after remount {t_read:.1f}s, ls -ln {t_ls:.1f}s")
    assert t_create < 90 and t_read < 45 and t_ls < 45


def test_devices_fifos_sockets(xm, work):
    mp, src = work / "mp", work / "src"
    os.umask(0)
    os.mknod(mp / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(mp / "loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mknod(mp / "big", stat.S_IFCHR | 0o600, os.makedev(4095, 1048575))
    os.chown(mp / "loop0", 0, 6)
    os.mkfifo(mp / "fifo", 0o640)
    os.chown(mp / "fifo", U1, U2)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(mp / "sock"))
    os.chown(mp / "sock", U2, U1)
    for name in ("null", "loop0", "big"):
        st = lst(src / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_rdev == 0
    assert lst(mp / "big").st_rdev == os.makedev(4095, 1048575)
    assert record(src / "big") == b"0:0:0600:char-4095-1048575"
    assert stat.filemode(lst(mp / "loop0").st_mode) == "brw-rw----" and owner(mp / "loop0") == (0, 6)
    # the FIFO works through the mount (the kernel's own pipe) and keeps its view owner
    assert stat.filemode(lst(mp / "fifo").st_mode) == "prw-r-----" and owner(mp / "fifo") == (U1, U2)
    assert stat.S_ISFIFO(lst(src / "fifo").st_mode) and perm(src / "fifo") == 0o640
    got = {}

    def reader():
        with open(mp / "fifo") as f:
            got["v"] = f.read()

    t = threading.Thread(target=reader)
    t.start()
    with open(mp / "fifo", "w") as f:
        f.write("through the pipe")
    t.join(10)
    assert got.get("v") == "through the pipe"
    # the socket accepts connections through the mount
    sock.listen(1)
    cli = socket.socket(socket.AF_UNIX)
    cli.connect(str(mp / "sock"))
    conn, _ = sock.accept()
    cli.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    for s_ in (cli, conn, sock):
        s_.close()
    assert owner(mp / "sock") == (U2, U1) and stat.S_ISSOCK(lst(mp / "sock").st_mode)
    # device placeholders are not writable through the view (nodev), so stay empty
    with pytest.raises(OSError):
        open(mp / "null", "w").write("x")
    assert lst(src / "null").st_size == 0
    before = snapshot(mp)
    xm.remount()
    assert diff_snapshots(before, snapshot(mp)) == []
    # chown/chmod of a device rewrites its record, keeping the device number
    os.chmod(mp / "null", 0o620)
    os.chown(mp / "null", 5, 5)
    assert record(src / "null") == b"5:5:0620:char-1-3"
    assert lst(mp / "null").st_rdev == os.makedev(1, 3)


def test_hard_links_share_one_record(xm, work):
    mp, src = work / "mp", work / "src"
    (mp / "a").write_text("x")
    os.mkdir(mp / "sub")
    os.link(mp / "a", mp / "sub" / "b")
    os.chown(mp / "sub" / "b", U1, U2)
    os.chmod(mp / "a", 0o4710)
    for p in (mp / "a", mp / "sub" / "b"):
        assert owner(p) == (U1, U2) and perm(p) == 0o4710 and lst(p).st_nlink == 2
    assert record(src / "a") == record(src / "sub" / "b") == b"%d:%d:104710" % (U1, U2)
    xm.remount()
    assert owner(mp / "sub" / "b") == (U1, U2) and perm(mp / "a") == 0o4710
    os.unlink(mp / "a")
    assert owner(mp / "sub" / "b") == (U1, U2) and lst(mp / "sub" / "b").st_nlink == 1


def test_rename_over_keeps_the_right_record(xm, work):
    mp, src = work / "mp", work / "src"
    (mp / "a").write_text("a")
    chown_chmod(mp / "a", 1, 1, 0o600)
    (mp / "b").write_text("b")
    chown_chmod(mp / "b", 2, 2, 0o4755)
    os.link(mp / "b", mp / "b2")
    os.rename(mp / "a", mp / "b")
    assert owner(mp / "b") == (1, 1) and perm(mp / "b") == 0o600 and (mp / "b").read_text() == "a"
    assert owner(mp / "b2") == (2, 2) and perm(mp / "b2") == 0o4755  # the replaced inode's other name
    os.mkdir(mp / "d1")
    os.chown(mp / "d1", 3, 3)
    os.mkdir(mp / "d2")
    os.chown(mp / "d2", 4, 4)
    os.rename(mp / "d1", mp / "d2")  # over an empty directory
    assert owner(mp / "d2") == (3, 3)
    xm.remount()
    assert owner(mp / "b") == (1, 1) and perm(mp / "b") == 0o600
    assert owner(mp / "b2") == (2, 2) and perm(mp / "b2") == 0o4755
    assert owner(mp / "d2") == (3, 3)
    assert record(src / "b") == b"1:1:100600"


# -- xattrs: capabilities, ACLs, the namespace we keep -----------------------------


@pytest.mark.skipif(not have("setcap", "getcap"), reason="needs libcap2-bin")
def test_setcap_getcap_round_trip(xm, work):
    mp, src = work / "mp", work / "src"
    (mp / "ping").write_text("#!/bin/sh\n")
    sh(f"setcap cap_net_raw,cap_net_admin+ep {mp}/ping")
    assert "cap_net_admin,cap_net_raw=ep" in sh(f"getcap {mp}/ping").stdout
    bx = backing_xattrs(src / "ping")
    assert "security.capability" not in bx  # never on the backing inode
    assert "user.containers.override_security.capability" in bx
    xm.remount()
    assert "cap_net_admin,cap_net_raw=ep" in sh(f"getcap {mp}/ping").stdout
    # a view user cannot set one, nor plant one through our namespace
    os.chmod(mp, 0o755)
    (mp / "u1").write_text("")
    os.chown(mp / "u1", U1, U1)
    r = run_as(U1, U1, f"setcap cap_net_raw+ep {mp}/u1")
    assert r.returncode != 0
    cap = bx["user.containers.override_security.capability"].hex()
    r = run_as(U1, U1, ["setfattr", "-n", "user.containers.override_security.capability", "-v", "0x" + cap, f"{mp}/u1"])
    assert sh(f"getcap {mp}/u1").stdout.strip() == ""
    assert "security.capability" not in backing_xattrs(src / "u1")
    # writing to a file drops its capability, as on any fs
    with open(mp / "ping", "a") as f:
        f.write("echo\n")
    assert sh(f"getcap {mp}/ping").stdout.strip() == ""
    sh(f"setcap -r {mp}/ping", check=False)
    assert "user.containers.override_security.capability" not in backing_xattrs(src / "ping")


@pytest.mark.skipif(not have("setfacl", "getfacl"), reason="needs acl")
def test_setfacl_getfacl_round_trip(xm, work):
    mp, src = work / "mp", work / "src"
    os.umask(0o022)
    (mp / "f").write_text("")
    os.mkdir(mp / "d")
    sh(f"setfacl -m u:{U1}:rw,g:{G_SHARED}:r {mp}/f")
    sh(f"setfacl -d -m u:{U1}:rwx {mp}/d")
    acl_f = sh(f"getfacl -n {mp}/f").stdout
    acl_d = sh(f"getfacl -n {mp}/d").stdout
    assert f"user:{U1}:rw-" in acl_f and f"group:{G_SHARED}:r--" in acl_f
    assert f"default:user:{U1}:rwx" in acl_d
    for p in (src / "f", src / "d"):
        names = set(backing_xattrs(p))
        assert not names & {"system.posix_acl_access", "system.posix_acl_default"}
    assert "user.containers.override_system.posix_acl_access" in backing_xattrs(src / "f")
    assert "user.containers.override_system.posix_acl_default" in backing_xattrs(src / "d")
    xm.remount()
    assert sh(f"getfacl -n {mp}/f").stdout == acl_f
    assert sh(f"getfacl -n {mp}/d").stdout == acl_d
    sh(f"setfacl -b {mp}/f")
    assert f"user:{U1}" not in sh(f"getfacl -n {mp}/f").stdout


def _acl_xattr_names(p):
    return {n for n in backing_xattrs(p) if "posix_acl" in n}


@pytest.mark.skipif(not have("setfacl", "getfacl"), reason="needs acl")
def test_acl_mode_sync_and_default_inheritance(xm, work):
    """setfacl sets the mode's group class from the mask, chmod sets the mask; default ACLs are inherited."""
    mp, src = work / "mp", work / "src"
    os.umask(0o022)
    (mp / "f").write_text("")
    os.chmod(mp / "f", 0o640)
    sh(f"setfacl -m u:{U1}:rw {mp}/f")
    assert perm(mp / "f") == 0o660  # mask rw- shows as the group bits
    os.chmod(mp / "f", 0o600)
    assert "mask::---" in sh(f"getfacl -n {mp}/f").stdout
    assert f"user:{U1}:rw-" in sh(f"getfacl -n {mp}/f").stdout
    # an ACL equivalent to the mode is just the mode
    (mp / "g").write_text("")
    sh(f"setfacl -m u::rwx,g::r-x,o::--- {mp}/g")
    assert perm(mp / "g") == 0o750 and not _acl_xattr_names(src / "g")

    os.mkdir(mp / "d")
    sh(f"setfacl -d -m u:{U1}:rwx,g::r-x,o::--- {mp}/d")
    # A default ACL should replace the umask, but the kernel applies the umask
    # before a FUSE daemon sees the mode (pyfuse3 cannot ask for FUSE_DONT_MASK):
    # a known limit, so create with umask 0 here.
    os.umask(0)
    (mp / "d" / "child").write_text("")
    os.mkdir(mp / "d" / "sub", 0o777)
    child = sh(f"getfacl -n {mp}/d/child").stdout
    assert f"user:{U1}:rwx" in child and "mask::rw-" in child and "other::---" in child
    assert perm(mp / "d" / "child") == 0o660
    sub = sh(f"getfacl -n {mp}/d/sub").stdout
    assert f"default:user:{U1}:rwx" in sub and f"user:{U1}:rwx" in sub
    assert perm(mp / "d" / "sub") == 0o770
    # a view user's new file inherits as well
    os.chmod(mp / "d", 0o777)
    run_as(U1, U1, f"umask 022; touch {mp}/d/u1file", check=True)
    assert f"user:{U1}:rwx" in sh(f"getfacl -n {mp}/d/u1file").stdout
    xm.remount()
    assert sh(f"getfacl -n {mp}/d/child").stdout == child


@pytest.mark.skipif(not have("setfacl"), reason="needs acl")
def test_acl_enforced_through_the_view(xm, work):
    mp = work / "mp"
    (mp / "denied").write_text("x")  # 0644: readable by all but U1
    sh(f"setfacl -m u:{U1}:--- {mp}/denied")
    (mp / "granted").write_text("x")
    os.chmod(mp / "granted", 0o640)
    sh(f"setfacl -m u:{U1}:r {mp}/granted")
    assert run_as(U2, U2, f"cat {mp}/denied").returncode == 0
    assert run_as(U1, U1, f"cat {mp}/granted").returncode == 0
    assert run_as(U1, U1, f"cat {mp}/denied").returncode != 0


FORGED = [
    RECORD,
    LEGACY,
    "user.containers.override_" + RECORD,
    "user.containers.override_" + LEGACY,
    "user.containers.override_user.containers.override_" + RECORD,
    "user.containers.stat",
    "user.fuseoverlayfs.override_" + RECORD,
]
FORGED_ROOT_ONLY = [
    "security" + LEGACY.removeprefix("user"),
    "trusted.overlay.override_stat",
    "user.containers.override_security.capability",
]


@pytest.mark.parametrize("opts", [[], ["legacy_xattr"]], ids=["plain", "legacy_xattr"])
def test_forged_records_do_not_take(work, opts):
    mp, src = work / "mp", work / "src"
    m = new_mount(work, opts)
    (mp / "mine").write_text("#!/bin/sh\n")
    chown_chmod(mp / "mine", U1, U1, 0o755)
    (mp / "roots").write_text("")
    os.chmod(mp / "roots", 0o644)
    os.mkdir(mp / "dir")
    os.chown(mp / "dir", U1, U1)
    os.symlink("mine", mp / "ln")
    os.lchown(mp / "ln", U1, U1)
    rec_mine, rec_roots = record(src / "mine"), record(src / "roots")
    forged = b"0:0:104755"
    # the records are invisible to everyone
    for uid in (U1, 0):
        for target in ("mine", "dir"):
            out = run_as(uid, uid, ["getfattr", "-d", "-m", "-", f"{mp}/{target}"]).stdout
            assert "override" not in out and "fuseoverlayfs" not in out, out
            r = run_as(uid, uid, ["getfattr", "-n", RECORD, f"{mp}/{target}"])
            assert r.returncode != 0 and "No such attribute" in r.stderr
    # forging: fails, or lands under an escaped name that is never read as a record
    attempts = [(U1, "mine"), (U1, "dir"), (0, "roots"), (0, "mine"), (U1, "ln")]
    for uid, target in attempts:
        # removing the real record is refused
        r = run_as(uid, uid, ["setfattr", "-h", "-x", RECORD, f"{mp}/{target}"])
        assert r.returncode != 0
    for uid, target in attempts:
        names = FORGED + (FORGED_ROOT_ONLY if uid == 0 else [])
        for name in names:
            r = run_as(uid, uid, ["setfattr", "-h", "-n", name, "-v", forged.decode(), f"{mp}/{target}"])
            if r.returncode == 0:
                # what was written reads back as an ordinary xattr under the same name
                got = run_as(uid, uid, ["getfattr", "-h", "--only-values", "-n", name, f"{mp}/{target}"])
                assert got.stdout.encode() == forged, (name, got)
    assert record(src / "mine") == rec_mine and record(src / "roots") == rec_roots
    if "legacy_xattr" in opts:
        assert os.getxattr(src / "mine", LEGACY) == rec_mine
    else:
        assert LEGACY not in os.listxattr(src / "mine")
    m.remount()
    for target, want in (("mine", (U1, U1, 0o755)), ("roots", (0, 0, 0o644)), ("dir", (U1, U1, 0o755))):
        st = lst(mp / target)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == want, target
    assert owner(mp / "ln") == (U1, U1)
    assert not lst(mp / "mine").st_mode & stat.S_ISUID
    # the escaped copies are still what the users wrote, under the names they used
    got = run_as(U1, U1, ["getfattr", "--only-values", "-n", RECORD, f"{mp}/mine"])
    assert got.stdout.encode() == forged
    assert sh(f"getcap {mp}/mine", check=False).stdout.strip() == "" if have("getcap") else True


def test_id_table_composes_with_records(work):
    """view id -> table -> record: records and ACLs hold the table's disk ids."""
    src, mp = work / "src", work / "mp"
    (src / "old").write_text("")
    os.setxattr(src / "old", RECORD, b"7:7:100640")  # a disk id the table does not map
    m = new_mount(work, ["uidmap=100000:0:65536", "gidmap=100000:0:65536"])
    assert owner(mp / "old") == (65534, 65534)  # shown as the overflow id
    os.chmod(mp / "old", 0o600)  # keeps the stored ids
    assert record(src / "old") == b"7:7:100600"
    (mp / "f").write_text("")
    assert record(src / "f") == b"100000:100000:100644"
    os.chown(mp / "f", 5, 6)
    assert record(src / "f") == b"100005:100006:100644" and owner(mp / "f") == (5, 6)
    os.symlink("f", mp / "l")
    os.lchown(mp / "l", 9, 9)
    assert side_rows(src)[lst(src / "l").st_ino] == b"100009:100009:120777"
    with pytest.raises(OSError) as e:
        os.chown(mp / "f", 70000, 70000)  # no disk id for it
    assert e.value.errno == errno.EOVERFLOW
    if have("setfacl", "getfacl"):
        sh(f"setfacl -m u:5:rw {mp}/f")
        raw = os.getxattr(src / "f", "user.containers.override_system.posix_acl_access")
        assert (100005).to_bytes(4, "little") in raw
        assert "user:5:rw-" in sh(f"getfacl -n {mp}/f").stdout
    m.remount()
    assert owner(mp / "f") == (5, 6) and owner(mp / "l") == (9, 9)


# -- files without (good) records ----------------------------------------------------


def test_no_record_and_malformed_records(work):
    src, mp = work / "src", work / "mp"
    for name in ("plain", "garbage", "toolarge", "wrongtype", "dir-as-link"):
        (src / name).write_text("data")
    (src / "foreign").write_text("data")
    os.mkdir(src / "dir")
    chown_chmod(src / "plain", 0, 456, 0o640)
    # Another user's file: its record is not read, it shows as the overflow id (issue 14).
    chown_chmod(src / "foreign", 123, 456, 0o4750)
    os.setxattr(src / "foreign", RECORD, b"0:0:104755")
    os.setxattr(src / "garbage", RECORD, b"not a record")
    os.setxattr(src / "toolarge", RECORD, b"99999999999:0:100644")
    os.setxattr(src / "wrongtype", RECORD, b"0:0:40755")  # a dir record on a regular file
    os.setxattr(src / "dir", RECORD, b"0:0:120777")  # a symlink record on a dir
    os.setxattr(src / "dir-as-link", RECORD, b"0:0:0644:symlink")
    os.chown(src / "garbage", 0, 77)
    m = new_mount(work)
    assert owner(mp / "plain") == (0, 456) and perm(mp / "plain") == 0o640
    assert owner(mp / "foreign") == (65534, 65534) and perm(mp / "foreign") == 0o750
    assert owner(mp / "garbage") == (0, 77)
    for name in ("toolarge", "wrongtype", "dir-as-link"):
        assert stat.S_ISREG(lst(mp / name).st_mode), name
        assert (mp / name).read_text() == "data"
    assert stat.S_ISDIR(lst(mp / "dir").st_mode)
    os.listdir(mp / "dir")
    # re-read after the kernel forgot the inodes: still no crash, one warning per inode
    sh("sync; echo 2 > /proc/sys/vm/drop_caches")
    for _ in range(3):
        assert owner(mp / "garbage") == (0, 77)
    log = m.log_text()
    assert log.count("malformed record") == 5, log
    assert "not a record" in log
    assert log.count("not believing") == 1, log
    # a change writes a good record; another user's file gets none
    os.chmod(mp / "garbage", 0o600)
    assert record(src / "garbage") == b"0:77:100600"
    with pytest.raises(PermissionError):
        os.chmod(mp / "foreign", 0o4755)
    m.umount()

    m2 = new_mount(work, ["default_owner=0:0"], mp="mp")
    assert owner(mp / "plain") == (0, 0) and perm(mp / "plain") == 0o640
    assert owner(mp / "wrongtype") == (0, 0)
    assert owner(mp / "garbage") == (0, 77)  # has a good record now
    assert owner(mp / "foreign") == (65534, 65534)
    m2.umount()


def test_tree_made_outside_the_mount(work):
    """A backing tree with real owners and privilege bits and no records (e.g. untarred natively).

    The daemon's own inodes (root's here) show their backing owner and mode;
    the mount moves setuid/setgid and group write into records before
    serving. Other users' inodes show as the overflow id without
    setuid/setgid (issue 14: only the daemon's user is believed).
    """
    src, mp = work / "src", work / "mp"
    (src / "sg").mkdir()
    chown_chmod(src / "sg", 0, 50, 0o2775)
    (src / "suid").write_text("")
    chown_chmod(src / "suid", 0, 8, 0o4755)
    (src / "other").write_text("")
    chown_chmod(src / "other", 7, 8, 0o4755)
    with Mount(src, mp, mode="xattr"):
        # no record: the backing owner and mode, as they are
        assert owner(mp / "suid") == (0, 8) and perm(mp / "suid") == 0o4755
        assert owner(mp / "other") == (65534, 65534) and perm(mp / "other") == 0o755
        # on disk the privilege bits now live in records only
        assert perm(src / "suid") == 0o755 and record(src / "suid") == b"0:8:104755"
        assert perm(src / "sg") == 0o755 and record(src / "sg") == b"0:50:42775"
        assert owner(mp / "sg") == (0, 50) and perm(mp / "sg") == 0o2775
        os.mkdir(mp / "sg" / "sub")
        (mp / "sg" / "f").write_text("")
        # the view follows the view parent's setgid; the backing inode drops what it inherited
        assert owner(mp / "sg" / "sub") == (0, 50) and perm(mp / "sg" / "sub") == 0o2755
        assert not lst(src / "sg" / "sub").st_mode & stat.S_ISGID
        assert owner(mp / "sg" / "f")[1] == 50
        # the first change writes a record and leaves a plain backing file
        os.chmod(mp / "suid", 0o4750)
        assert record(src / "suid") == b"0:8:104750"
        assert perm(src / "suid") == 0o750 and owner(mp / "suid") == (0, 8)


def test_unprivileged_daemon_over_read_only_tree(work):
    """The daemon's own read-only files and dirs made outside the mount still take records."""
    src, mp = work / "src", work / "mp"
    (src / "ro").mkdir()
    (src / "ro" / "f").write_text("x")
    os.chmod(src / "ro" / "f", 0o444)
    os.chmod(src / "ro", 0o555)
    for p in (src, mp, src / "ro", src / "ro" / "f"):
        os.chown(p, U1, U1)
    logs = work / "logs"
    logs.mkdir()
    os.chown(logs, U1, U1)
    new_mount(work, ["allow_other"], as_uid=U1, log=logs / "m.log")
    os.chown(mp / "ro" / "f", 5, 5)
    os.chown(mp / "ro", 6, 6)
    assert owner(mp / "ro" / "f") == (5, 5) and perm(mp / "ro" / "f") == 0o444
    assert owner(mp / "ro") == (6, 6) and perm(mp / "ro") == 0o555
    assert record(src / "ro" / "f") == b"5:5:100444" and record(src / "ro") == b"6:6:40555"
    assert perm(src / "ro" / "f") == 0o644 and perm(src / "ro") == 0o755


def test_every_record_variant_is_read(work):
    src, mp = work / "src", work / "mp"
    cases = {
        "c-overlayfs": (b"7:8:100640", RECORD, "-rw-r-----", 7, 8),
        "rust": (b"9:9:4755", RECORD, "-rwsr-xr-x", 9, 9),
        "storage-old": (b"1:2:0600", RECORD, "-rw-------", 1, 2),
        "storage-new": (b"3:4:0644:file", RECORD, "-rw-r--r--", 3, 4),
        "dev": (b"0:6:0660:block-8-16", RECORD, "brw-rw----", 0, 6),
        "legacy": (b"5:5:102755", LEGACY, "-rwxr-sr-x", 5, 5),
        "nul": (b"6:6:100600\0", RECORD, "-rw-------", 6, 6),
    }
    for name, (value, xname, *_r) in cases.items():
        (src / name).write_text("")
        os.setxattr(src / name, xname, value)
    (src / "both").write_text("")
    os.setxattr(src / "both", RECORD, b"1:1:100644")
    os.setxattr(src / "both", LEGACY, b"2:2:100600")
    with Mount(src, mp, mode="xattr"):
        for name, (_v, _x, fm, uid, gid) in cases.items():
            st = lst(mp / name)
            assert (stat.filemode(st.st_mode), st.st_uid, st.st_gid) == (fm, uid, gid), name
        assert lst(mp / "dev").st_rdev == os.makedev(8, 16)
        assert owner(mp / "both") == (1, 1)  # the current name wins
        os.chmod(mp / "legacy", 0o755)
        # an existing legacy record is kept in step, so older readers see the change
        assert os.getxattr(src / "legacy", LEGACY) == os.getxattr(src / "legacy", RECORD) == b"5:5:100755"
    with Mount(src, mp, mode="xattr", opts=["legacy_xattr"]):
        assert owner(mp / "both") == (2, 2)  # with -o legacy_xattr the legacy name wins
        os.chmod(mp / "both", 0o640)
        assert os.getxattr(src / "both", RECORD) == os.getxattr(src / "both", LEGACY) == b"2:2:100640"


def test_records_exist_before_entries_are_visible(xm, work):
    """Watch the backing dir while creating through the mount: no entry is ever seen without its record."""
    mp, src = work / "mp", work / "src"
    os.mkdir(mp / "w")
    stop = threading.Event()
    seen_bad: list[str] = []
    checked = [0]

    def watch():
        import sqlite3

        db = None
        while not stop.is_set():
            try:
                entries = list(os.scandir(src / "w"))
            except OSError:
                continue
            for e in entries:
                if e.name.startswith(".shiftfs~"):
                    continue
                try:
                    st = os.lstat(e.path)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                    ok = record(e.path) is not None
                else:
                    if db is None:
                        db = sqlite3.connect(f"file:{src}/.shiftfs/records.db?mode=ro", uri=True)
                    ok = db.execute("SELECT 1 FROM records WHERE ino=?", (st.st_ino,)).fetchone() is not None
                checked[0] += 1
                if not ok:
                    seen_bad.append(e.name)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(150):
            (mp / "w" / f"f{i}").write_text("")
            os.mkdir(mp / "w" / f"d{i}")
            os.symlink("x", mp / "w" / f"l{i}")
            os.mkfifo(mp / "w" / f"p{i}")
            os.mknod(mp / "w" / f"c{i}", stat.S_IFCHR | 0o600, os.makedev(1, 7))
    finally:
        stop.set()
        t.join()
    assert seen_bad == []
    assert checked[0] > 0
    assert not [n for n in os.listdir(src / "w") if n.startswith(".shiftfs~")]


# -- interop with fuse-overlayfs (Debian 12: 1.10, legacy record name only) -----------

needs_fo = pytest.mark.skipif(not have("fuse-overlayfs", "tar"), reason="needs fuse-overlayfs and tar")

# fields compared: type+mode, uid, gid, rdev, link target/size; nlink only for non-directories
_CMP = (0, 1, 2, 3, 5)


def _cmp_nlink(a: dict, b: dict) -> list[str]:
    out = []
    for k in a.keys() & b.keys():
        if not stat.S_ISDIR(a[k][0]) and a[k][4] != b[k][4]:
            out.append(f"{k}: nlink {a[k][4]} vs {b[k][4]}")
    return out


@needs_fo
def test_interop_fuse_overlayfs_writes_shiftfs_reads(work, rootfs_tar):
    lower, upper, wd, fmp = (work / n for n in ("lower", "upper", "fowork", "fomp"))
    for p in (lower, upper, wd, fmp):
        p.mkdir()
    with fuse_overlayfs(upper, wd, lower, fmp):
        sh(f"tar --numeric-owner -xpf {rootfs_tar} -C {fmp}")
        (fmp / "later").write_text("x")
        os.chown(fmp / "later", 5, 6)  # fuse-overlayfs 1.10 keeps chown...
        os.chmod(fmp / "later", 0o4750)  # ...until a chmod (its bug #407-era), whatever it shows is the truth here
        theirs = snapshot(fmp, skip_store=False)
    m = Mount(upper, work / "mp", mode="xattr")
    _MOUNTS.append(m)
    m.mount()
    ours = snapshot(work / "mp")
    # fuse-overlayfs marks the directories it makes opaque with .wh..wh..opq files:
    # overlay metadata in its upper layer, plain files to anyone else
    ours = {k: v for k, v in ours.items() if not os.path.basename(k).startswith(".wh.")}
    keys = set(theirs) - {"."}
    assert diff_snapshots(theirs, ours, keys=keys, fields=_CMP) == []
    assert _cmp_nlink(theirs, ours) == []
    assert set(ours) == set(theirs)
    # the records they wrote are theirs: nothing rewritten by merely reading
    assert RECORD not in os.listxattr(upper / "later")


@needs_fo
def test_interop_shiftfs_writes_fuse_overlayfs_reads(work, rootfs_tar):
    lower, upper, wd, fmp = (work / n for n in ("lower", "upper", "fowork", "fomp"))
    for p in (lower, upper, wd, fmp):
        p.mkdir()
    m = Mount(upper, work / "mp", mode="xattr", opts=["legacy_xattr"])
    _MOUNTS.append(m)
    m.mount()
    # fuse-overlayfs 1.10 cannot list a directory holding a file or directory
    # without a record: the root and our own side-table files get one
    assert os.getxattr(upper, LEGACY) == b"0:0:40755"
    sh(f"tar --numeric-owner -xpf {rootfs_tar} -C {work / 'mp'}")
    ours = snapshot(work / "mp")
    m.umount()
    with fuse_overlayfs(upper, wd, lower, fmp):
        theirs = snapshot(fmp, skip_store=False)
    # fuse-overlayfs sees records on regular files and directories only; our symlink,
    # FIFO and socket records live in the side table and devices are placeholders
    # it shows as regular files
    comparable = {k for k, v in ours.items() if (stat.S_ISREG(v[0]) or stat.S_ISDIR(v[0])) and k != "."}
    assert len(comparable) > 50
    assert diff_snapshots(ours, theirs, keys=comparable, fields=_CMP) == []
    assert _cmp_nlink({k: ours[k] for k in comparable}, theirs) == []
    for k, v in ours.items():
        if stat.S_ISCHR(v[0]) or stat.S_ISBLK(v[0]):
            assert stat.S_ISREG(theirs[k][0]), k
        elif stat.S_ISLNK(v[0]) or stat.S_ISFIFO(v[0]):
            assert stat.S_IFMT(theirs[k][0]) == stat.S_IFMT(v[0]) and theirs[k][5] == v[5], k
    assert ".shiftfs" in theirs and record(upper / ".shiftfs" / "records.db") is not None


# -- a root filesystem through the mount: tar round trip -------------------------------


def _make_rootfs(root: Path) -> None:
    """A small tree shaped like a Debian root: owners, setuid, hard links, symlinks, FIFOs, devices."""
    os.umask(0)
    dirs = [
        ("usr", 0, 0, 0o755),
        ("usr/bin", 0, 0, 0o755),
        ("usr/sbin", 0, 0, 0o755),
        ("usr/lib", 0, 0, 0o755),
        ("usr/lib/x86_64-linux-gnu", 0, 0, 0o755),
        ("usr/share", 0, 0, 0o755),
        ("usr/share/doc", 0, 0, 0o755),
        ("etc", 0, 0, 0o755),
        ("etc/ssl", 0, 0, 0o755),
        ("etc/ssl/private", 0, 111, 0o710),
        ("var", 0, 0, 0o755),
        ("var/log", 0, 0, 0o755),
        ("var/mail", 0, 8, 0o2775),
        ("var/tmp", 0, 0, 0o1777),
        ("var/spool", 0, 0, 0o755),
        ("var/spool/cron", 0, 0, 0o755),
        ("var/spool/cron/crontabs", 0, 102, 0o1730),
        ("var/cache", 0, 0, 0o755),
        ("var/cache/man", 6, 12, 0o2755),
        ("var/lib", 0, 0, 0o755),
        ("var/lib/postgresql", 105, 109, 0o700),
        ("tmp", 0, 0, 0o1777),
        ("root", 0, 0, 0o700),
        ("home", 0, 0, 0o755),
        ("home/user", 1000, 1000, 0o750),
        ("home/user/.ssh", 1000, 1000, 0o700),
        ("dev", 0, 0, 0o755),
        ("dev/pts", 0, 0, 0o755),
        ("run", 0, 0, 0o755),
        ("run/systemd", 0, 0, 0o755),
        ("srv", 0, 0, 0o555),
        ("opt/app", 4294967294, 4294967294, 0o775),
    ]
    for rel, _uid, _gid, _mode in dirs:
        p = root / rel
        p.mkdir(parents=True, exist_ok=True)
    files = [
        ("usr/bin/passwd", 0, 0, 0o4755),
        ("usr/bin/su", 0, 0, 0o4755),
        ("usr/bin/chage", 0, 42, 0o2755),
        ("usr/bin/crontab", 0, 102, 0o2755),
        ("usr/bin/wall", 0, 5, 0o2755),
        ("usr/lib/dbus-helper", 0, 106, 0o4754),
        ("usr/bin/perl", 0, 0, 0o755),
        ("usr/sbin/unix_chkpwd", 0, 42, 0o2755),
        ("etc/shadow", 0, 42, 0o640),
        ("etc/gshadow", 0, 42, 0o640),
        ("etc/passwd", 0, 0, 0o644),
        ("etc/ssl/private/key.pem", 0, 111, 0o640),
        ("var/log/syslog", 0, 4, 0o640),
        ("var/log/wtmp", 0, 43, 0o664),
        ("var/log/btmp", 0, 43, 0o660),
        ("var/mail/user", 1000, 8, 0o660),
        ("var/lib/postgresql/PG_VERSION", 105, 109, 0o600),
        ("home/user/.bashrc", 1000, 1000, 0o644),
        ("home/user/.ssh/authorized_keys", 1000, 1000, 0o600),
        ("root/.profile", 0, 0, 0o600),
        ("opt/app/run.sh", 4294967294, 4294967294, 0o6775),
        ("etc/nothing", 0, 0, 0o000),
        ("usr/share/doc/empty", 3, 3, 0o444),
        ("var/spool/cron/crontabs/user", 1000, 102, 0o600),
    ]
    for i in range(120):
        files.append((f"usr/lib/x86_64-linux-gnu/lib{i}.so.{i % 7}", 0, 0, 0o644))
    for i in range(40):
        files.append((f"usr/share/doc/pkg{i}", i % 3, i % 5, 0o644 if i % 2 else 0o664))
    for n, (rel, _uid, _gid, _mode) in enumerate(files):
        p = root / rel
        p.write_bytes(os.urandom(n % 97 * 13) + rel.encode())
    os.link(root / "usr/bin/perl", root / "usr/bin/perl5.36.0")
    os.link(root / "usr/bin/su", root / "usr/sbin/su-hard")  # a setuid hard link
    os.link(root / "usr/lib/x86_64-linux-gnu/lib1.so.1", root / "usr/lib/x86_64-linux-gnu/lib1-alias.so")
    links = [
        ("bin", "usr/bin", 0, 0),
        ("sbin", "usr/sbin", 0, 0),
        ("lib", "usr/lib", 0, 0),
        ("etc/mtab", "../proc/self/mounts", 0, 0),
        ("usr/bin/vi", "/etc/alternatives/vi", 0, 0),
        ("home/user/link", "/nonexistent", 1000, 1000),
        ("var/run", "/run", 0, 0),
        ("usr/lib/x86_64-linux-gnu/libz.so", "lib3.so.3", 0, 0),
        ("opt/app/cur", "run.sh", 4294967294, 7),
    ]
    for rel, target, uid, gid in links:
        os.symlink(target, root / rel)
        os.lchown(root / rel, uid, gid)
    os.mkfifo(root / "run/initctl", 0o600)
    os.mkfifo(root / "run/systemd/notify-fifo", 0o620)
    os.chown(root / "run/systemd/notify-fifo", 0, 5)
    devs = [
        ("dev/null", stat.S_IFCHR, 1, 3, 0, 0, 0o666),
        ("dev/zero", stat.S_IFCHR, 1, 5, 0, 0, 0o666),
        ("dev/console", stat.S_IFCHR, 5, 1, 0, 5, 0o600),
        ("dev/tty", stat.S_IFCHR, 5, 0, 0, 5, 0o666),
        ("dev/sda", stat.S_IFBLK, 8, 0, 0, 6, 0o660),
        ("dev/loop0", stat.S_IFBLK, 7, 0, 0, 6, 0o660),
    ]
    for rel, kind, ma, mi, uid, gid, mode in devs:
        os.mknod(root / rel, kind | mode, os.makedev(ma, mi))
        os.chown(root / rel, uid, gid)
    for rel, uid, gid, mode in files:
        chown_chmod(root / rel, uid, gid, mode)
    t = 1_600_000_000
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            t += 7
            os.utime(os.path.join(dirpath, n), ns=(t * 10**9, t * 10**9 + 123), follow_symlinks=False)
    for rel, uid, gid, mode in dirs:
        chown_chmod(root / rel, uid, gid, mode)
    os.chmod(root, 0o755)


@pytest.fixture(scope="module")
def rootfs_tar():
    """A tar (``--numeric-owner``) of a generated root-filesystem-shaped tree."""
    d = Path(tempfile.mkdtemp(prefix="shiftfs-rootfs-", dir="/tmp"))
    d.chmod(0o755)
    root = d / "root"
    root.mkdir()
    old_umask = os.umask(0o022)
    try:
        _make_rootfs(root)  # sets its own umask
    finally:
        os.umask(old_umask)
    tarball = d / "rootfs.tar"
    sh(f"tar --numeric-owner --sort=name -cf {tarball} -C {root} .")
    tarball.chmod(0o644)
    yield tarball
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("daemon", ["root", "uid1000"])
def test_rootfs_tar_round_trip(work, rootfs_tar, daemon):
    src, mp = work / "src", work / "mp"
    opts = []
    as_uid = None
    if daemon == "uid1000":
        # an unprivileged daemon over a tree it owns; root works through allow_other
        for p in (src, mp):
            os.chown(p, U1, U1)
        logs = work / "logs"
        logs.mkdir()
        os.chown(logs, U1, U1)
        opts, as_uid = ["allow_other"], U1
        m = new_mount(work, opts, as_uid=as_uid, log=logs / "mount.log")
    else:
        m = new_mount(work)
    r = sh(f"tar --numeric-owner -xpf {rootfs_tar} -C {mp}", check=False)
    assert r.returncode == 0, r.stderr
    r = sh(f"tar --numeric-owner -df {rootfs_tar} -C {mp}", check=False)
    assert r.stdout == "" and r.returncode == 0, r.stdout + r.stderr
    m.remount()
    r = sh(f"tar --numeric-owner -df {rootfs_tar} -C {mp}", check=False)
    assert r.stdout == "" and r.returncode == 0, r.stdout + r.stderr
    view = snapshot(mp)
    assert stat.filemode(view["usr/bin/passwd"][0]) == "-rwsr-xr-x"
    assert view["usr/bin/su"][4] == 2 and view["dev/null"][3] == os.makedev(1, 3)
    # the backing tree is the daemon's and holds no privilege
    me = U1 if as_uid is not None else 0
    for rel, v in snapshot(src).items():
        mode, uid = v[0], v[1]
        assert uid == me, rel
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), rel
        assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)), rel
        if stat.S_ISREG(mode):
            assert mode & 0o600 == 0o600, rel
        elif stat.S_ISDIR(mode):
            assert mode & 0o700 == 0o700, rel
    if as_uid is not None:
        # and the view's modes hold against other view users
        r = run_as(U2, U2, f"cat {mp}/etc/shadow")
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = run_as(U1, U1, f"cat {mp}/home/user/.ssh/authorized_keys")
        assert r.returncode == 0
        r = run_as(U2, U2, f"ls {mp}/root")
        assert r.returncode != 0


@pytest.mark.timeout(1200)
def test_debian_minbase_tar_round_trip(debian_tar, xm, work):
    """A real Debian root (mmdebstrap --variant=minbase, ~9k entries) through the mount and back."""
    src, mp = work / "src", work / "mp"
    tarball = debian_tar
    r = sh(f"tar --numeric-owner -xpf {tarball} -C {mp}", check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    xm.remount()
    r = sh(f"tar --numeric-owner -df {tarball} -C {mp}", check=False, timeout=600)
    assert r.stdout == "" and r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert stat.filemode(lst(mp / "usr/bin/passwd").st_mode) == "-rwsr-xr-x"
    for dirpath, dirnames, filenames in os.walk(src):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), os.path.join(dirpath, n)
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode))
