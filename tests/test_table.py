"""Table-mode ownership semantics through real mounts (project issue 2).

The map is ``b:100000:0:65536`` unless a test says otherwise: disk id
``100000 + k`` is view id ``k``. Like a kernel idmapped mount, a disk id
outside the table reads as the overflow id (65534) and a view id outside the
table cannot be stored (``EOVERFLOW``). Other users act through ``setpriv``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time

import pytest
from asuser import USER_ENV, py_as, run_as
from fsutil import MAP, have
from sysx import errno_of

pytestmark = [pytest.mark.root, pytest.mark.fuse]

BASE = 100000
OVERFLOW = 65534
U, G = 1000, 1000  # a view user inside the table
OUT = 70000  # a view id outside the table


@pytest.fixture(params=["fuse", "kernel"])
def backend(request):
    """Every table-mode case runs on both backends (FUSE daemon, kernel idmapped mount)."""
    return request.param


@pytest.fixture
def shiftfs_mount(shiftfs_mount, backend):
    """The conftest factory with ``-o backend=`` of this parametrization."""

    def make(*args, **kw):
        return shiftfs_mount(*args, "-o", f"backend={backend}", **kw)

    return make


def _src_owned(scratch, name, uid, gid):
    src = scratch / name
    src.mkdir()
    os.chown(src, uid, gid)
    return src


@pytest.fixture
def tm(scratch, shiftfs_mount):
    """Table mount; SOURCE owned by disk 100000 (view root), with a 1777 ``pub`` dir."""
    m = shiftfs_mount("--map", MAP, source=_src_owned(scratch, "src", BASE, BASE))
    os.mkdir(m.path("pub"))
    os.chmod(m.path("pub"), 0o1777)
    return m


def lst(path):
    st = os.lstat(path)
    return st.st_uid, st.st_gid


# -- reading ids ---------------------------------------------------------------------


def test_disk_ids_read_through_table(scratch, shiftfs_mount):
    src = _src_owned(scratch, "src", BASE, BASE)
    cases = {
        "root": (BASE, BASE, 0, 0),
        "user": (BASE + 1000, BASE + 1001, 1000, 1001),
        "last": (BASE + 65535, BASE + 65535, 65535, 65535),
        "below": (BASE - 1, 5, OVERFLOW, OVERFLOW),
        "above": (BASE + 65536, 4_000_000_000, OVERFLOW, OVERFLOW),
        "hostroot": (0, 0, OVERFLOW, OVERFLOW),
        "mixed": (BASE + 7, 0, 7, OVERFLOW),
    }
    for name, (du, dg, _, _) in cases.items():
        p = src / name
        p.write_bytes(b"")
        os.chown(p, du, dg)
        os.symlink("t", src / f"l-{name}")
        os.chown(src / f"l-{name}", du, dg, follow_symlinks=False)
    m = shiftfs_mount("--map", MAP, source=src)
    assert lst(m.path()) == (0, 0)
    for name, (_, _, vu, vg) in cases.items():
        assert lst(m.path(name)) == (vu, vg), name
        assert lst(m.path(f"l-{name}")) == (vu, vg), name
    # readdirplus attributes agree with lookup
    with os.scandir(m.path()) as it:
        for e in it:
            if e.name in cases:
                st = e.stat(follow_symlinks=False)
                assert (st.st_uid, st.st_gid) == cases[e.name][2:], e.name


def test_split_maps(scratch, shiftfs_mount):
    """Separate uid and gid tables, several ranges, in both option forms."""
    src = _src_owned(scratch, "src", 200000, 300000)
    f = src / "f"
    f.write_bytes(b"")
    os.chown(f, 200010, 300020)
    g = src / "g"
    g.write_bytes(b"")
    os.chown(g, 500005, 600005)
    m = shiftfs_mount(
        "--map",
        "u:200000:0:1000",
        "--map",
        "u:500000:5000:100",
        "--map",
        "g:300000:0:1000",
        "-o",
        "gidmap=600000:6000:100",
        source=src,
    )
    assert lst(m.path()) == (0, 0)
    assert lst(m.path("f")) == (10, 20)
    assert lst(m.path("g")) == (5005, 6005)
    os.chown(m.path("f"), 5099, 6099)
    assert lst(src / "f") == (500099, 600099)
    assert errno_of(os.chown, m.path("f"), 5100, -1) == errno.EOVERFLOW
    assert errno_of(os.chown, m.path("f"), -1, 1000) == errno.EOVERFLOW


def test_no_table_is_identity(scratch, shiftfs_mount):
    src = scratch / "src"
    src.mkdir()
    (src / "f").write_bytes(b"")
    os.chown(src / "f", 1234, 4_000_000_000)
    m = shiftfs_mount(source=src)
    assert lst(m.path("f")) == (1234, 4_000_000_000)
    os.chown(m.path("f"), 4_294_967_294, 7)
    assert lst(src / "f") == (4_294_967_294, 7)
    os.chmod(m.path(), 0o1777)
    run_as(U, G, ["touch", m.path("mine")], check=True)
    run_as(U, G, ["mkdir", m.path("mydir")], check=True)
    assert lst(src / "mine") == (U, G) and lst(src / "mydir") == (U, G)
    assert lst(m.path("mine")) == (U, G)
    write = m.path("rootfile")
    with open(write, "w"):
        pass
    assert lst(src / "rootfile") == (0, 0)


# -- storing ids -------------------------------------------------------------------------


def test_chown_stores_disk_ids(tm):
    p = tm.path("f")
    open(p, "w").close()
    assert lst(tm.backing("f")) == (BASE, BASE)
    os.chown(p, 5, 6)
    assert lst(p) == (5, 6) and lst(tm.backing("f")) == (BASE + 5, BASE + 6)
    os.chown(p, -1, 65535)
    assert lst(tm.backing("f")) == (BASE + 5, BASE + 65535)
    os.symlink("f", tm.path("l"))
    os.chown(tm.path("l"), 9, 9, follow_symlinks=False)
    assert lst(tm.backing("l")) == (BASE + 9, BASE + 9)
    assert lst(tm.backing("f")) == (BASE + 5, BASE + 65535)
    os.chown(tm.path("l"), 11, 12)  # follows the link
    assert lst(tm.backing("f")) == (BASE + 11, BASE + 12)


def test_chown_outside_table_is_eoverflow(tm):
    p = tm.path("f")
    open(p, "w").close()
    os.chown(p, 5, 5)
    os.symlink("f", tm.path("l"))
    os.mkdir(tm.path("d"))
    for target, follow in ((p, True), (tm.path("l"), False), (tm.path("d"), True)):
        before_b, before_v = os.lstat(tm.backing(os.path.basename(target))), os.lstat(target)
        for uid, gid in ((OUT, -1), (-1, OUT), (65536, 5), (5, 65536), (OVERFLOW + 2, OVERFLOW + 2)):
            assert errno_of(os.chown, target, uid, gid, follow_symlinks=follow) == errno.EOVERFLOW, (target, uid, gid)
        after_b, after_v = os.lstat(tm.backing(os.path.basename(target))), os.lstat(target)
        assert (after_b.st_uid, after_b.st_gid, after_b.st_mode) == (before_b.st_uid, before_b.st_gid, before_b.st_mode)
        assert (after_v.st_uid, after_v.st_gid) == (before_v.st_uid, before_v.st_gid)
    # the overflow id itself is inside this table (65534 < 65536), so it can be stored
    os.chown(p, OVERFLOW, OVERFLOW)
    assert lst(tm.backing("f")) == (BASE + OVERFLOW, BASE + OVERFLOW)


#: A py_as body's start: ``tryit(name, fn)`` records 0 or the errno of each attempt in ``out``.
TRYIT = """
import os, stat
d = {d!r}
out = {{}}
def tryit(name, fn):
    try:
        fn()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
"""

CREATE_ALL = (
    TRYIT
    + """
tryit("file", lambda: os.close(os.open(d + "/file", os.O_CREAT | os.O_WRONLY, 0o644)))
tryit("excl", lambda: os.close(os.open(d + "/excl", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)))
tryit("dir", lambda: os.mkdir(d + "/dir"))
tryit("link", lambda: os.symlink("target", d + "/link"))
tryit("fifo", lambda: os.mkfifo(d + "/fifo"))
tryit("sock", lambda: os.mknod(d + "/sock", stat.S_IFSOCK | 0o600))
return out
"""
)


def test_create_as_unmapped_user_is_eoverflow(tm):
    for uid, gid in ((OUT, OUT), (U, OUT), (OUT, G)):
        res = py_as(uid, gid, CREATE_ALL.format(d=tm.path("pub")))["ok"]
        assert res == {k: errno.EOVERFLOW for k in res}, (uid, gid, res)
        assert os.listdir(tm.backing("pub")) == [], (uid, gid)
        assert os.listdir(tm.path("pub")) == []
    # a hard link is not a new inode: an unmapped caller may still make one
    # (the kernel checks its permissions; the owner stays the file's)
    open(tm.path("pub", "f"), "w").close()
    os.chmod(tm.path("pub", "f"), 0o666)
    r = py_as(OUT, OUT, f"os.link({tm.path('pub', 'f')!r}, {tm.path('pub', 'g')!r})")
    if "ok" in r:
        assert lst(tm.backing("pub", "g")) == (BASE, BASE)


@pytest.mark.parametrize("uid,gid", [(U, G), (0, 0), (65535, 42)])
def test_create_as_user_stores_mapped_ids(tm, uid, gid):
    res = py_as(uid, gid, CREATE_ALL.format(d=tm.path("pub")))["ok"]
    assert res == {k: 0 for k in res}, res
    for name in res:
        assert lst(tm.path("pub", name)) == (uid, gid), name
        assert lst(tm.backing("pub", name)) == (BASE + uid, BASE + gid), name
    # and the modes are the requested ones under umask 022
    modes = {n: stat.S_IMODE(os.lstat(tm.backing("pub", n)).st_mode) for n in res}
    assert modes == {"file": 0o644, "excl": 0o600, "dir": 0o755, "link": 0o777, "fifo": 0o644, "sock": 0o600}
    # a view user can chown only within its rights, and gets the mapped ids
    r = py_as(uid, gid, f"os.chown({tm.path('pub', 'file')!r}, -1, {gid}); return 'ok'")
    assert r == {"ok": "ok"}


def test_new_file_owner_follows_fsuid_and_groups(tm):
    # a member of group 50 can chgrp its file to 50; a non-member cannot
    run_as(U, G, ["touch", tm.path("pub", "f")], groups=(G, 50), check=True)
    r = run_as(U, G, ["chgrp", "50", tm.path("pub", "f")], groups=(G, 50))
    assert r.returncode == 0, r.stderr
    assert lst(tm.backing("pub", "f")) == (BASE + U, BASE + 50)
    r = run_as(U, G, ["chgrp", "51", tm.path("pub", "f")], groups=(G, 50))
    assert r.returncode != 0
    assert lst(tm.backing("pub", "f")) == (BASE + U, BASE + 50)
    r = run_as(U + 1, U + 1, ["chown", f"{U + 1}", tm.path("pub", "f")])
    assert r.returncode != 0


def test_setgid_directory_inheritance(tm):
    d = tm.path("shared")
    os.mkdir(d)
    os.chown(d, 0, 50)
    os.chmod(d, 0o2777)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o2777
    # a member of group 50
    run_as(
        U,
        G,
        ["sh", "-c", f"umask 022; touch {d}/f; mkdir {d}/sub; ln -s x {d}/l; mkfifo {d}/p"],
        groups=(G, 50),
        check=True,
    )
    for n in ("f", "sub", "l", "p"):
        assert lst(f"{d}/{n}") == (U, 50), n
        assert lst(tm.backing("shared", n)) == (BASE + U, BASE + 50), n
    assert stat.S_IMODE(os.stat(f"{d}/sub").st_mode) == 0o2755
    assert stat.S_IMODE(os.stat(tm.backing("shared", "sub")).st_mode) == 0o2755
    assert not os.stat(f"{d}/f").st_mode & stat.S_ISGID
    # the inheritance continues below
    run_as(U, G, ["touch", f"{d}/sub/deeper"], groups=(G, 50), check=True)
    assert lst(f"{d}/sub/deeper") == (U, 50)
    # a non-member: group still inherited; a group-executable setgid file loses S_ISGID
    r = py_as(
        U + 1,
        U + 1,
        f"os.close(os.open({d + '/nm'!r}, os.O_CREAT | os.O_WRONLY, 0o2775)); os.mkdir({d + '/nmdir'!r}); return 0",
        umask=0,
    )
    assert r == {"ok": 0}
    assert lst(f"{d}/nm") == (U + 1, 50) and lst(f"{d}/nmdir") == (U + 1, 50)
    assert stat.S_IMODE(os.stat(f"{d}/nm").st_mode) == 0o775
    assert stat.S_IMODE(os.stat(f"{d}/nmdir").st_mode) == 0o2777
    assert stat.S_IMODE(os.stat(tm.backing("shared", "nm")).st_mode) == 0o775
    # outside the setgid dir the caller's group applies
    run_as(U, G, ["touch", tm.path("pub", "plain")], groups=(G, 50), check=True)
    assert lst(tm.path("pub", "plain")) == (U, G)
    # root creating in the setgid dir also gets the directory's group
    open(f"{d}/rootfile", "w").close()
    assert lst(f"{d}/rootfile") == (0, 50)
    assert lst(tm.backing("shared", "rootfile")) == (BASE, BASE + 50)


UMASK_CREATE = """
import os, socket
d = {d!r}
os.close(os.open(d + "/f", os.O_CREAT | os.O_WRONLY, 0o666))
os.mkdir(d + "/d", 0o777)
os.mkfifo(d + "/p", 0o666)
os.symlink("x", d + "/l")
s = socket.socket(socket.AF_UNIX); s.bind(d + "/s"); s.close()
return {{n: os.lstat(d + "/" + n).st_mode & 0o7777 for n in ("f", "d", "p", "l", "s")}}
"""


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o000])
def test_umask_applied(tm, umask):
    d = tm.path("pub", f"u{umask:o}")
    os.mkdir(d, 0o777)
    os.chmod(d, 0o777)
    res = py_as(U, G, UMASK_CREATE.format(d=d), umask=umask)["ok"]
    want = {"f": 0o666 & ~umask, "d": 0o777 & ~umask, "p": 0o666 & ~umask, "l": 0o777, "s": 0o777 & ~umask}
    assert res == want
    back = {n: os.lstat(os.path.join(tm.backing("pub", f"u{umask:o}"), n)).st_mode & 0o7777 for n in want}
    assert back == want


@pytest.mark.skipif(not have("setfacl", "getfacl"), reason="needs acl tools")
def test_default_acl_replaces_umask(tm, backend):
    # FUSE engine: the mount asks for FUSE_DONT_MASK (shiftfs.fs.connection), so the kernel
    # passes the mode unmasked and the daemon applies the default ACL, as the kernel backend does
    d = tm.path("pub", "acl")
    os.mkdir(d)
    os.chmod(d, 0o777)
    subprocess.run(["setfacl", "-d", "-m", "u::rwx,g::r-x,o::---", d], check=True)
    res = py_as(U, G, UMASK_CREATE.format(d=d), umask=0o077)["ok"]
    # POSIX: with a default ACL the umask is ignored; the ACL masks the mode
    assert res["f"] == 0o640 and res["d"] == 0o750 and res["p"] == 0o640
    for n in ("f", "d", "p"):
        b = os.lstat(tm.backing("pub", "acl", n))
        assert stat.S_IMODE(b.st_mode) == res[n], n
        assert (b.st_uid, b.st_gid) == (BASE + U, BASE + G)


def _getfacl(path, *opts) -> set[str]:
    r = subprocess.run(["getfacl", "-n", "-p", "-c", "-E", *opts, path], capture_output=True, text=True, check=True)
    return {line.strip() for line in r.stdout.splitlines() if line.strip()}


@pytest.mark.skipif(not have("setfacl", "getfacl"), reason="needs acl tools")
def test_new_objects_show_their_xattrs(tm):
    """New files and directories get their xattr names without a listxattr
    (shiftfs.fs.xattrs): what every new object gets, plus what the stamp
    wrote. A default ACL the backing filesystem copies, an xattr set before
    the first probe, and names set later must all show."""
    d = tm.path("d")
    os.mkdir(d)
    for n in ("a", "b", "c"):
        with open(os.path.join(d, n), "w") as f:
            f.write("x")  # the write probes security.capability
    os.setxattr(os.path.join(d, "b"), "user.late", b"1")
    os.mkdir(os.path.join(d, "sub"))
    open(os.path.join(d, "e"), "w").close()
    os.setxattr(os.path.join(d, "e"), "user.early", b"2")  # before any probe of e
    assert os.listxattr(os.path.join(d, "a")) == [] and os.listxattr(os.path.join(d, "sub")) == []
    assert os.listxattr(os.path.join(d, "b")) == ["user.late"]
    assert os.getxattr(os.path.join(d, "e"), "user.early") == b"2"
    subprocess.run(["setfacl", "-d", "-m", "u:5:rwx", d], check=True)
    open(os.path.join(d, "inherits"), "w").close()
    os.mkdir(os.path.join(d, "inherits.d"))
    assert "user:5:rwx" in _getfacl(os.path.join(d, "inherits"))
    assert "default:user:5:rwx" in _getfacl(os.path.join(d, "inherits.d"))


@pytest.mark.skipif(not have("setfacl", "getfacl"), reason="needs acl tools")
@pytest.mark.parametrize("acl", ["on", "off"])
def test_acl_off_keeps_acls_but_stops_the_directory_acl_fetch(scratch, shiftfs_mount, backend, acl):
    """-o acl=off: ACLs are still stored, translated and read back, but the
    kernel no longer fetches the directory's access ACL after each create in
    it (a create invalidates the directory's attributes, and refreshing them
    drops its cached ACLs)."""
    if backend == "kernel":
        pytest.skip("a FUSE-engine option")
    m = shiftfs_mount("--map", MAP, "-o", f"acl={acl}", source=_src_owned(scratch, "src", BASE, BASE), stats=True)
    d = m.path("d")
    os.mkdir(d)
    os.chown(d, U, G)  # we create in another user's directory: its group/other class, so its ACL, decides
    os.chmod(d, 0o777)
    before = m.read_stats()["counts"].get("getxattr", 0)
    for i in range(20):
        open(os.path.join(d, f"f{i}"), "w").close()
    fetched = m.read_stats()["counts"].get("getxattr", 0) - before
    assert fetched >= 20 if acl == "on" else fetched == 0, fetched
    p = os.path.join(d, "f0")
    subprocess.run(["setfacl", "-m", "u:5:rwx", p], check=True)
    assert "user:5:rwx" in _getfacl(p)
    assert f"user:{BASE + 5}:rwx" in _getfacl(m.backing("d", "f0"))


@pytest.mark.skipif(not have("setfacl", "getfacl"), reason="needs acl tools")
def test_acl_ids_translated(tm, backend):
    p = tm.path("f")
    open(p, "w").close()
    subprocess.run(["setfacl", "-m", "u:5:rwx,g:6:r--", p], check=True)
    assert {"user:5:rwx", "group:6:r--"} <= _getfacl(p)
    back = _getfacl(tm.backing("f"))
    assert {f"user:{BASE + 5}:rwx", f"group:{BASE + 6}:r--"} <= back
    assert not {"user:5:rwx", "group:6:r--"} & back
    # an entry for an id outside the table cannot be stored
    r = subprocess.run(["setfacl", "-m", f"u:{OUT}:r", p], capture_output=True, text=True)
    assert r.returncode != 0
    assert f"user:{BASE + OUT}:r--" not in _getfacl(tm.backing("f"))
    # backing entries read back as view ids; unmapped ones as the overflow id
    b = tm.backing("g")
    open(b, "w").close()
    os.chown(b, BASE, BASE)
    subprocess.run(["setfacl", "-m", f"u:{BASE + 7}:r,g:{BASE + 8}:rw,u:42:r", b], check=True)
    view = _getfacl(tm.path("g"))
    # (the kernel shows an unmapped ACL entry as (uid_t)-1, not the overflow id: docs/kernel-backend.md)
    unmapped = 4294967295 if backend == "kernel" else OVERFLOW
    assert {"user:7:r--", "group:8:rw-", f"user:{unmapped}:r--"} <= view
    # default ACLs too, and they are inherited by new files with the right ids
    d = tm.path("d")
    os.mkdir(d)
    subprocess.run(["setfacl", "-d", "-m", "u:9:rwx", d], check=True)
    assert f"default:user:{BASE + 9}:rwx" in _getfacl(tm.backing("d"))
    open(os.path.join(d, "child"), "w").close()
    assert "user:9:rwx" in _getfacl(os.path.join(d, "child"))
    assert f"user:{BASE + 9}:rwx" in _getfacl(tm.backing("d", "child"))
    # removing the ACL through the mount
    subprocess.run(["setfacl", "-b", p], check=True)
    assert not [
        e
        for e in _getfacl(tm.backing("f"))
        if e.startswith(("user:", "group:")) and e.count(":") == 2 and e.split(":")[1]
    ]


@pytest.mark.skipif(not have("setfacl"), reason="needs acl tools")
def test_acl_is_enforced(tm):
    """A named-user entry decides access, as on any ACL filesystem."""
    p = tm.path("pub", "secret")
    with open(p, "w") as f:
        f.write("s")
    os.chmod(p, 0o600)
    subprocess.run(["setfacl", "-m", f"u:{U}:r", p], check=True)
    assert run_as(U, G, ["cat", p]).stdout == "s"
    assert run_as(U + 1, U + 1, ["cat", p]).returncode != 0
    q = tm.path("pub", "open")
    with open(q, "w") as f:
        f.write("o")
    os.chmod(q, 0o644)
    # (with a non-empty mask: Linux skips the ACL walk when the mask is ---)
    subprocess.run(["setfacl", "-m", f"u:{U}:---", q], check=True)
    assert run_as(U, G, ["cat", q]).returncode != 0, "a u:1000:--- entry must deny user 1000"
    assert run_as(U + 1, U + 1, ["cat", q]).stdout == "o"
    # a named group entry grants, and chmod through the mount narrows the mask
    w = tm.path("pub", "grp")
    with open(w, "w") as f:
        f.write("g")
    os.chmod(w, 0o600)
    subprocess.run(["setfacl", "-m", "g:50:r", w], check=True)
    assert run_as(U, G, ["cat", w], groups=(G, 50)).stdout == "g"
    os.chmod(w, 0o600)  # mask ---
    assert run_as(U, G, ["cat", w], groups=(G, 50)).returncode != 0


@pytest.mark.skipif(not have("setcap", "getcap"), reason="needs libcap2-bin")
def test_setcap_getcap(tm):
    p = tm.path("prog")
    with open(p, "wb") as f:
        f.write(b"#!/bin/sh\n")
    os.chmod(p, 0o755)
    subprocess.run(["setcap", "cap_net_raw,cap_net_bind_service+ep", p], check=True)
    out = subprocess.run(["getcap", p], capture_output=True, text=True, check=True).stdout
    assert "cap_net_bind_service,cap_net_raw=ep" in out
    back = subprocess.run(["getcap", tm.backing("prog")], capture_output=True, text=True, check=True).stdout
    assert "cap_net_bind_service,cap_net_raw=ep" in back
    assert "security.capability" in os.listxattr(p)
    # removing works; writing to the file drops the capability as on any filesystem
    subprocess.run(["setcap", "-r", p], check=True)
    assert subprocess.run(["getcap", p], capture_output=True, text=True).stdout.strip() == ""
    subprocess.run(["setcap", "cap_net_raw+ep", p], check=True)
    with open(p, "ab") as f:
        f.write(b"true\n")
    assert subprocess.run(["getcap", p], capture_output=True, text=True).stdout.strip() == ""
    assert subprocess.run(["getcap", tm.backing("prog")], capture_output=True, text=True).stdout.strip() == ""
    # an unprivileged user can neither set nor remove capabilities
    subprocess.run(["setcap", "cap_net_raw+ep", p], check=True)
    os.chown(p, U, G)
    r = run_as(U, G, ["setcap", "-r", p])
    assert r.returncode != 0


def test_mode_bits_stored(tm):
    p = tm.path("f")
    open(p, "w").close()
    for mode in (0o4755, 0o2755, 0o1777, 0o000, 0o640):
        os.chmod(p, mode)
        assert stat.S_IMODE(os.stat(tm.backing("f")).st_mode) == mode
        assert stat.S_IMODE(os.stat(p).st_mode) == mode


# -- the atomic-create observer -----------------------------------------------------

OBSERVER = r"""
import json, os, stat, sys, time
d, stop, want_uid, want_gid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
modes = {"f": 0o644, "d": 0o755, "p": 0o644, "l": 0o777, "x": 0o600}
bad = []
tmp = []
rounds = seen = 0
print("ready", flush=True)
deadline = time.monotonic() + 900
while not os.path.exists(stop) and time.monotonic() < deadline:
    rounds += 1
    for n in os.listdir(d):
        if n.startswith(".shiftfs"):
            tmp.append(n)
            continue
        try:
            st = os.lstat(os.path.join(d, n))
        except FileNotFoundError:
            continue
        seen += 1
        if (st.st_uid, st.st_gid) != (want_uid, want_gid) or stat.S_IMODE(st.st_mode) != modes[n[0]]:
            bad.append((n, st.st_uid, st.st_gid, oct(st.st_mode)))
print(json.dumps({"rounds": rounds, "seen": seen, "bad": bad[:20], "nbad": len(bad), "tmp": tmp[:20]}), flush=True)
"""

#: objects of each kind the creator makes (SHIFTFS_STRESS=1: ten times more)
N_OBSERVED = 3000 if os.environ.get("SHIFTFS_STRESS") == "1" else 300

CREATOR = r"""
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.umask(0o022)
for i in range(n):
    os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    os.close(os.open(f"{d}/x{i}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    os.mkdir(f"{d}/d{i}")
    os.symlink("target", f"{d}/l{i}")
    os.mkfifo(f"{d}/p{i}")
print("created", flush=True)
"""


@pytest.mark.parametrize("mode", ["table", "xattr"])
def test_observer_never_sees_wrong_owner_stress(scratch, shiftfs_mount, mode, backend):
    if mode == "xattr" and backend == "kernel":
        pytest.skip("xattr mode has only the FUSE backend")
    args = ("--map", MAP) if mode == "table" else ("--xattr",)
    src = _src_owned(scratch, "src", BASE, BASE) if mode == "table" else None
    m = shiftfs_mount(*args, source=src)
    d = m.path("obs")
    os.mkdir(d)
    os.chmod(d, 0o1777)
    uid, gid = U, G
    stop = scratch / "observer.stop"
    obs = subprocess.Popen(
        [sys.executable, "-c", OBSERVER, d, str(stop), str(uid), str(gid)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert obs.stdout.readline().strip() == "ready"
        r = run_as(uid, gid, ["/usr/bin/python3", "-c", CREATOR, d, str(N_OBSERVED)], timeout=600)
        assert r.returncode == 0, r.stderr
    finally:
        stop.touch()
        try:
            out, _ = obs.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            obs.kill()
            out, _ = obs.communicate()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["tmp"] == [], f"the observer saw temporary names: {res['tmp']}"
    assert res["nbad"] == 0, f"the observer saw wrong owners/modes {res['nbad']} times: {res['bad']}"
    assert res["rounds"] > 5 and res["seen"] > 100, res
    # and afterwards everything is right on disk too
    for n in os.listdir(m.backing("obs")):
        assert not n.startswith(".shiftfs"), n
        st = os.lstat(m.backing("obs", n))
        if mode == "table":
            assert (st.st_uid, st.st_gid) == (BASE + uid, BASE + gid), n
    assert len(os.listdir(d)) == 5 * N_OBSERVED


PERMS = (
    TRYIT
    + """
tryit("read_private", lambda: open(d + "/private").read())
tryit("write_readonly", lambda: open(d + "/readonly", "a").write("x"))
tryit("unlink_others_in_sticky", lambda: os.unlink(d + "/sticky/theirs"))
tryit("rename_others_in_sticky", lambda: os.rename(d + "/sticky/theirs", d + "/sticky/moved"))
tryit("unlink_own_in_sticky", lambda: os.unlink(d + "/sticky/mine"))
tryit("create_in_closed_dir", lambda: open(d + "/closed/x", "w").close())
tryit("chmod_others", lambda: os.chmod(d + "/readonly", 0o777))
tryit("chown_own_to_other", lambda: os.chown(d + "/sticky/mine2", 0, -1))
tryit("utime_others_explicit", lambda: os.utime(d + "/readonly", (1, 1)))
tryit("truncate_readonly", lambda: os.truncate(d + "/readonly", 0))
tryit("setxattr_others", lambda: os.setxattr(d + "/readonly", "user.x", b"1"))
return out
"""
)


def test_permissions_enforced_for_view_users(tm):
    d = tm.path("pub", "perm")
    os.mkdir(d)
    for name, mode in (("private", 0o600), ("readonly", 0o644)):
        with open(os.path.join(d, name), "w") as f:
            f.write("data")
        os.chmod(os.path.join(d, name), mode)
    os.mkdir(os.path.join(d, "sticky"))
    os.chmod(os.path.join(d, "sticky"), 0o1777)
    open(os.path.join(d, "sticky", "theirs"), "w").close()
    os.mkdir(os.path.join(d, "closed"))
    os.chmod(os.path.join(d, "closed"), 0o755)
    run_as(U, G, ["touch", f"{d}/sticky/mine", f"{d}/sticky/mine2"], check=True)
    res = py_as(U, G, PERMS.format(d=d))["ok"]
    assert res == {
        "read_private": errno.EACCES,
        "write_readonly": errno.EACCES,
        "unlink_others_in_sticky": errno.EPERM,
        "rename_others_in_sticky": errno.EPERM,
        "unlink_own_in_sticky": 0,
        "create_in_closed_dir": errno.EACCES,
        "chmod_others": errno.EPERM,
        "chown_own_to_other": errno.EPERM,
        "utime_others_explicit": errno.EPERM,
        "truncate_readonly": errno.EACCES,
        "setxattr_others": errno.EACCES,
    }
    assert os.path.exists(os.path.join(d, "sticky", "theirs"))
    assert stat.S_IMODE(os.stat(tm.backing("pub", "perm", "readonly")).st_mode) == 0o644


# -- where the backends differ (docs/kernel-backend.md) ---------------------------------------


def _unmapped_ops(d):
    """0 or the errno of each operation on the prepared files in ``d``."""
    return {
        "read": errno_of(lambda: open(d + "/r").read()),
        "write": errno_of(lambda: open(d + "/w", "a").write("x")),
        "unlink": errno_of(os.unlink, d + "/u"),
        "rename": errno_of(os.rename, d + "/n", d + "/n2"),
        "chmod": errno_of(os.chmod, d + "/m", 0o644),
        "setxattr": errno_of(os.setxattr, d + "/x", "user.a", b"1"),
        "chown_into_table": errno_of(os.chown, d + "/c", 5, 5),
    }


def test_root_on_files_owned_outside_the_table(tm, backend):
    """Host root acting on 0600 files whose disk owner (0) is outside the table.

    FUSE: the kernel sees the overflow owner 65534 and root's capabilities
    apply as on any file. Kernel backend: an idmapped mount grants no
    capability over an inode whose owner it cannot map (EACCES), and refuses
    to unlink, rename or chmod it (EOVERFLOW); chown into the table works.
    """
    d = tm.backing("pub", "unmapped")
    os.mkdir(d)
    os.chown(d, BASE, BASE)
    for n in ("r", "w", "u", "n", "m", "x", "c"):
        with open(os.path.join(d, n), "w") as f:
            f.write("data")
        os.chmod(os.path.join(d, n), 0o600)  # owned by disk root 0:0
    res = _unmapped_ops(tm.path("pub", "unmapped"))  # as this process: root with all capabilities
    if backend == "fuse":
        assert res == {k: 0 for k in res}, res
    else:
        assert res == {
            "read": errno.EACCES,
            "write": errno.EACCES,
            "unlink": errno.EOVERFLOW,
            "rename": errno.EOVERFLOW,
            "chmod": errno.EOVERFLOW,
            "setxattr": errno.EPERM,
            "chown_into_table": 0,
        }, res
    assert lst(os.path.join(d, "c")) == (BASE + 5, BASE + 5)
