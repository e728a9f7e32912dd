"""The mount and the offline tools show one tree the same (issue 26, item 2).

One backing tree per mode is served by a real ``shiftfs mount`` and read by
``shiftfs export`` (a tar, read back with :mod:`tarfile`) and ``shiftfs stat``;
entry by entry, owner, group, mode, type and the xattrs (names and values)
must agree. The trees hold the cases where the two used to differ:

* xattr mode, mounted with ``-o default_owner=7:8`` and exported with
  ``--default-owner 7:8``: files without a record, a record on the trusted
  user's own inode that others can write on disk (not believed: shown as if it
  had none, i.e. the default owner), a record planted on another user's inode
  (the overflow id, no setuid), an unrecorded file carrying the host's own
  ``security.capability`` (hidden, as every backing ``security.*`` of an
  xattr-mode tree), escaped capabilities (v2 and v3) on recorded files;
* table mode (``--map``): a namespaced (v3) capability whose root the table maps
  to view 0 (shown as a plain v2 one, as a kernel idmapped mount shows it), one
  whose root the table does not map (kept as it is), a plain v2 one, setuid and
  setgid entries of ids inside the table and a file of an id outside it.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import tarfile

import pytest
from fsutil import MAP, SHIFTFS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files of several owners, a root mount)")

RECORD = "user.containers.override_stat"
ESC_CAP = "user.containers.override_security.capability"
OVERFLOW = 65534


def cap_v2(permitted: int = 1 << 13) -> bytes:
    """A plain (v2) file capability: cap_net_raw, effective."""
    return struct.pack("<IIIII", 0x02000001, permitted, 0, 0, 0)


def cap_v3(rootid: int, permitted: int = 1 << 13) -> bytes:
    """A namespaced (v3) file capability whose namespace root is ``rootid``."""
    return struct.pack("<IIIIII", 0x03000001, permitted, 0, 0, 0, rootid)


def put(path: str, data: bytes = b"x\n", mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> str:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, *owner)
    os.chmod(path, mode)
    return path


# -- what each side shows ---------------------------------------------------------------------


def mount_side(mp: str) -> dict[str, tuple]:
    """``rel -> (type, perm, uid, gid, xattrs)`` of every entry through the mount."""
    out: dict[str, tuple] = {".": _entry(mp)}
    for dirpath, dirs, files in os.walk(mp):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            out["./" + os.path.relpath(p, mp)] = _entry(p)
    return out


def _entry(p: str) -> tuple:
    st = os.lstat(p)
    xattrs: dict[str, bytes] = {}
    if not stat.S_ISLNK(st.st_mode):
        for name in os.listxattr(p, follow_symlinks=False):
            xattrs[name] = os.getxattr(p, name, follow_symlinks=False)
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs)


_TAR_TYPES = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
}


def export_side(src: str, tar: str, *opts: str) -> dict[str, tuple]:
    """The same, from ``shiftfs export SRC OPTS`` (a pax tar; xattrs from SCHILY.xattr.*)."""
    r = subprocess.run([SHIFTFS, "export", *opts, "-o", tar, src], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 1) and os.path.getsize(tar) > 0, r.stderr
    out: dict[str, tuple] = {}
    with tarfile.open(tar) as tf:
        for ti in tf:
            xattrs = {
                k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
                for k, v in ti.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            }
            if ti.issym():
                xattrs = {}
            out[ti.name.rstrip("/")] = (_TAR_TYPES[ti.type], ti.mode, ti.uid, ti.gid, xattrs)
    return out


def stat_side(src: str, rels: list[str], *opts: str) -> dict[str, tuple]:
    """``rel -> (perm, uid, gid, xattr names)`` from ``shiftfs stat``."""
    paths = [os.path.normpath(os.path.join(src, r)) for r in rels]
    r = subprocess.run([SHIFTFS, "stat", "--root", src, *opts, *paths], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out: dict[str, tuple] = {}
    for rel, block in zip(rels, r.stdout.strip().split("\n\n"), strict=True):
        fields = {}
        for line in block.splitlines():
            key, _, rest = line.strip().partition(": ")
            fields[key] = rest
        access = fields["Access"]  # (0644/-rw-r--r--)  Uid: 7        Gid: 8
        perm = int(access[1 : access.index("/")], 8)
        uid = int(access.split("Uid:")[1].split()[0])
        gid = int(access.split("Gid:")[1].split()[0])
        names = sorted(n.strip() for n in fields["Xattrs"].split(",")) if "Xattrs" in fields else []
        out[rel] = (perm, uid, gid, names)
    return out


def assert_agree(mounted: dict, exported: dict, stated: dict) -> None:
    assert sorted(mounted) == sorted(exported)
    diffs = []
    for rel in sorted(mounted):
        if mounted[rel] != exported[rel]:
            diffs.append(f"{rel}: mount {mounted[rel]} != export {exported[rel]}")
        _t, perm, uid, gid, xattrs = mounted[rel]
        if rel in stated and stated[rel] != (perm, uid, gid, sorted(xattrs)):
            diffs.append(f"{rel}: mount {(perm, uid, gid, sorted(xattrs))} != stat {stated[rel]}")
    assert not diffs, "\n".join(diffs)


# -- the trees --------------------------------------------------------------------------------


def test_xattr_tree_same_through_mount_export_and_stat(scratch, shiftfs_mount):
    src = str(scratch / "src")
    os.mkdir(src, 0o700)
    os.mkdir(f"{src}/d", 0o750)
    os.setxattr(f"{src}/d", RECORD, b"3:4:40750")
    os.setxattr(put(f"{src}/d/rec", mode=0o640), RECORD, b"5:6:100640")
    os.setxattr(put(f"{src}/suid", mode=0o755), RECORD, b"0:0:104755")
    put(f"{src}/plain")  # no record: the default owner
    os.symlink("plain", f"{src}/ln")  # no record either
    # another user's inode with a record they planted: overflow ids, no setuid
    os.setxattr(put(f"{src}/foreign", mode=0o4755, owner=(1234, 1234)), RECORD, b"0:0:104755")
    # the host's own capability on an unrecorded file of an xattr-mode tree: hidden
    os.setxattr(put(f"{src}/hostcap", mode=0o755), "security.capability", cap_v2())
    # capabilities set through a mount: stored escaped, shown as they were set
    p = put(f"{src}/cap2", mode=0o755)
    os.setxattr(p, RECORD, b"0:0:100755")
    os.setxattr(p, ESC_CAP, cap_v2())
    p = put(f"{src}/cap3", mode=0o755)
    os.setxattr(p, RECORD, b"0:0:100755")
    os.setxattr(p, ESC_CAP, cap_v3(1000))
    os.setxattr(p, "user.note", b"kept")

    m = shiftfs_mount("--xattr", "-o", "default_owner=7:8,cache=never", source=src)
    # After the mount's start-up fix of backing modes: a record on our own inode that
    # others can write on disk is not believed (shown as if it had none).
    os.setxattr(put(f"{src}/open", mode=0o666), RECORD, b"0:0:104755")

    mounted = mount_side(m.mountpoint)
    assert mounted["./plain"][2:4] == (7, 8)
    assert mounted["./open"][1:4] == (0o666, 7, 8)
    assert mounted["./foreign"][1:4] == (0o755, OVERFLOW, OVERFLOW)
    assert mounted["./d/rec"][1:4] == (0o640, 5, 6)
    assert "security.capability" not in mounted["./hostcap"][4]
    assert mounted["./cap3"][4]["security.capability"] == cap_v3(1000)

    exported = export_side(src, str(scratch / "x.tar"), "--default-owner", "7:8")
    stated = stat_side(src, [r for r in mounted if r != "./ln"], "--default-owner", "7:8")
    assert_agree(mounted, exported, stated)


def test_table_tree_same_through_mount_export_and_stat(scratch, shiftfs_mount):
    src = str(scratch / "src")
    os.mkdir(src, 0o755)
    os.chown(src, 100000, 100000)
    own = (100000, 100000)
    os.setxattr(put(f"{src}/cap3", mode=0o755, owner=own), "security.capability", cap_v3(100000))
    os.setxattr(put(f"{src}/cap3other", mode=0o755, owner=own), "security.capability", cap_v3(300000))
    os.setxattr(put(f"{src}/cap2", mode=0o755, owner=own), "security.capability", cap_v2())
    put(f"{src}/mapped", mode=0o4755, owner=(100005, 100006))
    put(f"{src}/outside", mode=0o755, owner=(500, 500))
    os.mkdir(f"{src}/sub", 0o2775)
    os.chown(f"{src}/sub", 100001, 100002)
    os.chmod(f"{src}/sub", 0o2775)
    os.symlink("../cap2", f"{src}/sub/ln")
    os.chown(f"{src}/sub/ln", 100003, 100003, follow_symlinks=False)

    m = shiftfs_mount("--map", MAP, "-o", "cache=never", source=src)
    mounted = mount_side(m.mountpoint)
    # as a kernel idmapped mount shows it: the table maps its root to view 0
    assert mounted["./cap3"][4]["security.capability"] == cap_v2()
    assert mounted["./cap3other"][4]["security.capability"] == cap_v3(300000)
    assert mounted["./outside"][1:4] == (0o755, OVERFLOW, OVERFLOW)
    assert mounted["./mapped"][1:4] == (0o4755, 5, 6)

    exported = export_side(src, str(scratch / "t.tar"), "--map", MAP)
    stated = stat_side(src, [r for r in mounted if r != "./sub/ln"], "--map", MAP)
    assert_agree(mounted, exported, stated)
