"""The offline tools trust the way the mount does (issue 24, item 5).

A record (``user.containers.override_stat``) says who owns a file in the view
and whether it is setuid, so it may count only where the mount would count
it: on an inode of the trusted user. "mallory" plants ``0:0:104755`` on
files of her own; "alice" points ``shiftfs export``/``stat``/``ls``/``import``
at them, and root runs ``absorb`` over them. None may turn them into
setuid-root entries. Root reading a user's tree says in one line whose
records it believes. Beside them: ``-o allow_shared_source`` leaves the mode
of the SOURCE it serves alone, and a note directory (``/tmp/shiftfs-UID``)
made by someone else is named, with its owner and the fix, in the refusal it
causes.

Everything goes through the CLI, real mounts and real users.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import subprocess
import tarfile

import pytest
from asuser import py_as, run_as
from fsutil import SHIFTFS, mount_shiftfs, wait_for
from ns_util import HOST_USR, make_host_root, remove_tree, run_argv, users_fixture
from records import RECORD

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates test users: run as root")

OVERFLOW = 65534
FORGED = b"0:0:104755"


users = users_fixture(0, 2)


def cli_as(user, *args, check=False, timeout=120):
    """``shiftfs ARGS`` as ``user`` (setpriv, no capabilities)."""
    return run_as(user.uid, user.gid, [SHIFTFS, *args], check=check, cwd="/", timeout=timeout)


def cli_root(*args):
    return subprocess.run([SHIFTFS, *args], capture_output=True, text=True, timeout=120, cwd="/")


def own_dir(path: str, user, mode: int = 0o755) -> str:
    os.mkdir(path)
    os.chown(path, user.uid, user.gid)
    os.chmod(path, mode)
    return path


def mallory_tree(wd: str, mallory, mode: int = 0o755) -> str:
    """mallory's directory: an executable ``su`` and a subdirectory, each with a forged record
    she wrote herself, and a forged record on the directory itself."""
    tree = own_dir(os.path.join(wd, "mallory"), mallory, mode)
    r = py_as(
        mallory.uid,
        mallory.gid,
        f"""
t = {tree!r}
with open(t + "/su", "wb") as f:
    f.write(open("/bin/true", "rb").read())
os.chmod(t + "/su", 0o755)
os.mkdir(t + "/sub", 0o755)
for p, v in ((t + "/su", {FORGED!r}), (t + "/sub", b"0:0:46755"), (t, b"0:0:41777")):
    os.setxattr(p, {RECORD!r}, v)
return "planted"
""",
    )
    assert r == {"ok": "planted"}, r
    return tree


def tar_entries(path: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return {m.name.removeprefix("./") or ".": m for m in tf}


def assert_not_forged(uid: int, gid: int, mode: int, what: str) -> None:
    assert (uid, gid) == (OVERFLOW, OVERFLOW), f"{what} shows as {uid}:{gid}"
    assert not mode & 0o6000, f"{what} shows mode {mode:o}"


def stat_fields(out: str) -> tuple[int, int, str]:
    """(uid, gid, mode text) from ``shiftfs stat`` output."""
    line = next(ln for ln in out.splitlines() if ln.startswith("Access:"))
    words = line.replace("(", " ").replace(")", " ").replace("/", " ").split()
    return int(words[words.index("Uid:") + 1]), int(words[words.index("Gid:") + 1]), words[2]


# -- a user's tools on another user's directory ----------------------------------------


def test_export_by_a_user_believes_only_her_own_inodes(users, wd):
    alice, mallory = users
    tree = mallory_tree(wd, mallory)
    out = own_dir(os.path.join(wd, "alice"), alice)
    tar = os.path.join(out, "x.tar")
    r = cli_as(alice, "export", tree, "-o", tar)
    assert r.returncode == 0, r.stderr
    ents = tar_entries(tar)
    for rel in (".", "su", "sub"):
        m = ents[rel]
        assert_not_forged(m.uid, m.gid, m.mode, f"export: {rel}")
    assert not [n for n, m in ents.items() if m.mode & 0o4000], "a setuid entry was exported"
    # One line says why: whose directory it is and how to read its records.
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and tree in lines[0] and f"uid {mallory.uid}" in lines[0], r.stderr


def test_export_cpio_by_a_user(users, wd):
    alice, mallory = users
    tree = mallory_tree(wd, mallory)
    out = own_dir(os.path.join(wd, "alice"), alice)
    cpio = os.path.join(out, "x.cpio")
    cli_as(alice, "export", "--format", "cpio", tree, "-o", cpio, check=True)
    r = subprocess.run(["cpio", "-itv", "--numeric-uid-gid"], stdin=open(cpio, "rb"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    su = next(ln for ln in r.stdout.splitlines() if ln.split()[-1] in ("su", "./su"))
    mode, _, uid, gid = su.split()[:4]
    assert (int(uid), int(gid)) == (OVERFLOW, OVERFLOW) and "s" not in mode, su


def test_stat_judges_by_the_file_not_its_parent(users, wd):
    alice, mallory = users
    tree = mallory_tree(wd, mallory)
    r = cli_as(alice, "stat", f"{tree}/su", f"{tree}/sub")
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("\n\n")
    assert len(blocks) == 2, r.stdout
    for block in blocks:
        uid, gid, text = stat_fields(block)
        assert (uid, gid) == (OVERFLOW, OVERFLOW) and "s" not in text and "S" not in text, block
    # One line per tree says why (a directory given alone is its own tree).
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(f"uid {mallory.uid}" in ln for ln in lines), r.stderr
    r = cli_as(alice, "stat", f"{tree}/su", f"{tree}/su")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # --root naming mallory's directory changes nothing: alice still believes only herself.
    r = cli_as(alice, "stat", "--root", tree, f"{tree}/su")
    uid, gid, text = stat_fields(r.stdout)
    assert (uid, gid) == (OVERFLOW, OVERFLOW) and "s" not in text, r.stdout


def test_ls_believes_only_the_users_own_inodes(users, wd):
    alice, mallory = users
    tree = mallory_tree(wd, mallory)
    r = cli_as(alice, "ls", "-l", tree)
    assert r.returncode == 0, r.stderr
    for name in ("su", "sub"):
        line = next(ln for ln in r.stdout.splitlines() if ln.endswith(" " + name))
        mode, _, uid, gid = line.split()[:4]
        assert_not_forged(int(uid), int(gid), 0o4000 if "s" in mode or "S" in mode else 0, f"ls: {line}")
    assert len(r.stderr.strip().splitlines()) == 1 and f"uid {mallory.uid}" in r.stderr, r.stderr


def test_side_table_of_another_users_tree_is_not_read(users, wd):
    """mallory's tree with a side table: alice's tools read none of it (and do not refuse)."""
    alice, mallory = users
    tree = mallory_tree(wd, mallory)
    tar = os.path.join(wd, "t.tar")
    with tarfile.open(tar, "w") as tf:
        ti = tarfile.TarInfo("link")
        ti.type, ti.linkname, ti.uid, ti.gid, ti.mode = tarfile.SYMTYPE, "su", 0, 0, 0o777
        tf.addfile(ti)
    os.chmod(tar, 0o644)
    cli_as(mallory, "import", tar, tree, check=True)
    # readable by all (still written by mallory alone, as the side-table check wants)
    run_as(mallory.uid, mallory.gid, f"chmod 755 {tree}/.shiftfs && chmod 644 {tree}/.shiftfs/records.db", check=True)
    r = cli_as(alice, "ls", "-l", tree)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if " link -> " in ln)
    assert line.split()[2:4] == [str(OVERFLOW), str(OVERFLOW)], line


# -- import ---------------------------------------------------------------------------


def _tar_without_root(path: str) -> str:
    """An archive with no entry for the root: the importer keeps what ROOT carries."""
    with tarfile.open(path, "w") as tf:
        ti = tarfile.TarInfo("etc")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(ti)
        data = b"hello\n"
        ti = tarfile.TarInfo("etc/motd")
        ti.size, ti.mode = len(data), 0o644
        tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("sub")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(ti)
        ti = tarfile.TarInfo("sub/f")
        ti.size, ti.mode = len(data), 0o644
        tf.addfile(ti, io.BytesIO(data))
    os.chmod(path, 0o644)
    return path


def test_import_into_another_users_directory_is_refused(users, wd):
    """mallory's world-writable directory with her record on it: alice's import would keep that
    record for the tree's root and fill mallory's directories; it is refused instead."""
    alice, mallory = users
    tree = mallory_tree(wd, mallory, mode=0o777)
    tar = _tar_without_root(os.path.join(wd, "t.tar"))
    r = cli_as(alice, "import", tar, tree)
    assert r.returncode != 0, f"imported into mallory's directory: {r.stderr}"
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and tree in msg and f"uid {mallory.uid}" in msg, msg
    assert not os.path.exists(f"{tree}/etc") and not os.path.exists(f"{tree}/sub/f")


def test_import_never_fills_another_users_directory(users, wd):
    """alice's tree with a world-writable directory (as older versions left a view /tmp), in
    which mallory made a directory with a forged record: the import does not keep it."""
    alice, mallory = users
    root = own_dir(os.path.join(wd, "alice"), alice)
    own_dir(f"{root}/pub", alice, 0o777)
    r = py_as(
        mallory.uid,
        mallory.gid,
        f"""
os.mkdir({root!r} + "/pub/sub", 0o777)
os.chmod({root!r} + "/pub/sub", 0o777)
os.setxattr({root!r} + "/pub/sub", {RECORD!r}, b"0:0:46777")
""",
    )
    assert "ok" in r, r
    tar = os.path.join(wd, "t.tar")
    with tarfile.open(tar, "w") as tf:
        for name in ("pub", "pub/sub"):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        ti = tarfile.TarInfo("pub/sub/f")
        ti.size, ti.mode = 2, 0o644
        tf.addfile(ti, io.BytesIO(b"x\n"))
    os.chmod(tar, 0o644)
    r = cli_as(alice, "import", tar, root)
    assert r.returncode == 1, r
    assert not os.path.exists(f"{root}/pub/sub/f"), "alice's file went into mallory's directory"
    assert "pub/sub" in r.stderr and f"uid {mallory.uid}" in r.stderr, r.stderr
    assert os.getxattr(f"{root}/pub/sub", RECORD) == b"0:0:46777"  # not re-recorded by alice either


# -- root ------------------------------------------------------------------------------


def test_root_says_whose_records_it_believes(users, wd):
    alice, mallory = users
    tree = mallory_tree(wd, mallory)
    tar = os.path.join(wd, "root.tar")
    r = cli_root("export", tree, "-o", tar)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"uid {mallory.uid}" in lines[0] and tree in lines[0], r.stderr
    # (what it believes: mallory's records on mallory's inodes, as mallory's own export would)
    assert tar_entries(tar)["su"].mode & 0o4000
    for args in (["stat", f"{tree}/su"], ["ls", "-l", tree]):
        r = cli_root(*args)
        assert r.returncode == 0, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"uid {mallory.uid}" in lines[0], (args, r.stderr)
    # Root's own tree: nothing to say.
    mine = os.path.join(wd, "root-owned")
    os.mkdir(mine, 0o755)
    shutil.copy("/bin/true", f"{mine}/t")
    r = cli_root("export", mine, "-o", os.path.join(wd, "mine.tar"))
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    r = cli_root("ls", "-l", mine)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_import_by_root_into_a_users_directory_is_refused(users, wd):
    alice, _ = users
    root = own_dir(os.path.join(wd, "alice"), alice)
    tar = _tar_without_root(os.path.join(wd, "t.tar"))
    r = cli_root("import", tar, root)
    assert r.returncode != 0 and f"uid {alice.uid}" in r.stderr and root in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert os.listdir(root) == []


def test_absorb_believes_records_only_on_the_owners_inodes(users, wd):
    """A real-ownership tree holding mallory's file with her forged record: absorb takes the
    real owner, not the record, for every inode not already the new owner's."""
    alice, mallory = users
    tree = os.path.join(wd, "img")
    os.mkdir(tree, 0o755)
    os.mkdir(f"{tree}/home", 0o755)
    home = own_dir(f"{tree}/home/mallory", mallory)
    r = py_as(
        mallory.uid,
        mallory.gid,
        f"""
with open({home!r} + "/su", "wb") as f:
    f.write(b"x")
os.chmod({home!r} + "/su", 0o755)
os.setxattr({home!r} + "/su", {RECORD!r}, {FORGED!r})
""",
    )
    assert "ok" in r, r
    # alice's own file with her own record: hers to say (absorb hands the tree to her)
    with open(f"{tree}/mine", "wb") as f:
        f.write(b"y")
    os.chown(f"{tree}/mine", alice.uid, alice.gid)
    os.setxattr(f"{tree}/mine", RECORD, b"0:0:100644")
    # alice's file that anyone may write, where mallory wrote a setuid record
    with open(f"{tree}/open", "wb") as f:
        f.write(b"z")
    os.chown(f"{tree}/open", alice.uid, alice.gid)
    os.chmod(f"{tree}/open", 0o777)
    assert "ok" in py_as(mallory.uid, mallory.gid, f"os.setxattr({tree!r} + '/open', {RECORD!r}, {FORGED!r})")
    r = cli_root("absorb", "--owner", f"{alice.uid}:{alice.gid}", tree)
    assert r.returncode == 0, r.stderr
    got = os.getxattr(f"{home}/su", RECORD)
    assert got == f"{mallory.uid}:{mallory.gid}:100755".encode(), got
    assert os.getxattr(f"{tree}/mine", RECORD) == b"0:0:100644"
    assert os.getxattr(f"{tree}/open", RECORD) == b"0:0:100755"  # without setuid
    assert os.lstat(f"{home}/su").st_uid == alice.uid


def test_materialize_refuses_a_record_a_mount_would_not_believe(users, wd):
    """mallory's file in alice's tree with her forged record: materialize would make it a real
    setuid-root file; it refuses before changing anything."""
    alice, mallory = users
    os.chown(wd, alice.uid, alice.gid)
    tar = os.path.join(wd, "t.tar")
    with tarfile.open(tar, "w") as tf:
        ti = tarfile.TarInfo("pub")
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(ti)
    os.chmod(tar, 0o644)
    tree = os.path.join(wd, "tree")
    cli_as(alice, "import", tar, tree, check=True)
    su = f"{tree}/pub/su"
    shutil.copy("/bin/true", su)
    os.chown(su, mallory.uid, mallory.gid)  # hers, however it got there (a hard link of her own file)
    os.chmod(su, 0o755)
    os.setxattr(su, RECORD, FORGED)  # (written here by root: mallory may write it on her own file)
    r = cli_root("materialize", tree)
    assert r.returncode == 1, r
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "pub/su" in msg and f"uid {mallory.uid}" in msg, msg
    st = os.lstat(su)
    assert st.st_uid == mallory.uid and not st.st_mode & 0o6000, st
    assert os.lstat(tree).st_uid == alice.uid and os.getxattr(tree, RECORD)  # nothing changed
    # Planted between an interrupted run and its rerun: refused too.
    os.unlink(su)
    r = subprocess.run(
        [SHIFTFS, "materialize", tree], env={**os.environ, "SHIFTFS_TEST_KILL": "materialize:1"}, capture_output=True
    )
    assert r.returncode == -9, r
    assert os.lstat(tree).st_uid == 0  # the root was done first, its record not yet removed
    shutil.copy("/bin/true", su)
    os.chown(su, mallory.uid, mallory.gid)
    os.chmod(su, 0o755)
    os.setxattr(su, RECORD, FORGED)
    r = cli_root("materialize", tree)
    assert r.returncode == 1 and "pub/su" in r.stderr, r
    assert not os.lstat(su).st_mode & 0o6000
    # Without it the rerun finishes the job.
    os.unlink(su)
    r = cli_root("materialize", tree)
    assert r.returncode == 0, r.stderr
    assert (os.lstat(f"{tree}/pub").st_uid, os.listxattr(tree)) == (0, [])


# -- allow_shared_source ------------------------------------------------------------------


def test_allow_shared_source_keeps_the_mode_of_source(users, wd):
    alice, mallory = users
    src = own_dir(os.path.join(wd, "shared"), alice, 0o777)
    mp = own_dir(os.path.join(wd, "mnt"), alice)
    os.chmod(wd, 0o755)
    with mount_shiftfs(src, mp, "--xattr", "-o", "allow_shared_source", as_uid=alice.uid, as_gid=alice.gid):
        assert stat.S_IMODE(os.stat(src).st_mode) == 0o777, oct(os.stat(src).st_mode)
        # Still shared: mallory can add a file, and it shows as hers would through any mount
        # of alice's: the overflow id (a record she wrote on it is not believed).
        r = run_as(mallory.uid, mallory.gid, f"cp /bin/true {src}/dropped && chmod 4755 {src}/dropped")
        assert r.returncode == 0, r.stderr
        py_as(mallory.uid, mallory.gid, f"os.setxattr({src!r} + '/dropped', {RECORD!r}, {FORGED!r})")
        r = py_as(alice.uid, alice.gid, f"st = os.lstat({mp!r} + '/dropped'); return [st.st_uid, st.st_mode]")
        uid, mode = r["ok"]
        assert uid == OVERFLOW and not mode & 0o6000, r
    assert stat.S_IMODE(os.stat(src).st_mode) == 0o777


# -- a squatted note directory -------------------------------------------------------------


def test_squatted_note_directory_is_named(users, wd):
    alice, mallory = users
    note_dir = f"/tmp/shiftfs-{alice.uid}"
    if os.path.lexists(note_dir):
        remove_tree(note_dir)  # left by an earlier user of this uid
    try:
        run_as(mallory.uid, mallory.gid, ["mkdir", "-m", "0700", note_dir], check=True)
        src = own_dir(os.path.join(wd, "src"), alice, 0o700)
        mp, mp2 = own_dir(os.path.join(wd, "mnt"), alice), own_dir(os.path.join(wd, "mnt2"), alice)
        with mount_shiftfs(src, mp, as_uid=alice.uid, as_gid=alice.gid) as m:
            r = cli_as(alice, "mount", "-o", "backend=fuse", src, mp2)
            assert r.returncode != 0, "a second daemon mounted the same SOURCE"
            msg = r.stderr.strip()
            assert len(msg.splitlines()) == 1, msg
            assert note_dir in msg and f"uid {mallory.uid}" in msg and f"rm -rf {note_dir}" in msg, msg
            assert note_dir in m.log_text()
    finally:
        remove_tree(note_dir)


def test_squatted_note_directory_is_named_when_it_stops_a_join(users, wd):
    """Without its note the first run's container cannot be joined: the refusal says why."""
    alice, mallory = users
    note_dir = f"/tmp/shiftfs-{alice.uid}"
    if os.path.lexists(note_dir):
        remove_tree(note_dir)
    root = make_host_root(os.path.join(wd, "root"), alice)
    os.chmod(root, 0o700)
    argv = alice.wrap([*run_argv(), *HOST_USR, root, "--", "sh", "-c"])
    first = None
    try:
        run_as(mallory.uid, mallory.gid, ["mkdir", "-m", "0700", note_dir], check=True)
        first = subprocess.Popen(
            [*argv, "touch /ready; exec sleep 600"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=wd,
            start_new_session=True,
        )
        wait_for(lambda: os.path.exists(os.path.join(root, "ready")), timeout=30, what="the first run to start")
        r = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=60, cwd=wd)
        assert r.returncode == 125, r
        msg = r.stderr.strip()
        assert len(msg.splitlines()) == 1, msg
        assert note_dir in msg and f"uid {mallory.uid}" in msg and f"rm -rf {note_dir}" in msg, msg
    finally:
        if first is not None:
            first.terminate()  # runuser and shiftfs run pass it on to the command
            try:
                first.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(first.pid, signal.SIGKILL)  # (shiftfs run's parent-death chain does the rest)
                first.wait()
        remove_tree(note_dir)
