"""Tests for the offline tree tools: import, export, stat, ls, absorb, materialize.

Real files and real tools throughout: GNU tar builds the source archive and
extracts the privileged reference, imports and exports run as an
unprivileged uid through ``setpriv``, and bsdtar and GNU cpio read what we
write.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from archive_util import (
    ACL_UID,
    HAVE_TOOLS,
    IS_ROOT,
    LONG,
    NON_UTF8,
    USER,
    build_rootfs,
    diff_snapshots,
    gnu_tar_create,
    gnu_tar_extract,
    listing,
    run,
    shiftfs,
    snapshot,
    workdir,
)

from shiftfs.ownership import record as _record
from shiftfs.ownership.acl import map_ids

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="builds device nodes and runs setpriv: needs root"),
    pytest.mark.skipif(not HAVE_TOOLS, reason="needs tar, bsdtar, cpio, setcap, setfacl, getfattr, setpriv"),
]


@pytest.fixture(scope="module")
def world():
    """The source tree, its GNU tar, an unprivileged import and its export."""
    w = workdir()
    src = w / "src"
    build_rootfs(src)
    orig = w / "orig.tar"
    gnu_tar_create(src, orig)
    user_dir = w / "user"
    user_dir.mkdir()
    os.chown(user_dir, USER, USER)
    imported = user_dir / "root"
    shiftfs("import", orig, imported, user=USER)
    exported = user_dir / "export.tar"
    shiftfs("export", imported, "-o", exported, user=USER)
    priv = w / "priv"
    gnu_tar_extract(orig, priv)
    yield {"w": w, "src": src, "orig": orig, "imported": imported, "exported": exported, "priv": priv, "user": user_dir}
    shutil.rmtree(w)


# -- import ----------------------------------------------------------------------


def test_import_backing_is_plain_user_files(world):
    """Every backing file is the user's, owner-accessible, no setuid, no devices."""
    base = os.fsencode(world["imported"])
    count = 0
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames + [b"."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            count += 1
            assert (st.st_uid, st.st_gid) == (USER, USER), p
            assert not stat.S_ISCHR(st.st_mode) and not stat.S_ISBLK(st.st_mode), p
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), p
            if stat.S_ISDIR(st.st_mode):
                assert st.st_mode & 0o700 == 0o700, p
            elif stat.S_ISREG(st.st_mode):
                assert st.st_mode & 0o600 == 0o600, p
            # no privileged xattr ever lands on the backing fs under its own name
            if not stat.S_ISLNK(st.st_mode):
                for n in os.listxattr(p, follow_symlinks=False):
                    assert not n.startswith(("security.", "trusted.", "system.posix_acl")), (p, n)
    assert count > 30


def test_import_records(world):
    root = world["imported"]
    assert os.getxattr(root / "usr/bin/su", _record.RECORD_NAME) == b"0:0:104755"
    assert os.getxattr(root / "usr/bin/wall", _record.RECORD_NAME) == b"0:5:102755"
    assert os.getxattr(root / "dev/null", _record.RECORD_NAME) == b"0:0:0666:char-1-3"
    assert os.getxattr(root / "dev/sda1", _record.RECORD_NAME) == b"0:6:0660:block-8-1"
    assert os.getxattr(root / "etc/shadow", _record.RECORD_NAME) == b"0:42:100640"
    assert os.getxattr(root / "var/spool/mail", _record.RECORD_NAME) == b"0:8:42775"
    assert os.getxattr(root, _record.RECORD_NAME) == b"0:0:40755"
    # capabilities and ACLs are kept under escaped names
    cap = os.getxattr(world["priv"] / "usr/bin/ping", "security.capability")
    assert os.getxattr(root / "usr/bin/ping", "user.containers.override_security.capability") == cap
    acl = os.getxattr(world["priv"] / "srv/acl-file", "system.posix_acl_access")
    assert os.getxattr(root / "srv/acl-file", "user.containers.override_system.posix_acl_access") == acl
    assert os.getxattr(root / "etc/passwd", "user.comment") == b"hello"
    # hard links stay hard links, devices are empty placeholders
    assert os.stat(root / "usr/bin/su").st_ino == os.stat(root / "usr/bin/su-link").st_ino
    assert os.getxattr(root / "dev/null-link", _record.RECORD_NAME) == b"0:0:0666:char-1-3"  # GNU tar: no device links
    assert os.stat(root / "dev/null").st_size == 0
    # long, deep, non-ASCII and non-UTF-8 names
    assert (root / "srv" / LONG).read_bytes() == b"long name\n"
    assert os.path.exists(os.fsencode(root) + b"/srv/" + NON_UTF8)
    assert (root / "srv/h\u00e9llo w\u00f6rld \u2603").exists()


def test_import_special_files_records_via_stat(world):
    """Symlinks and FIFOs keep their owners (in the side table)."""
    out = shiftfs(
        "stat", world["imported"] / "usr/lib/su-symlink", world["imported"] / "var/spool/fifo"
    ).stdout.decode()
    assert "Uid: 33 " in out and "Gid: 44" in out
    assert "(0620/prw--w----)" in out and "Uid: 100 " in out and "Gid: 101" in out


# -- export ---------------------------------------------------------------------


def test_export_listing_equals_source(world):
    assert listing(world["exported"]) == listing(world["orig"])


def test_export_verbose_listing_with_xattrs_and_acls_equals_source(world):
    extra = ("--xattrs", "--acls", "-v")
    assert listing(world["exported"], *extra) == listing(world["orig"], *extra)


def test_export_diff_against_privileged_extraction(world):
    proc = run(["tar", "--numeric-owner", "-df", str(world["exported"]), "-C", str(world["priv"])], check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_export_extracts_to_the_same_tree(world):
    """tar -d ignores xattrs: extract our export as root and compare everything."""
    again = world["w"] / "again"
    gnu_tar_extract(world["exported"], again)
    assert diff_snapshots(snapshot(world["priv"]), snapshot(again)) == []


def test_export_read_by_bsdtar(world):
    names = run(["bsdtar", "-tf", str(world["exported"])]).stdout.decode("utf-8", "surrogateescape").split("\n")
    gnu = run(["tar", "-tf", str(world["orig"])]).stdout.decode("utf-8", "surrogateescape").split("\n")
    assert [n.rstrip("/") for n in names] == [n.rstrip("/") for n in gnu]
    dest = world["w"] / "bsd"
    dest.mkdir()
    run(["bsdtar", "--numeric-owner", "--xattrs", "--acls", "-xpf", str(world["exported"]), "-C", str(dest)])
    a = snapshot(world["priv"], dir_mtimes=False)
    b = snapshot(dest, dir_mtimes=False)
    assert diff_snapshots(a, b) == []


def test_export_never_contains_records_or_side_table(world):
    with tarfile.open(world["exported"]) as tf:
        acl = tf.getmember("./srv/acl-file").pax_headers
        assert f"user:{ACL_UID}:rw-" in acl["SCHILY.acl.access"]
        assert "SCHILY.xattr.system.posix_acl_access" in acl
        for m in tf:
            assert ".shiftfs" not in m.name
            for k in m.pax_headers:
                assert "override_stat" not in k and "user.containers" not in k and "fuseoverlayfs" not in k, (m.name, k)


def test_export_stdout_and_compressed(world):
    out = shiftfs("export", world["imported"], user=USER).stdout
    assert out == world["exported"].read_bytes()
    gz = world["user"] / "e.tar.gz"
    shiftfs("export", world["imported"], "-o", gz, user=USER)
    assert gzip.decompress(gz.read_bytes()) == out


def test_export_cpio(world):
    cp = world["user"] / "export.cpio"
    shiftfs("export", world["imported"], "--format", "cpio", "-o", cp, user=USER)
    lst = run(["cpio", "-itv", "--numeric-uid-gid"], input=cp.read_bytes()).stdout.decode("utf-8", "surrogateescape")
    assert " ./usr/bin/su\n" in lst and "-rwsr-xr-x" in lst
    assert "crw-rw-rw-" in lst and "1,   3" in lst
    assert "brw-rw----" in lst and "8,   1" in lst
    assert "./usr/lib/su-symlink -> ../usr/bin/su" in lst
    assert run(["bsdtar", "-tf", str(cp)]).returncode == 0
    dest = world["w"] / "cpio-x"
    dest.mkdir()
    run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=cp.read_bytes(), cwd=dest)
    a = snapshot(world["priv"], xattrs=False, dir_mtimes=False)
    b = snapshot(dest, xattrs=False, dir_mtimes=False)

    # newc keeps whole seconds; GNU cpio does not restore symlink mtimes
    def strip(snap):
        return {
            k: v[:5] + (None if stat.S_ISLNK(v[0]) or v[5] is None else v[5] // 10**9,) + v[6:] for k, v in snap.items()
        }

    assert diff_snapshots(strip(a), strip(b)) == []


# -- stat and ls ------------------------------------------------------------------


def test_stat_and_ls(world):
    root = world["imported"]
    out = shiftfs("stat", root / "usr/bin/su", root / "dev/null", user=USER).stdout.decode()
    assert "(4755/-rwsr-xr-x)" in out and "Record: 0:0:104755" in out
    assert "character special file" in out and "Device: 1,3" in out and "placeholder" in out
    ls = shiftfs("ls", "-l", root / "dev", user=USER).stdout.decode().splitlines()
    byname = {line.split()[-1]: line for line in ls}
    assert byname["null"].startswith("crw-rw-rw-")
    assert "1, 3" in byname["null"]
    assert byname["sda1"].split()[:4] == ["brw-rw----", "1", "0", "6"]
    assert byname["initctl"].startswith("prw-------")
    top = shiftfs("ls", root, user=USER).stdout.decode().split()
    assert ".shiftfs" not in top and "usr" in top


# -- other archive flavours ---------------------------------------------------------


@pytest.mark.parametrize("comp", ["gz", "xz", "zst"])
def test_import_compressed(world, comp):
    data = world["orig"].read_bytes()
    if comp == "gz":
        blob = gzip.compress(data)
    elif comp == "xz":
        blob = lzma.compress(data)
    else:
        if not shutil.which("zstd"):
            pytest.skip("zstd not installed")
        blob = run(["zstd", "-q", "-c"], input=data).stdout
    arc = world["user"] / f"orig.tar.{comp}"
    arc.write_bytes(blob)
    dest = world["user"] / f"from-{comp}"
    shiftfs("import", arc, dest, user=USER)
    out = world["user"] / f"from-{comp}.tar"
    shiftfs("export", dest, "-o", out, user=USER)
    assert listing(out) == listing(world["orig"])


def test_import_from_stdin_and_bsdtar_archive(world):
    bsd = world["w"] / "bsd.tar"
    run(["bsdtar", "--numeric-owner", "--xattrs", "--acls", "-C", str(world["src"]), "-cf", str(bsd), "."])
    dest = world["user"] / "from-bsdtar"
    shiftfs("import", "-", dest, user=USER, input=bsd.read_bytes())
    assert os.getxattr(dest / "usr/bin/ping", "user.containers.override_security.capability") == os.getxattr(
        world["priv"] / "usr/bin/ping", "security.capability"
    )
    # bsdtar's ACL text ("user:NAME:rw-:ID") came through as a real ACL xattr
    acl = os.getxattr(dest / "srv/acl-file", "user.containers.override_system.posix_acl_access")
    assert acl == os.getxattr(world["priv"] / "srv/acl-file", "system.posix_acl_access")
    assert os.getxattr(dest / "dev/sda1", _record.RECORD_NAME) == b"0:6:0660:block-8-1"


def _tar(path: Path, entries) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                tf.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, data
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    path.chmod(0o644)
    return path


def test_oci_layer_whiteouts(world):
    w = world["user"]
    base = _tar(
        w / "base.tar",
        [
            ("etc", "dir", None),
            ("etc/keep", "file", b"k"),
            ("etc/gone", "file", b"g"),
            ("opq", "dir", None),
            ("opq/old1", "file", b"1"),
            ("opq/sub", "dir", None),
            ("opq/sub/x", "file", b"x"),
            ("gonedir", "dir", None),
            ("gonedir/f", "file", b"f"),
        ],
    )
    layer = _tar(
        w / "layer.tar",
        [
            ("etc/.wh.gone", "file", b""),
            (".wh.gonedir", "file", b""),
            ("opq", "dir", None),
            ("opq/new", "file", b"n"),
            ("opq/.wh..wh..opq", "file", b""),
            ("etc/added", "file", b"a"),
            ("nowhere/.wh.x", "file", b""),
        ],
    )
    dest = w / "oci"
    shiftfs("import", base, dest, user=USER)
    shiftfs("import", "--oci-layer", layer, dest, user=USER)
    names = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if ".shiftfs" not in p.parts)
    assert names == ["etc", "etc/added", "etc/keep", "opq", "opq/new"]
    # without --oci-layer whiteouts are ordinary files
    dest2 = w / "oci-plain"
    shiftfs("import", layer, dest2, user=USER)
    assert (dest2 / "etc/.wh.gone").exists()


# -- absorb and materialize -----------------------------------------------------------


@pytest.fixture()
def priv_copy(world):
    dest = world["w"] / f"copy-{os.urandom(4).hex()}"
    build_rootfs(dest, with_socket=True)
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


def test_absorb_then_materialize_is_identity(world, priv_copy):
    before = snapshot(priv_copy)
    shiftfs("absorb", priv_copy, "--owner", f"{USER}:{USER}")
    for p in priv_copy.rglob("*"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (USER, USER), p
        assert not stat.S_ISCHR(st.st_mode) and not stat.S_ISBLK(st.st_mode), p
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), p
    # the absorbed tree exports like the unprivileged import of the same tree
    exp = world["user"] / "absorbed.tar"
    shiftfs("export", priv_copy, "-o", exp, user=USER)
    lst = [line for line in listing(exp).splitlines() if "./srv/sock" not in line]
    assert lst == listing(world["orig"]).splitlines()
    shiftfs("materialize", priv_copy)
    assert not (priv_copy / ".shiftfs").exists()
    assert diff_snapshots(before, snapshot(priv_copy)) == []


def _check_nothing_lost(root: Path, before: dict) -> None:
    """Each inode shows its original owner and mode, or has a record saying so."""
    from shiftfs.offline.walk import open_root, walk
    from shiftfs.ownership.store import RecordStore

    root_fd = open_root(str(root))
    store = RecordStore(root_fd, False)
    try:
        for e in walk(root_fd):
            rel = os.fsencode(e.rel) if e.rel else b"."
            if e.name.startswith(".shiftfs-tmp."):
                continue
            mode, uid, gid, rdev = before[rel][:4]
            raw = store.read(e.fd, e.st)
            if raw is not None:
                rec = _record.decode(raw, stat.S_IFMT(e.st.st_mode))
                assert (rec.uid, rec.gid, rec.mode, rec.rdev) == (uid, gid, mode, rdev), rel
            else:
                st = e.st
                real_rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
                assert (st.st_uid, st.st_gid, st.st_mode, real_rdev) == (uid, gid, mode, rdev), rel
    finally:
        store.close()
        os.close(root_fd)


@pytest.mark.parametrize("kill_at", [1, 5, 17, 40, 77, 85])
def test_interrupted_absorb_and_materialize_finish_on_rerun(priv_copy, kill_at):
    before = snapshot(priv_copy)
    proc = shiftfs("absorb", priv_copy, "--owner", USER, env={"SHIFTFS_TEST_KILL": f"absorb:{kill_at}"}, check=False)
    assert proc.returncode == -9, proc.stderr.decode()
    _check_nothing_lost(priv_copy, before)
    shiftfs("absorb", priv_copy, "--owner", USER)
    _check_nothing_lost(priv_copy, before)
    proc = shiftfs("materialize", priv_copy, env={"SHIFTFS_TEST_KILL": f"materialize:{kill_at}"}, check=False)
    assert proc.returncode == -9, proc.stderr.decode()
    _check_nothing_lost(priv_copy, before)
    shiftfs("materialize", priv_copy)
    assert diff_snapshots(before, snapshot(priv_copy)) == []


def test_absorb_and_export_with_map(world):
    """A subuid-shifted tree (ids + 100000) seen through --map."""
    w = world["w"]
    shifted = w / "shifted"
    build_rootfs(shifted)
    seen = set()
    for dirpath, dirnames, filenames in os.walk(shifted):
        for n in dirnames + filenames + (["."] if dirpath == str(shifted) else []):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if (st.st_dev, st.st_ino) in seen:
                continue  # a hard link already shifted
            seen.add((st.st_dev, st.st_ino))
            mode = st.st_mode
            os.chown(p, st.st_uid + 100000, st.st_gid + 100000, follow_symlinks=False)
            if not stat.S_ISLNK(mode):
                os.chmod(p, stat.S_IMODE(mode))  # chown dropped setuid bits
                for acl in ("system.posix_acl_access", "system.posix_acl_default"):
                    if acl in os.listxattr(p):
                        value = map_ids(os.getxattr(p, acl), lambda i: i + 100000, lambda i: i + 100000)
                        os.setxattr(p, acl, value)
    before = snapshot(shifted)
    # table mode: export through the map shows the unshifted ids
    exp = w / "shifted.tar"
    shiftfs("export", shifted, "--map", "b:100000:0:65536", "-o", exp)
    assert listing(exp) == listing(world["orig"])
    # absorb through the map: records hold the unshifted ids
    shiftfs("absorb", shifted, "--map", "b:100000:0:65536", "--owner", USER)
    assert os.getxattr(shifted / "usr/bin/su", _record.RECORD_NAME) == b"0:0:104755"
    exp2 = world["user"] / "shifted-absorbed.tar"
    shiftfs("export", shifted, "-o", exp2, user=USER)
    assert listing(exp2) == listing(world["orig"])
    shiftfs("materialize", shifted, "--map", "b:100000:0:65536")
    assert diff_snapshots(before, snapshot(shifted)) == []
    shutil.rmtree(shifted)


# -- bad input -------------------------------------------------------------------------


def _fails(proc, status: int, *words: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == status, (proc.returncode, err)
    # (root on a user's tree first says whose records it believes: issue 24)
    first = [ln for ln in err.strip().splitlines() if "believing the records of" not in ln][0]
    for word in words:
        assert word in first, (word, first)
    assert "Traceback" not in err
    return first


def test_bad_inputs(world):
    w = world["user"]
    _fails(shiftfs("export", w / "missing", "-o", w / "x.tar", check=False), 1, "missing", "no such directory")
    _fails(shiftfs("export", world["imported"], "--map", "u:1:2", check=False), 2, "u:1:2")
    _fails(shiftfs("export", world["imported"], "--format", "zip", check=False), 2, "zip")
    _fails(shiftfs("import", w / "missing.tar", w / "r1", check=False), 2, "missing.tar", "no such archive")
    junk = w / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 100)
    _fails(shiftfs("import", junk, w / "r2", check=False), 1, "junk.tar", "not a tar")
    _fails(shiftfs("import", world["orig"], w / "no/such/parent", check=False), 2, "parent")
    _fails(shiftfs("absorb", world["imported"], "--owner", USER, user=USER, check=False), 1, "root")
    _fails(shiftfs("absorb", world["imported"], check=False), 2, "--owner")
    _fails(shiftfs("absorb", world["imported"], "--owner", "no-such-user-xyz", check=False), 2, "no-such-user-xyz")
    _fails(shiftfs("stat", w / "nothing-here", check=False), 1, "nothing-here")


def test_hostile_archive_stays_inside_root(world):
    w = world["user"]
    outside = w / "outside"
    outside.mkdir()
    evil = _tar(
        w / "evil.tar",
        [
            ("../escape", "file", b"x"),
            ("/abs-file", "file", b"abs"),
            ("link", "sym", str(outside)),
            ("link/through-symlink", "file", b"y"),
            ("hl", "link", "../../etc/passwd"),
            ("dangling", "link", "not-there"),
            (".shiftfs/records.db", "file", b"forged"),
            ("ok", "file", b"fine"),
        ],
    )
    dest = w / "evil-root"
    proc = shiftfs("import", evil, dest, user=USER, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "'../escape'" in err and "'..'" in err
    assert "link/through-symlink" in err and "refusing to follow" in err
    assert "dangling" in err and "not in ROOT" in err
    assert list(outside.iterdir()) == []
    assert not (w / "escape").exists()
    assert (dest / "abs-file").read_bytes() == b"abs"
    assert (dest / "ok").read_bytes() == b"fine"
    assert not (dest / ".shiftfs" / "records.db").exists() or (dest / ".shiftfs/records.db").read_bytes() != b"forged"


def test_import_over_a_tree_whose_etc_is_a_symlink(world):
    """Importing over a tree where ``etc`` is a symlink (to outside ROOT) replaces the link
    with the archive's directory, its own record included, writes nothing through the
    link, and exits 0 (it said "./etc: No such file or directory" and exited 1)."""
    w = world["user"]
    outside = w / "etc-outside"
    outside.mkdir()
    os.chown(outside, USER, USER)
    dest = w / "etc-link-root"
    shiftfs("import", _tar(w / "first.tar", [("./usr", "dir", None)]), dest, user=USER)
    os.symlink(str(outside), dest / "etc")
    os.lchown(dest / "etc", USER, USER)
    tar = _tar(w / "etc.tar", [("./", "dir", None), ("./etc/", "dir", None), ("./etc/hostname", "file", b"h\n")])
    proc = shiftfs("import", tar, dest, user=USER, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr.decode().strip() == "", proc.stderr.decode()
    assert list(outside.iterdir()) == []
    assert (dest / "etc").is_dir() and not (dest / "etc").is_symlink()
    assert (dest / "etc/hostname").read_bytes() == b"h\n"
    assert os.getxattr(dest / "etc", _record.RECORD_NAME) == b"0:0:40755"
    assert os.stat(dest / "etc").st_mtime == 1_700_000_000


def test_archive_xattrs_cannot_forge_records(world):
    w = world["user"]
    path = w / "forge.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.uid = 1234
        ti.mode = 0o644
        ti.pax_headers = {
            "SCHILY.xattr." + _record.RECORD_NAME: "0:0:104755",
            "SCHILY.xattr." + _record.LEGACY_RECORD_NAME: "0:0:104755",
        }
        tf.addfile(ti, io.BytesIO(b""))
    path.chmod(0o644)
    dest = w / "forge"
    shiftfs("import", path, dest, user=USER)
    assert os.getxattr(dest / "f", _record.RECORD_NAME) == b"1234:0:100644"
    assert _record.LEGACY_RECORD_NAME not in os.listxattr(dest / "f")
    out = dest.parent / "forge-out.tar"
    shiftfs("export", dest, "-o", out, user=USER)
    with tarfile.open(out) as tf:
        m = tf.getmember("./f")
        assert (m.uid, m.mode) == (1234, 0o644)
        assert m.pax_headers.get("SCHILY.xattr." + _record.RECORD_NAME) == "0:0:104755"


def test_malformed_record_is_reported_by_path(world):
    w = world["user"]
    dest = w / "malformed"
    shiftfs("import", world["orig"], dest, user=USER)
    os.setxattr(dest / "etc/passwd", _record.RECORD_NAME, b"0:0:99x")
    proc = shiftfs("export", dest, "-o", w / "m.tar", user=USER, check=False)
    _fails(proc, 1, "etc/passwd", "octal")


# -- interoperability -------------------------------------------------------------------


@pytest.mark.skipif(
    not shutil.which("fuse-overlayfs") or not os.path.exists("/dev/fuse"), reason="needs fuse-overlayfs"
)
def test_fuse_overlayfs_reads_our_records(world):
    """fuse-overlayfs (Debian 12 ships 1.10: legacy name only) shows the view."""
    w = world["user"]
    lower = w / "fo-lower"
    shiftfs("import", "--legacy-xattr", world["orig"], lower, user=USER)
    assert os.getxattr(lower / "usr/bin/su", _record.LEGACY_RECORD_NAME) == b"0:0:104755"
    mnt, up, work = w / "fo-mnt", w / "fo-up", w / "fo-work"
    for d in (mnt, up, work):
        d.mkdir()
    run(["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={up},workdir={work}", str(mnt)])
    try:
        for rel in ("usr/bin/su", "usr/bin/wall", "etc/shadow", "var/spool/mail", "srv/setgid", "tmp", "home/u"):
            st, ref = os.lstat(mnt / rel), os.lstat(world["priv"] / rel)
            assert (st.st_uid, st.st_gid, st.st_mode) == (ref.st_uid, ref.st_gid, ref.st_mode), rel
        # devices degrade to regular files with the device's permissions
        st = os.lstat(mnt / "dev/null")
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
    finally:
        run(["fusermount3", "-u", str(mnt)], check=False)


def test_other_filesystems_are_never_touched(world):
    tree = world["w"] / "with-mount"
    (tree / "proc").mkdir(parents=True)
    (tree / "f").write_bytes(b"f")
    run(["mount", "-t", "tmpfs", "none", str(tree / "proc")])
    try:
        (tree / "proc/x").write_bytes(b"x")
        _fails(shiftfs("absorb", tree, "--owner", USER, check=False), 1, "proc", "another filesystem")
        assert os.lstat(tree / "proc/x").st_uid == 0
        assert os.lstat(tree / "f").st_uid == USER
        proc = shiftfs("export", tree, "-o", world["user"] / "with-mount.tar", check=False)
        _fails(proc, 1, "proc", "another filesystem")
        assert "./proc" not in listing(world["user"] / "with-mount.tar")
        _fails(shiftfs("absorb", "/", "--owner", USER, check=False), 2, "refusing", "/")
    finally:
        run(["umount", str(tree / "proc")])
    shiftfs("materialize", tree)
    assert os.lstat(tree / "f").st_uid == 0
