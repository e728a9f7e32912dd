"""Xattr mode trusts only what its own user wrote (issue 14).

A second host user ("mallory") tries to plant a record in the tree of a first
one ("builder") through every path we know, before builder's next mount,
``shiftfs exec``/``run`` and ``shiftfs export``:

* a file with a forged record in a world-writable backing directory (the
  sticky view ``/tmp`` that older versions stored 0777 on disk);
* a hard link to a file mallory owns (with a record), and a hard link to
  builder's own setuid file (the kernel's protected_hardlinks refuses it);
* a symlink swapped in for builder's file;
* a file and a directory renamed in from outside the tree;
* the side table ``.shiftfs/records.db`` and its ``-wal``/``-shm``, planted
  while SOURCE was shared.

None of them may show as setuid root or as owned by a view id: inodes owned
by someone else show as the overflow id without setuid/setgid. And SOURCE
itself is checked: a path another user can write into is refused.

Everything goes through the CLI, real mounts and real users.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import time

import pytest
from asuser import py_as, run_as
from fsutil import SHIFTFS, mount_shiftfs
from ns_util import HOST_USR, make_host_root, remove_tree, users_fixture
from records import RECORD

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates test users: run as root")

OVERFLOW = 65534
FORGED = b"0:0:104755"


users = users_fixture(1, 1)


def cli_as(user, *args, check=False, cwd="/", timeout=120):
    """``shiftfs ARGS`` as ``user`` (setpriv, no capabilities)."""
    return run_as(user.uid, user.gid, [SHIFTFS, *args], check=check, cwd=cwd, timeout=timeout)


def setrec(path: str, value: bytes) -> None:
    os.setxattr(path, RECORD, value, follow_symlinks=False)


def _sample_tar(path: str) -> None:
    """The view builder made: /tmp 1777, a setuid root binary, a root-owned symlink and file."""
    with tarfile.open(path, "w") as tf:

        def add(name, kind, mode, data=b"", link=""):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, 0, 0, 1_700_000_000
            ti.linkname = link
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add("opt", tarfile.DIRTYPE, 0o755)
        add("opt/legit", tarfile.REGTYPE, 0o4755, b"#!/bin/sh\n")
        add("tmp", tarfile.DIRTYPE, 0o1777)
        add("tmp/legit", tarfile.REGTYPE, 0o644, b"builder's\n")
        add("link", tarfile.SYMTYPE, 0o777, link="opt/legit")


def imported_sample(wd: str, builder) -> str:
    """The sample tar, imported by builder into ``wd/src`` (``wd`` builder's)."""
    os.chown(wd, builder.uid, builder.gid)
    tar = os.path.join(wd, "sample.tar")
    _sample_tar(tar)
    os.chmod(tar, 0o644)
    src = os.path.join(wd, "src")
    cli_as(builder, "import", tar, src, check=True)
    return src


def builder_tree(wd: str, builder) -> str:
    """builder's SOURCE as an older shiftfs left it: the sticky /tmp 0777 on disk."""
    src = imported_sample(wd, builder)
    os.chmod(src, 0o755)
    # What an older version stored for a 1777 view directory.
    run_as(builder.uid, builder.gid, ["chmod", "0777", f"{src}/tmp"], check=True)
    return src


def plant(wd: str, src: str, mallory) -> dict[str, str]:
    """mallory's attacks on builder's tree; returns what each one did."""
    outside = os.path.join(wd, "mallory")
    os.mkdir(outside)
    os.chown(outside, mallory.uid, mallory.gid)
    code = f"""
src, out = {src!r}, {outside!r}
res = {{}}
def rec(p):
    os.setxattr(p, {RECORD!r}, {FORGED!r}, follow_symlinks=False)
# 1. a file with a forged record in the world-writable /tmp
with open(src + "/tmp/forged", "wb") as f:
    f.write(open("/bin/true", "rb").read())
os.chmod(src + "/tmp/forged", 0o755)
rec(src + "/tmp/forged")
res["forged"] = "planted"
# 2a. a hard link to a file mallory owns, which carries a forged record
with open(out + "/own", "wb") as f:
    f.write(b"x")
rec(out + "/own")
os.link(out + "/own", src + "/tmp/hardlink")
res["hardlink"] = "planted"
# 2b. a hard link to builder's setuid binary
try:
    os.link(src + "/opt/legit", src + "/tmp/stolen")
    res["stolen"] = "linked"
except OSError as e:
    res["stolen"] = errno.errorcode[e.errno]
# 3. swap builder's file for a symlink to a host setuid binary
os.rename(src + "/tmp/legit", src + "/tmp/legit.old")
os.symlink("/usr/bin/passwd", src + "/tmp/legit")
res["symlink"] = "swapped"
# 4. a file and a directory (with a setuid file inside) renamed in from outside
with open(out + "/evil", "wb") as f:
    f.write(b"x")
rec(out + "/evil")
os.mkdir(out + "/evildir")
os.setxattr(out + "/evildir", {RECORD!r}, b"0:0:46777")
with open(out + "/evildir/x", "wb") as f:
    f.write(b"x")
rec(out + "/evildir/x")
os.rename(out + "/evil", src + "/tmp/evil")
os.rename(out + "/evildir", src + "/tmp/evildir")
res["renamed"] = "moved in"
# 5. records on builder's own files are out of reach (not writable by mallory)
try:
    rec(src + "/opt")
    res["builder-dir"] = "set"
except OSError as e:
    res["builder-dir"] = errno.errorcode[e.errno]
return res
"""
    r = py_as(mallory.uid, mallory.gid, code)
    assert "ok" in r, r
    return r["ok"]


PLANTED = ["tmp/forged", "tmp/hardlink", "tmp/legit", "tmp/evil", "tmp/evildir", "tmp/evildir/x"]


def view_of(user, root: str, rels: list[str]) -> dict:
    """lstat through a mount, as ``user``: rel -> (mode, uid, gid)."""
    code = f"""
out = {{}}
for rel in {rels!r}:
    st = os.lstat({root!r} + "/" + rel)
    out[rel] = [st.st_mode, st.st_uid, st.st_gid]
return out
"""
    r = py_as(user.uid, user.gid, code)
    assert "ok" in r, r
    return {k: tuple(v) for k, v in r["ok"].items()}


def assert_not_forged(views: dict, who: str) -> None:
    for rel in PLANTED:
        mode, uid, gid = views[rel]
        assert (uid, gid) == (OVERFLOW, OVERFLOW), f"{who}: {rel} shows as {uid}:{gid}"
        assert not mode & (stat.S_ISUID | stat.S_ISGID), f"{who}: {rel} shows mode {mode:o}"


def tar_entries(path: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return {m.name.removeprefix("./"): m for m in tf}


def assert_export_clean(tar: str, who: str) -> None:
    ents = tar_entries(tar)
    for rel in PLANTED:
        m = ents[rel]
        assert (m.uid, m.gid) == (OVERFLOW, OVERFLOW), f"{who}: {rel} exported as {m.uid}:{m.gid}"
        assert not m.mode & 0o6000, f"{who}: {rel} exported with mode {m.mode:o}"
    setuid_root = sorted(n for n, m in ents.items() if m.mode & 0o4000 and m.uid == 0)
    assert setuid_root == ["opt/legit"], f"{who}: setuid root entries {setuid_root}"
    assert ents["tmp"].mode == 0o1777 and ents["tmp"].uid == 0


# -- attacks on a mount -------------------------------------------------------------


def test_planted_records_in_mount_and_export(users, wd):
    builder, mallory = users
    src = builder_tree(wd, builder)
    got = plant(wd, src, mallory)
    assert got["stolen"] == "EPERM"  # protected_hardlinks: not builder's inode under a new name
    assert got["builder-dir"] == "EACCES"
    mp = os.path.join(wd, "mnt")
    os.mkdir(mp)
    os.chown(mp, builder.uid, builder.gid)
    with mount_shiftfs(src, mp, "--xattr", as_uid=builder.uid, as_gid=builder.gid) as m:
        views = view_of(builder, mp, PLANTED + ["tmp", "opt/legit", "link"])
        assert_not_forged(views, "mount")
        # builder's own records still count.
        assert views["tmp"] == (stat.S_IFDIR | 0o1777, 0, 0)
        assert views["opt/legit"] == (stat.S_IFREG | 0o4755, 0, 0)
        assert views["link"][1:] == (0, 0)
        # The view's sticky /tmp is no longer writable by others on disk.
        disk = os.lstat(f"{src}/tmp").st_mode
        assert disk & 0o7022 == 0, f"tmp is {disk:o} on disk"
        # A second look does not log again: once per inode.
        view_of(builder, mp, PLANTED)
        log = m.log_text()
    assert log.count("fixed the backing mode") == 1, log
    assert log.count("tmp/forged") == 1, log
    assert "not believing" in log and "not by uid" in log
    # The export, by builder and by root (who trusts the tree's owner, not itself).
    for who, user in (("builder", builder), ("root", None)):
        tar = os.path.join(wd, f"{who}.tar")
        argv = [SHIFTFS, "export", src, "-o", tar]
        if user is None:
            subprocess.run(argv, check=True, capture_output=True, timeout=120)
        else:
            cli_as(user, "export", src, "-o", tar, check=True)
        assert_export_clean(tar, who)
    # The offline ls and stat say the same.
    out = cli_as(builder, "stat", f"{src}/tmp/forged", check=True).stdout
    assert f"Uid: {OVERFLOW}" in out and "rwsr" not in out, out
    out = cli_as(builder, "ls", "-l", f"{src}/tmp", check=True).stdout
    forged = next(line for line in out.splitlines() if line.endswith(" forged"))
    assert forged.split()[2:4] == [str(OVERFLOW), str(OVERFLOW)] and "s" not in forged.split()[0], out


def test_root_daemon_trusts_root_only(users, wd):
    """A root daemon with --xattr: records count on root's inodes only."""
    _, mallory = users
    src, mp = os.path.join(wd, "src"), os.path.join(wd, "mnt")
    os.mkdir(src, 0o755)
    os.mkdir(mp)
    os.mkdir(f"{src}/tmp")
    os.chmod(f"{src}/tmp", 0o777)  # as an older version left a 1777 view directory
    setrec(f"{src}/tmp", b"0:0:41777")
    r = run_as(mallory.uid, mallory.gid, f"cp /bin/true {src}/tmp/forged && chmod 4755 {src}/tmp/forged")
    assert r.returncode == 0, r.stderr
    py_as(mallory.uid, mallory.gid, f"os.setxattr({src!r} + '/tmp/forged', {RECORD!r}, {FORGED!r})")
    with mount_shiftfs(src, mp, "--xattr") as m:
        st = os.lstat(f"{mp}/tmp/forged")
        assert (st.st_uid, st.st_gid) == (OVERFLOW, OVERFLOW) and not st.st_mode & 0o6000
        st = os.lstat(f"{mp}/tmp")
        assert (st.st_mode, st.st_uid) == (stat.S_IFDIR | 0o1777, 0)
        assert os.lstat(f"{src}/tmp").st_mode & 0o7022 == 0
        assert "not by uid 0" in m.log_text()


def test_side_table_planted_while_shared(users, wd):
    """records.db, -wal and -shm that are not the daemon user's own: the mount refuses."""
    builder, mallory = users
    src = builder_tree(wd, builder)
    store = os.path.join(src, ".shiftfs")
    for name in ("records.db-wal", "records.db-shm", "records.db"):
        run_as(builder.uid, builder.gid, ["chmod", "0777", store], check=True)
        # mallory plants (or replaces) the file while the directory is open to her.
        r = run_as(mallory.uid, mallory.gid, f"cd {store} && rm -f {name} && cp /dev/null {name} && chmod 666 {name}")
        assert r.returncode == 0, r.stderr
        run_as(builder.uid, builder.gid, ["chmod", "0700", store], check=True)
        mp = os.path.join(wd, "mnt")
        os.makedirs(mp, exist_ok=True)
        os.chown(mp, builder.uid, builder.gid)
        r = cli_as(builder, "mount", "--xattr", src, mp)
        assert r.returncode != 0, f"mounted with a planted {name}"
        msg = r.stderr.strip()
        assert len(msg.splitlines()) == 1 and f".shiftfs/{name}" in msg and "owned by" in msg, msg
        # The offline tools refuse it too.
        r = cli_as(builder, "export", src, "-o", os.path.join(wd, "x.tar"))
        assert r.returncode != 0 and f".shiftfs/{name}" in r.stderr, r.stderr
        os.unlink(os.path.join(store, name))
        if name == "records.db":
            break


def test_side_table_dir_open_to_others_is_closed_on_mount(users, wd):
    builder, _ = users
    src = builder_tree(wd, builder)
    run_as(builder.uid, builder.gid, ["chmod", "0777", f"{src}/.shiftfs"], check=True)
    mp = os.path.join(wd, "mnt")
    os.mkdir(mp)
    os.chown(mp, builder.uid, builder.gid)
    with mount_shiftfs(src, mp, "--xattr", as_uid=builder.uid, as_gid=builder.gid):
        assert view_of(builder, mp, ["link"])["link"][1:] == (0, 0)
    assert os.stat(f"{src}/.shiftfs").st_mode & 0o077 == 0


# -- backing modes -------------------------------------------------------------------


def test_backing_modes_never_let_others_in(users, wd):
    builder, _ = users
    os.chown(wd, builder.uid, builder.gid)
    src, mp = os.path.join(wd, "src"), os.path.join(wd, "mnt")
    for d in (src, mp):
        os.mkdir(d, 0o700)
        os.chown(d, builder.uid, builder.gid)
    with mount_shiftfs(src, mp, "--xattr", as_uid=builder.uid, as_gid=builder.gid):
        code = f"""
m = {mp!r}
os.umask(0)
os.mkdir(m + "/sticky", 0o1777)
os.mkdir(m + "/sgid", 0o777)
os.chmod(m + "/sgid", 0o2777)  # (mkdir itself drops S_ISGID)
os.mkdir(m + "/open", 0o777)
os.close(os.open(m + "/suid", os.O_CREAT | os.O_WRONLY, 0o666))
os.chmod(m + "/suid", 0o6777)
os.close(os.open(m + "/gw", os.O_CREAT | os.O_WRONLY, 0o664))
os.mkfifo(m + "/fifo", 0o666)
return {{n: stat.S_IMODE(os.lstat(m + "/" + n).st_mode) for n in os.listdir(m)}}
"""
        r = py_as(builder.uid, builder.gid, code)
        assert r["ok"] == {
            "sticky": 0o1777,
            "sgid": 0o2777,
            "open": 0o777,
            "suid": 0o6777,
            "gw": 0o664,
            "fifo": 0o666,
        }, r
    for name in ("sticky", "sgid", "open", "suid", "gw", "fifo"):
        mode = stat.S_IMODE(os.lstat(os.path.join(src, name)).st_mode)
        assert mode & 0o7022 == 0, f"{name} is {mode:o} on disk"


def test_import_writes_private_backing_modes(users, wd):
    builder, _ = users
    src = imported_sample(wd, builder)
    for dirpath, dirnames, filenames in os.walk(src):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            st = os.lstat(n)
            if not stat.S_ISLNK(st.st_mode):
                assert st.st_mode & 0o7022 == 0, f"{n} is {st.st_mode:o} on disk"


# -- the SOURCE check -------------------------------------------------------------------


def _mount_refused(user, src, mp, *extra):
    r = cli_as(user, "mount", "--xattr", *extra, src, mp)
    if r.returncode == 0:
        subprocess.run([SHIFTFS, "umount", mp], capture_output=True)
        time.sleep(0.2)
    return r


def test_source_under_a_shared_directory_is_refused(users, wd):
    builder, mallory = users
    shared = os.path.join(wd, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)  # world-writable, not sticky: anyone can rename src away
    src, mp = os.path.join(shared, "src"), os.path.join(wd, "mnt")
    for d in (src, mp):
        os.mkdir(d, 0o700)
        os.chown(d, builder.uid, builder.gid)
    r = _mount_refused(builder, src, mp)
    assert r.returncode == 2, r
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and shared in msg and f"chmod go-w {shared}" in msg, msg
    # Asked for explicitly: it mounts.
    with mount_shiftfs(src, mp, "--xattr", "-o", "allow_shared_source", as_uid=builder.uid, as_gid=builder.gid):
        pass
    # A directory owned by another user above SOURCE: she could replace it.
    os.chmod(shared, 0o755)
    os.chown(shared, mallory.uid, mallory.gid)
    r = _mount_refused(builder, src, mp)
    assert r.returncode == 2 and shared in r.stderr and f"uid {mallory.uid}" in r.stderr, r.stderr


def test_source_writable_by_others_is_refused(users, wd):
    builder, mallory = users
    src, mp = os.path.join(wd, "src"), os.path.join(wd, "mnt")
    for d in (src, mp):
        os.mkdir(d)
        os.chown(d, builder.uid, builder.gid)
    for mode in (0o777, 0o757, 0o1777):
        os.chmod(src, mode)
        r = _mount_refused(builder, src, mp)
        assert r.returncode == 2, (oct(mode), r)
        msg = r.stderr.strip()
        assert len(msg.splitlines()) == 1 and f"chmod 700 {src}" in msg, msg
    # Group-writable: refused for a group others are in, not for the user's private group
    # (Debian's usual umask 002 makes 0775 directories).
    os.chmod(src, 0o775)
    os.chown(src, builder.uid, mallory.gid)
    assert _mount_refused(builder, src, mp).returncode == 2
    os.chown(src, builder.uid, builder.gid)
    with mount_shiftfs(src, mp, "--xattr", as_uid=builder.uid, as_gid=builder.gid):
        pass


def test_source_in_a_sticky_directory_is_fine(users):
    """/var/tmp (1777, root's, sticky): others can add siblings but not replace SOURCE."""
    builder, _ = users
    base = os.path.join("/var/tmp", f"trust-{os.getpid()}-{time.monotonic_ns()}")
    src, mp = base + "-src", base + "-mnt"
    try:
        for d in (src, mp):
            os.mkdir(d, 0o700)
            os.chown(d, builder.uid, builder.gid)
        with mount_shiftfs(src, mp, "--xattr", as_uid=builder.uid, as_gid=builder.gid, log=base + ".log"):
            pass
    finally:
        for d in (src, mp):
            remove_tree(d)
        if os.path.exists(base + ".log"):
            os.unlink(base + ".log")


# -- shiftfs exec and run -----------------------------------------------------------


def _exec(user, *args, cwd="/", timeout=120):
    argv = [sys.executable, "-m", "shiftfs", "exec", *args]
    return subprocess.run(user.wrap(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _run(user, *args, timeout=120):
    argv = [sys.executable, "-m", "shiftfs", "run", *args]
    return subprocess.run(user.wrap(argv), capture_output=True, text=True, timeout=timeout, cwd="/")


STAT = (
    "for f in tmp/forged tmp/hardlink tmp/legit tmp/evil tmp/evildir tmp/evildir/x opt/legit; "
    "do stat -c '%n %u:%g %a' $f; done"
)


def _expect_clean(lines: list[str], prefix: str = "") -> None:
    got = {ln.split()[0].removeprefix(prefix): ln.split()[1:] for ln in lines if ln.strip()}
    for rel in PLANTED:
        owner, mode = got[rel]
        assert owner == f"{OVERFLOW}:{OVERFLOW}", (rel, got)
        assert int(mode, 8) & 0o6000 == 0, (rel, got)
    assert got["opt/legit"] == ["0:0", "4755"], got


def test_planted_records_in_exec(users, wd):
    builder, mallory = users
    src = builder_tree(wd, builder)
    plant(wd, src, mallory)
    r = _exec(builder, "--shift", src, "--", "sh", "-c", f"cd {src} && {STAT}")
    assert r.returncode == 0, r.stderr
    _expect_clean(r.stdout.splitlines())


def test_planted_records_in_run(users, wd):
    builder, mallory = users
    src = builder_tree(wd, builder)
    make_host_root(src, builder)
    plant(wd, src, mallory)
    # shiftfs run mounts a tmpfs on /tmp: look at the planted directory under another name.
    os.rename(f"{src}/tmp", f"{src}/pub")
    r = _run(builder, *HOST_USR, src, "--", "sh", "-c", f"cd / && {STAT.replace('tmp/', 'pub/')}")
    assert r.returncode == 0, r.stderr
    _expect_clean([ln.replace("pub/", "tmp/", 1) for ln in r.stdout.splitlines()])


def test_exec_and_run_check_source(users, wd):
    builder, _ = users
    os.chown(wd, builder.uid, builder.gid)
    shared = os.path.join(wd, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    src = os.path.join(shared, "src")
    os.mkdir(src, 0o700)
    make_host_root(src, builder)
    r = _exec(builder, "--shift", src, "--", "true")
    assert r.returncode == 125 and f"chmod go-w {shared}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _exec(builder, "--allow-shared-source", "--shift", src, "--", "true")
    assert r.returncode == 0, r.stderr
    r = _run(builder, *HOST_USR, src, "--", "true")
    assert r.returncode == 125 and f"chmod go-w {shared}" in r.stderr, r.stderr
    r = _run(builder, "--allow-shared-source", *HOST_USR, src, "--", "true")
    assert r.returncode == 0, r.stderr
    os.chmod(shared, 0o755)
    os.chmod(src, 0o777)
    r = _exec(builder, "--shift", src, "--", "true")
    assert r.returncode == 125 and f"chmod 700 {src}" in r.stderr, r.stderr


@pytest.mark.parametrize("ranged", [True, False], ids=["range", "one-id"])
def test_chmod_of_another_users_file_in_a_user_namespace(users, wd, ranged):
    """README, "Whose records count": chmod through the mount of a file another user owns
    gets EPERM from shiftfs where the namespace maps 65534 (a range); in a one-id namespace
    the kernel refuses first with EOVERFLOW (the inode's owner is unmapped there), and the
    README says so."""
    user = users[0] if ranged else users[1]
    os.chown(wd, user.uid, user.gid)
    src, mp = os.path.join(wd, "src"), os.path.join(wd, "mp")
    os.mkdir(src, 0o700)
    os.mkdir(mp)
    for p in (src, mp):
        os.chown(p, user.uid, user.gid)
    open(os.path.join(src, "alien"), "w").close()
    os.chown(os.path.join(src, "alien"), 12345, 12345)
    code = (
        "import os, errno\n"
        "try:\n"
        f"    os.chmod({mp + '/alien'!r}, 0o600); print('ok')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    ns = ["--map-auto", "--map-root-user"] if ranged else ["--map-root-user"]
    inner = f'{SHIFTFS} mount --xattr {src} {mp} && {sys.executable} -c "$0"'
    r = run_as(user.uid, user.gid, ["unshare", "--user", *ns, "--mount", "sh", "-c", inner, code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == (["EPERM"] if ranged else ["EOVERFLOW"]), r.stdout + r.stderr
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = " ".join(f.read().split())
    if not ranged:
        assert "the kernel answers `EOVERFLOW` itself before shiftfs sees the call" in readme
