"""Real clients of shiftfs (project issue 16): the device-table subcommand, trees
that fuse-overlayfs reads, umount while other mount namespaces hold a copy,
and the container-tool recipes of the README.

Everything runs the installed ``shiftfs`` script and the real tools
(fuse-overlayfs, unshare, podman, systemd-nspawn) as subprocesses; a tool that
is not installed skips its test with a reason.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import tarfile

import ns_util
import pytest
import readme_util
from asuser import USER_ENV, run_as
from fsutil import MAP, SHIFTFS, have, is_mounted, reap, spawn_daemons, unmount_lazy, wait_for
from records import LEGACY, RECORD
from sysx import errno_of

#: An ordinary user for the unprivileged cases (no passwd entry needed).
USER = 4716


#: A throwaway user with a passwd entry (fusermount3 needs a name) and a
#: 65536-id range in /etc/subuid and /etc/subgid (unshare --map-auto, podman).
user = ns_util.users_fixture(1, 0, one=True)


@pytest.fixture
def wd(user):
    """A fresh working directory owned by ``user`` under a 0755 parent."""
    parent = ns_util.workdir()
    d = os.path.join(parent, "w")
    os.mkdir(d)
    os.chown(d, user.uid, user.gid)
    yield d
    ns_util.remove_tree(parent)


def as_user(user, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a sh script as ``user`` (``set -e``); output captured as text."""
    return subprocess.run(
        user.wrap(["sh", "-ec", script]), capture_output=True, text=True, errors="replace", timeout=timeout
    )


def _user_dir(scratch, name: str = "home") -> str:
    d = scratch / name
    d.mkdir()
    os.chown(d, USER, USER)
    return str(d)


# --- what make setup installs for the tests ------------------------------------------------------

#: Every command a test skips without, and the Debian package that has it.
_TOOL_PACKAGES = {
    "podman": "podman",
    "runc": "runc",
    "systemd-nspawn": "systemd-container",
    "fuse-overlayfs": "fuse-overlayfs",
    "fio": "fio",
    "setfacl": "acl",
    "getfacl": "acl",
    "setcap": "libcap2-bin",
    "getcap": "libcap2-bin",
    "setfattr": "attr",
    "getfattr": "attr",
    "unshare": "util-linux",
    "setpriv": "util-linux",
    "fallocate": "util-linux",
    "fusermount3": "fuse3",
    "tar": "tar",
}


def test_setup_installs_every_tool_a_test_skips_without():
    """A fresh machine runs every test: each command a test needs (``have(…)``)
    comes from a package ``make setup`` installs, so the podman and nspawn
    recipes run in CI (``.ci/run``, where SHIFTFS_CI=1 turns such a skip into a
    failure) instead of skipping."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "scripts/setup.sh")) as f:
        m = re.search(r'^PKGS="([^"]*)"', f.read(), re.M)
    assert m, "scripts/setup.sh has no PKGS line"
    pkgs = set(m.group(1).split()) | {"tar"}  # tar is essential in Debian
    tools: set[str] = set()
    tests_dir = os.path.join(repo, "tests")
    for name in sorted(os.listdir(tests_dir)):
        if name.endswith(".py") and name != "fsutil.py":
            with open(os.path.join(tests_dir, name)) as f:
                for args in re.findall(r"\bhave\(([^)]*)\)", f.read()):
                    tools.update(re.findall(r'"([^"]+)"', args))
    assert {"podman", "runc", "systemd-nspawn"} <= tools
    unknown = sorted(tools - set(_TOOL_PACKAGES))
    assert not unknown, f"add the Debian package of {unknown} to _TOOL_PACKAGES and to setup's PKGS"
    missing = sorted({_TOOL_PACKAGES[t] for t in tools} - pkgs)
    assert not missing, f"scripts/setup.sh does not install {missing}: tests needing them skip on a fresh machine"
    with open(os.path.join(repo, ".ci/run")) as f:
        assert re.search(r"^export SHIFTFS_CI=1$", f.read(), re.M), ".ci/run must set SHIFTFS_CI=1"
    with open(os.path.join(repo, "README.md")) as f:
        readme = f.read()
    said = readme[readme.index("installs the Debian packages that are missing") :][:800]
    for pkg in ("podman", "runc", "systemd-container"):
        assert f"{pkg}" in said, f"README's list of what setup installs lacks {pkg}"


# --- item 4: shiftfs devtable -----------------------------------------------------------------


@pytest.mark.root
def test_devtable_subcommand_as_a_user(scratch):
    """The README's build recipe, device-table line included, works for an
    ordinary user through the ``shiftfs`` command (not ``python3 -m``, which
    is Debian's python without the venv)."""
    home = _user_dir(scratch)
    r = run_as(
        USER,
        USER,
        f"cd {home} && mkdir -p rootfs/etc && echo x > rootfs/etc/hostname && "
        f"{SHIFTFS} devtable mmdebstrap > dev.table && "
        f"{SHIFTFS} export ./rootfs --device-table dev.table -o rootfs.tar && "
        f"{SHIFTFS} devtable add - rootfs.tar added.tar",
    )
    assert r.returncode == 0, r.stderr
    for name in ("rootfs.tar", "added.tar"):
        with tarfile.open(os.path.join(home, name)) as tf:
            null = tf.getmember("./dev/null")
            assert null.ischr() and (null.devmajor, null.devminor) == (1, 3) and null.mode == 0o666
            assert tf.getmember("./dev/fd").linkname == "/proc/self/fd"
            assert tf.getmember("./etc/hostname").isfile()
    assert os.stat(os.path.join(home, "added.tar")).st_uid == USER

    # A bad table line is one line naming the file, the line and the fix; exit 2.
    with open(os.path.join(home, "bad.table"), "w") as f:
        f.write("/dev/null c 1 3 0666 0\n")
    r = run_as(
        USER,
        USER,
        [
            SHIFTFS,
            "devtable",
            "add",
            os.path.join(home, "bad.table"),
            os.path.join(home, "rootfs.tar"),
            os.path.join(home, "x.tar"),
        ],
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "bad.table" in r.stderr and not os.path.exists(os.path.join(home, "x.tar"))
    # No action: one usage line, exit 2.
    r = run_as(USER, USER, [SHIFTFS, "devtable"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # The help lists it, and the old spelling still works as a shim.
    r = run_as(USER, USER, [SHIFTFS, "--help"])
    assert "devtable" in r.stdout
    r = run_as(USER, USER, [sys.executable, "-m", "shiftfs.devtable", "mmdebstrap"])
    assert r.returncode == 0 and "/dev/null" in r.stdout, r.stderr


def test_no_help_text_shows_python_m_devtable():
    """Every place that tells a user how to make a device table names the subcommand."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = subprocess.run(
        [
            "grep",
            "-rn",
            "-e",
            "-m shiftfs.devtable",
            "README.md",
            "shiftfs/container",
            "shiftfs/offline/commands.py",
            "shiftfs/cli.py",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        env=USER_ENV,
    ).stdout
    assert hits == ""


# --- item 5: fuse-overlayfs reads a tree shiftfs wrote ------------------------------------------


def _fuse_overlayfs_listing(layout: str) -> str:
    """sh lines: mount ``tree`` with Debian's fuse-overlayfs (``xattr_permissions=2``,
    as the bench and rootless podman run it) as its lower or its upper layer,
    list the root and a subtree, unmount."""
    layers = (
        "lowerdir=tree,upperdir=up,workdir=fow" if layout == "lower" else "lowerdir=empty,upperdir=tree,workdir=fow"
    )
    return f"""
rm -rf up fow empty fo; mkdir up fow empty fo
fuse-overlayfs -o {layers},xattr_permissions=2 fo
trap 'fusermount3 -u fo' EXIT
echo ROOT; ls -A fo
echo SUB; ls -A fo/etc/sub
echo MODE; stat -c %a fo/etc/f
"""


@pytest.mark.skipif(not have("fuse-overlayfs"), reason="needs fuse-overlayfs")
@pytest.mark.parametrize(
    "layout,opts",
    [("lower", ""), ("lower", "-o legacy_xattr"), ("upper", "-o legacy_xattr")],
    ids=["lower", "lower-legacy", "upper-legacy"],
)
def test_fuse_overlayfs_lists_a_tree_shiftfs_wrote(user, wd, layout, opts):
    """fuse-overlayfs picks a layer's record name by probing the layer root and
    fails a listing that meets a directory or file without a record: the root
    and .shiftfs get records on the first mount, so it lists the root and reads
    our records in subtrees (1.10 reads user.containers.override_stat on a
    lower layer whose root has it; on its upper layer only the legacy name,
    hence -o legacy_xattr)."""
    r = as_user(
        user,
        f"""
cd {wd}
mkdir tree mp
{SHIFTFS} mount --xattr {opts} tree mp
mkdir -p mp/etc/sub mp/usr
echo hi > mp/etc/f; echo a > mp/etc/sub/g; ln -s f mp/etc/link; chmod 4755 mp/etc/f
{SHIFTFS} umount mp
"""
        + _fuse_overlayfs_listing(layout),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.split()
    root = out[out.index("ROOT") + 1 : out.index("SUB")]
    assert sorted(root) == [".shiftfs", "etc", "usr"], r.stdout
    assert out[out.index("SUB") + 1 : out.index("MODE")] == ["g"], r.stdout
    assert out[out.index("MODE") + 1] == "4755", r.stdout  # the record, not the backing mode 0755
    rec = os.getxattr(os.path.join(wd, "tree"), RECORD)
    assert rec == f"{user.uid}:{user.gid}:40755".encode()  # the view the root showed
    assert os.getxattr(os.path.join(wd, "tree", ".shiftfs"), RECORD) == (f"{user.uid}:{user.gid}:40700".encode())


@pytest.mark.skipif(not have("fuse-overlayfs"), reason="needs fuse-overlayfs")
def test_root_record_added_to_an_older_tree_and_never_replaced(user, wd):
    """A tree an earlier shiftfs wrote (no root or .shiftfs record) gets them at
    its next mount; a root record that is there already is kept, whatever its
    name (it tells fuse-overlayfs which name the tree uses); a read-only mount
    writes nothing."""
    tree = os.path.join(wd, "tree")
    r = as_user(
        user,
        f"""
cd {wd}
mkdir tree mp
{SHIFTFS} mount --xattr tree mp
mkdir -p mp/etc/sub; echo a > mp/etc/sub/g; echo hi > mp/etc/f; chmod 4755 mp/etc/f; ln -s f mp/etc/link
{SHIFTFS} umount mp
setfattr -x {RECORD} tree
setfattr -x {RECORD} tree/.shiftfs
{SHIFTFS} mount --xattr -o ro tree mp
ls mp/etc >/dev/null
{SHIFTFS} umount mp
getfattr -n {RECORD} tree 2>/dev/null && exit 3
getfattr -n {RECORD} tree/.shiftfs 2>/dev/null && exit 4
{SHIFTFS} mount --xattr tree mp
{SHIFTFS} umount mp
"""
        + _fuse_overlayfs_listing("lower"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4755" in r.stdout.split()
    assert os.getxattr(os.path.join(tree, ".shiftfs"), RECORD)
    # a legacy-only root record stays as it is (a tree fuse-overlayfs 1.10 wrote as its upper layer)
    os.removexattr(tree, RECORD)
    os.setxattr(tree, LEGACY, b"0:0:40755")
    r = as_user(user, f"cd {wd}; {SHIFTFS} mount --xattr tree mp; {SHIFTFS} umount mp")
    assert r.returncode == 0, r.stderr
    assert RECORD not in os.listxattr(tree)


# --- item 6: umount while other mount namespaces hold a copy ------------------------------------


def _mount_tracked(argv: list[str]) -> list[int]:
    """Run a mounting command; return the daemon pids it left (ours to reap)."""
    r, pids = spawn_daemons(argv, timeout=60)
    assert r.returncode == 0, r.stderr
    assert pids, "no daemon left running"
    return pids


def _stop(procs, daemons, mp) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    unmount_lazy(mp)
    for pid in daemons:
        reap(pid)


#: The scenario, in a mount namespace of the test's own made *before* the mount,
#: so that namespaces other programs on the machine make meanwhile get no copy and
#: the counts are exact. ``$NS`` is how a holder makes its namespace, ``$LOCKED``
#: how a namespace whose copy is locked is made ('' to skip that part).
_UMOUNT_SCENARIO = r"""
cd "$WD"; mkdir -p src mp
"$SHIFTFS" mount -f $MOUNTARGS src mp 2>daemon.log &
daemon=$!
n=0; until grep -q " $WD/mp " /proc/self/mountinfo; do
  n=$((n+1)); [ $n -lt 300 ] || { echo "no mount"; cat daemon.log; exit 9; }; sleep 0.1
done
if [ -n "$LOCKED" ]; then
  for lazy in "" --lazy; do
    rc=0; $LOCKED "$SHIFTFS" umount $lazy mp 2>locked.err || rc=$?
    echo "LOCKED rc=$rc lines=$(wc -l <locked.err)"; cat locked.err
  done
fi
holders=""
for i in $(seq "$HOLDERS"); do
  $NS sleep 120 & holders="$holders $!"
done
n=0; until [ "$(grep -l " $WD/mp " /proc/[0-9]*/mountinfo 2>/dev/null | wc -l)" -gt "$HOLDERS" ]; do
  n=$((n+1)); [ $n -lt 300 ] || { echo "no holder"; exit 8; }; sleep 0.1
done
echo "HOLDERS$holders"
rc=0; "$SHIFTFS" umount mp 2>umount.err || rc=$?
echo "UMOUNT rc=$rc lines=$(wc -l <umount.err)"; cat umount.err
grep -q " $WD/mp " /proc/self/mountinfo && echo "STILL MOUNTED HERE"
kill -0 $daemon && echo "DAEMON SERVES ON"
kill $holders; wait $holders 2>/dev/null || true
n=0; while kill -0 $daemon 2>/dev/null; do
  n=$((n+1)); [ $n -lt 300 ] || { echo "DAEMON STAYS"; kill $daemon; exit 7; }; sleep 0.1
done
wait $daemon || true
echo "DAEMON EXITED"
"""


def _umount_scenario(wrap: list[str], wd: str, mountargs: str, ns: str, holders: int, locked: str = ""):
    env = dict(USER_ENV, WD=wd, SHIFTFS=SHIFTFS, MOUNTARGS=mountargs, NS=ns, HOLDERS=str(holders), LOCKED=locked)
    r = subprocess.run(
        wrap + ["sh", "-ec", _UMOUNT_SCENARIO], capture_output=True, text=True, errors="replace", timeout=180, env=env
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _check_umount_report(out: str, holders: int) -> None:
    lines = out.splitlines()
    pids = lines[[i for i, ln in enumerate(lines) if ln.startswith("HOLDERS")][0]].split()[1:]
    i = lines.index("UMOUNT rc=0 lines=1")
    said = lines[i + 1]
    many = "s" if holders > 1 else ""
    assert f"is unmounted here, but {holders} other mount namespace{many} (" in said, said
    assert "keeps serving" in said
    assert all(re.search(rf"\b{p}\b", said) for p in pids), (pids, said)
    assert "STILL MOUNTED HERE" not in out
    assert "DAEMON SERVES ON" in out and out.rstrip().endswith("DAEMON EXITED"), out


@pytest.mark.root
@pytest.mark.skipif(not have("unshare"), reason="needs unshare (util-linux)")
def test_umount_says_other_namespaces_still_hold_the_mount(scratch):
    """Root: a mount namespace made after the mount (``unshare --mount``) holds
    a copy; umount succeeds here, says so in one line with the holder's pid,
    and the daemon serves on until the holder exits."""
    out = _umount_scenario(
        ["unshare", "--mount", "--propagation", "private"],
        str(scratch),
        f"--map {MAP} -o backend=fuse",
        "unshare --mount",
        1,
    )
    _check_umount_report(out, 1)


@pytest.mark.skipif(not have("unshare"), reason="needs unshare (util-linux)")
def test_umount_of_a_locked_copy_and_user_namespace_holders(user, wd):
    """A user in a user namespace of their own (as ``podman unshare``): in a
    nested user namespace the copy of the mount is locked, and umount says that
    instead of "not mounted … use --lazy"; outside it, umount names the
    namespaces that keep the daemon serving."""
    userns = "unshare --user --map-root-user --mount"
    out = _umount_scenario(user.wrap(userns.split()), wd, "--xattr", userns, 2, locked=userns)
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith("LOCKED"):
            assert ln == "LOCKED rc=1 lines=1", out
            assert "mounted outside this user namespace" in lines[i + 1], out
            assert "not mounted" not in lines[i + 1] and "--lazy'" not in lines[i + 1]
    assert sum(ln.startswith("LOCKED") for ln in lines) == 2
    _check_umount_report(out, 2)


#: umount, then mount again at once, ROUNDS times; in a mount namespace of the test's own (made
#: before the mounts, so namespaces other programs make meanwhile get no copy).
_REMOUNT_LOOP = r"""
cd "$WD"; mkdir -p src mp; chown 100000:100000 src
fails=0
for i in $(seq "$ROUNDS"); do
  for how in umount8 shiftfs; do
    "$SHIFTFS" mount --map b:100000:0:65536 -o backend=fuse src mp 2>err || { fails=$((fails+1)); cat err; continue; }
    if [ $how = umount8 ]; then umount mp; else "$SHIFTFS" umount mp; fi
  done
done
echo "FAILS $fails"
"""


def in_private_mount_ns(script: str, scratch, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``sh -ec SCRIPT`` in a mount namespace of its own (WD=scratch, SHIFTFS set); it must exit 0."""
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(USER_ENV, WD=str(scratch), SHIFTFS=SHIFTFS, **env),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.root
@pytest.mark.timeout(900)  # 10 mounts and umounts: each mount takes ~2 s on a loaded 2-core machine
@pytest.mark.skipif(not have("unshare"), reason="needs unshare (util-linux)")
def test_umount_then_mount_at_once(scratch):
    """umount(8) returns when the kernel detached the mount, before the daemon has exited
    and dropped its SOURCE lock: a mount right after it waits for that instead of refusing
    "already served"; ``shiftfs umount`` itself returns only once the daemon is gone."""
    r = in_private_mount_ns(_REMOUNT_LOOP, scratch, 800, ROUNDS="5")
    assert "FAILS 0" in r.stdout, r.stdout + r.stderr


_HELD_COPY = r"""
cd "$WD"; mkdir -p src mp; chown 100000:100000 src
"$SHIFTFS" mount --map b:100000:0:65536 -o backend=fuse src mp
unshare --mount sleep 120 & holder=$!
n=0; until [ "$(grep -l " $WD/mp " /proc/[0-9]*/mountinfo 2>/dev/null | wc -l)" -gt 1 ]; do
  n=$((n+1)); [ $n -lt 300 ] || { echo "no holder"; exit 8; }; sleep 0.1
done
"$SHIFTFS" umount mp 2>/dev/null
rc=0; "$SHIFTFS" mount --map b:100000:0:65536 -o backend=fuse src mp 2>refused || rc=$?
echo "REFUSED rc=$rc holder=$holder"; cat refused
kill $holder; wait $holder 2>/dev/null || true
"$SHIFTFS" mount --map b:100000:0:65536 -o backend=fuse src mp
echo MOUNTED
"$SHIFTFS" umount mp
"""


@pytest.mark.root
@pytest.mark.skipif(not have("unshare"), reason="needs unshare (util-linux)")
def test_mount_refused_while_another_namespace_holds_a_copy_names_it(scratch):
    """After umount here, a copy in another mount namespace keeps the daemon serving: the
    refusal names that namespace's process (not just the mount point we no longer have)
    and how to release it; once the holder exits, a mount right away succeeds."""
    r = in_private_mount_ns(_HELD_COPY, scratch, 300)
    lines = r.stdout.splitlines()
    i = [n for n, ln in enumerate(lines) if ln.startswith("REFUSED")][0]
    holder = lines[i].split("holder=")[1]
    assert lines[i].startswith("REFUSED rc=2"), r.stdout
    said = lines[i + 1]
    assert lines[i + 2] == "MOUNTED", r.stdout
    assert f"pid {holder}: sleep" in said and "not mounted here" in said, said
    assert re.search(r"'kill \d+'", said), said


# --- the README's container-tool recipes --------------------------------------------------------

#: Commands the small root filesystems of these tests carry (copied from the host with their libraries).
_TOOLS = ("sh", "id", "ls", "stat", "touch", "chown", "cat", "mkdir")


def _tiny_rootfs(into: str) -> None:
    """A root filesystem of a few host binaries and their libraries, written
    through ``into`` (a view, so the view decides the ownership on disk):
    cheap, and enough for a container tool to start a shell in."""
    import shutil

    files: set[str] = set()
    for tool in _TOOLS:
        path = os.path.realpath(shutil.which(tool, path="/usr/bin:/bin"))
        files.add(path)
        out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for line in out.splitlines():
            for part in line.split():
                if part.startswith("/"):
                    files.add(os.path.realpath(part))
                    files.add(part)
    for d in ("usr/bin", "usr/lib", "usr/lib64", "etc", "proc", "sys", "dev", "tmp", "root", "run", "home"):
        os.makedirs(os.path.join(into, d), exist_ok=True)
    for name in ("bin", "lib", "lib64"):
        os.symlink(f"usr/{name}", os.path.join(into, name))
    for f in sorted(files):
        dst = os.path.join(into, "usr", f.lstrip("/").removeprefix("usr/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.islink(f):
            if not os.path.lexists(dst):
                os.symlink(os.readlink(f), dst)
        elif not os.path.exists(dst):
            shutil.copy2(f, dst)
    for tool in _TOOLS:
        src = os.path.realpath(shutil.which(tool, path="/usr/bin:/bin"))
        dst = os.path.join(into, "usr/bin", tool)
        if not os.path.lexists(dst):
            os.symlink(
                os.path.relpath(os.path.join(into, "usr", src.lstrip("/").removeprefix("usr/")), os.path.dirname(dst)),
                dst,
            )
    with open(os.path.join(into, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\n")
    with open(os.path.join(into, "etc/group"), "w") as f:
        f.write("root:x:0:\nbob:x:1000:\n")


def _podman_argv() -> list[str]:
    """podman with what this kind of machine needs (README, "Using it with container
    tools"): runc where crun refuses a hybrid cgroup tree, limits a process
    without CAP_SYS_RESOURCE may set, the host network (no slirp4netns needed)."""
    argv = ["podman"]
    if have("runc"):
        argv += ["--runtime", "runc"]
    return argv


_PODMAN_RUN = ["run", "--rm", "--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
#: In the container: who am I, and what ownership a chown leaves (view side).
_IN_CONTAINER = "id -u; touch /home/x; chown 1000:1000 /home/x; stat -c %u:%g /home/x /etc/passwd"


def _mount_view(src: str, view: str, *args: str) -> list[int]:
    os.makedirs(src, exist_ok=True)
    os.makedirs(view, exist_ok=True)
    return _mount_tracked([SHIFTFS, "mount", *args, src, view])


@pytest.mark.root
@pytest.mark.skipif(not have("podman"), reason="needs podman (apt-get install podman)")
def test_recipe_root_podman_on_a_table_view(scratch):
    """``podman run --rootfs VIEW``: the container's root is view root, and what
    it chowns lands on disk shifted by the table."""
    src, view = str(scratch / "rootfs"), str(scratch / "view")
    # Two daemons on one tree: both with -o shared (one daemon per SOURCE otherwise).
    daemons = _mount_view(src, view, "--map", MAP, "-o", "backend=fuse,shared")
    try:
        _tiny_rootfs(view)
        assert os.stat(os.path.join(src, "etc/passwd")).st_uid == 100000
        r = subprocess.run(
            _podman_argv() + _PODMAN_RUN + ["--rootfs", view, "sh", "-c", _IN_CONTAINER],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["0", "1000:1000", "0:0"], r.stdout
        st = os.stat(os.path.join(src, "home/x"))
        assert (st.st_uid, st.st_gid) == (101000, 101000)
    finally:
        _stop([], daemons, view)


def _readme_root_podman(top: str, tar: str) -> list[str]:
    """The README's root-podman recipe with /srv/ct → ``top``, bookworm.tar → ``tar``,
    the checkout's shiftfs, and this machine's podman flags (runc, limits, host network)."""
    lines = []
    for ln in readme_util.sh_block("### Root podman on a table view"):
        ln = ln.replace("/srv/ct", top).replace("bookworm.tar", tar)
        if ln.startswith("shiftfs "):
            ln = SHIFTFS + ln[len("shiftfs") :]
        if ln.startswith("podman run --rm "):
            ln = " ".join(_podman_argv() + _PODMAN_RUN) + " " + ln[len("podman run --rm ") :]
        lines.append(ln)
    return lines


@pytest.mark.root
@pytest.mark.skipif(not have("podman"), reason="needs podman (apt-get install podman)")
def test_readme_root_podman_recipe_as_written(scratch, debian_tar):
    """The README's root-podman recipe, line by line, on the default backend (the
    kernel's for root on ext4): the tar unpacks through the view, and bob's file
    is 1000 inside and 101000 on disk."""
    top = str(scratch / "ct")
    lines = _readme_root_podman(top, debian_tar)
    view = os.path.join(top, "view")
    try:
        r = subprocess.run(
            ["sh", "-ec", "\n".join(lines)], capture_output=True, text=True, errors="replace", timeout=600, env=USER_ENV
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "outside the table" not in r.stderr, r.stderr
        assert r.stdout.split()[2:4] == ["1000", "1000"], r.stdout
        st = os.stat(os.path.join(top, "rootfs/home/bob/x"))
        assert (st.st_uid, st.st_gid) == (101000, 101000)
        assert os.stat(os.path.join(top, "rootfs/etc/shadow")).st_gid == 100042
    finally:
        subprocess.run([SHIFTFS, "umount", view], capture_output=True)
        unmount_lazy(view)


@pytest.mark.root
def test_kernel_mount_of_an_unmapped_source_says_so(scratch):
    """Without the recipe's chown, SOURCE (disk uid 0) is outside the table: on the
    kernel backend nobody can create in it, and the backend line says why and how
    to fix it; with the chown the line has no such note."""
    src, view = scratch / "rootfs", scratch / "view"
    src.mkdir()
    view.mkdir()
    try:
        r = subprocess.run([SHIFTFS, "mount", "--map", MAP, src, view], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        lines = r.stderr.strip().splitlines()
        if "backend kernel" not in r.stderr:
            pytest.skip(f"no kernel backend here: {r.stderr.strip()}")
        assert len(lines) == 1, r.stderr
        assert "outside the table" in lines[0] and f"chown 100000:100000 {src}" in lines[0], lines[0]
        assert errno_of(os.mkdir, os.path.join(view, "etc")) == errno.EACCES
        subprocess.run([SHIFTFS, "umount", view], check=True)
        os.chown(src, 100000, 100000)
        r = subprocess.run([SHIFTFS, "mount", "--map", MAP, src, view], capture_output=True, text=True)
        assert r.returncode == 0 and "outside the table" not in r.stderr, r.stderr
        os.mkdir(os.path.join(view, "etc"))
        assert os.stat(os.path.join(src, "etc")).st_uid == 100000
    finally:
        subprocess.run([SHIFTFS, "umount", view], capture_output=True)
        unmount_lazy(view)


@pytest.mark.skipif(not have("podman"), reason="needs podman (apt-get install podman)")
def test_recipe_rootless_podman_mounts_inside_podman_unshare(user, wd):
    """Rootless podman: the view is mounted inside ``podman unshare`` (so view
    ids are the namespace's); ``podman run --rootfs VIEW`` then works, and on
    the host every file stays the user's, with the ownership in records."""
    home = os.path.join(wd, "home")
    run_dir = os.path.join(wd, "run")
    for d in (home, run_dir):
        os.mkdir(d, 0o700)
        os.chown(d, user.uid, user.gid)
    env = ["env", f"HOME={home}", f"XDG_RUNTIME_DIR={run_dir}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    src, view = os.path.join(home, "rootfs"), os.path.join(home, "view")

    def podman(*args, timeout=180):
        return subprocess.run(
            ["runuser", "-u", user.name, "--", *env, *_podman_argv(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    try:
        r = subprocess.run(["runuser", "-u", user.name, "--", *env, "mkdir", src, view])
        assert r.returncode == 0
        r = podman("unshare", SHIFTFS, "mount", "--xattr", src, view)
        assert r.returncode == 0, r.stderr
        # Fill it as namespace root, through the view (podman unshare runs as uid 0 there).
        r = podman(
            "unshare",
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import test_clients as t; t._tiny_rootfs({view!r})",
        )
        assert r.returncode == 0, r.stderr
        r = podman(*_PODMAN_RUN, "--rootfs", view, "sh", "-c", _IN_CONTAINER)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["0", "1000:1000", "0:0"], r.stdout
        st = os.stat(os.path.join(src, "home/x"))
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
        assert os.getxattr(os.path.join(src, "home/x"), RECORD) == b"1000:1000:100644"
        # shiftfs umount inside podman unshare ends the mount, and the daemon with it: gone, not a
        # zombie left under podman's pause process (a zombie until 'podman system migrate')
        daemons = subprocess.run(
            ["pgrep", "-u", user.name, "-f", f"shiftfs mount --xattr {src}"], capture_output=True, text=True
        ).stdout.split()
        assert len(daemons) == 1, daemons
        # The daemon is nobody's child in podman's namespace: the pause process (which never
        # waits) is not its parent, so its exit is reaped by pid 1 (or a subreaper above podman).
        with open(os.path.join(run_dir, "libpod/tmp/pause.pid")) as f:
            pause = f.read().strip()
        running = _proc_state(int(daemons[0]))
        assert running is not None and f"ppid={pause}" not in running, (running, pause, ps_of(user.name))
        r = podman("unshare", SHIFTFS, "umount", view)
        assert r.returncode == 0, r.stderr
        state = _proc_state(int(daemons[0]))
        assert state is None or state.startswith("Z "), (state, ps_of(user.name))  # it has exited
        assert state is None or f"ppid={pause}" not in state, (state, pause)
        wait_for(lambda: _proc_state(int(daemons[0])) is None, 10, what=f"the daemon reaped ({state})")
    finally:
        podman("system", "migrate", timeout=60)  # stops the pause process and its namespaces
        ns_util.remove_tree(home)


@pytest.mark.skipif(not have("unshare"), reason="needs unshare (util-linux)")
def test_readme_by_hand_pivot_recipe_as_written(user, wd, debian_tar):
    """The README's by-hand recipe (``unshare`` + ``pivot_root``) as a user with a
    range, line by line. The user's PATH is Debian's (/usr/local/bin first, where
    setup links ``shiftfs``); the test puts a directory whose ``shiftfs`` is this
    checkout's in place of /usr/local/bin, in that PATH and in the recipe's own."""
    heading = "### By hand: `unshare` and `pivot_root`"
    lines = readme_util.sh_block(heading)
    home = os.path.join(wd, "home")
    bindir = os.path.join(wd, "bin")
    for d in (home, bindir):
        os.mkdir(d, 0o755)
        os.chown(d, user.uid, user.gid)
    os.symlink(SHIFTFS, os.path.join(bindir, "shiftfs"))
    enter = [i for i, ln in enumerate(lines) if "unshare " in ln][0]
    outside = [ln.replace("bookworm.tar", debian_tar) for ln in lines[:enter]]
    inside = lines[enter + 1 :]
    script = "\n".join(
        [f"export HOME={home} PATH={bindir}:/usr/bin:/bin", "cd $HOME", *outside]
        + [lines[enter].replace("/usr/local/bin", bindir) + " <<'INSIDE'", *inside, "INSIDE"]
    )
    r = as_user(user, script, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout.split()
    assert out[2:4] == ["1000", "1000"], r.stdout  # ls -ln /home/bob/x inside
    x = os.path.join(home, "rt/home/bob/x")
    st = os.stat(x)
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)  # yours on the host
    assert os.getxattr(x, RECORD) == b"1000:1000:100644"


#: A throwaway user with no subordinate range (a one-id user namespace only).
user_without_range = ns_util.users_fixture(0, 1, one=True)


@pytest.mark.skipif(not have("unshare"), reason="needs unshare (util-linux)")
def test_by_hand_without_a_range_needs_single_id(user_without_range, debian_tar):
    """README, single-id section: by hand in a one-id namespace, root has no rights over
    files of other ids (``useradd`` cannot open /etc/gshadow); ``-o single_id`` (listed
    in ``shiftfs mount --help``) shows them as 0 and useradd works."""
    user = user_without_range
    parent = ns_util.workdir()
    try:
        home = os.path.join(parent, "home")
        os.mkdir(home, 0o755)
        os.chown(home, user.uid, user.gid)
        r = as_user(user, f"cd {home} && {SHIFTFS} import {debian_tar} rt && mkdir rv", timeout=300)
        assert r.returncode == 0, r.stderr
        gshadow = os.path.join(home, "rt/etc/gshadow")
        assert os.getxattr(gshadow, RECORD).startswith(b"0:42:")
        for opts, want in (("", "gshadow"), ("-o single_id", "")):
            inside = f"{SHIFTFS} mount --xattr {opts} {home}/rt {home}/rv && chroot {home}/rv useradd -m bob{len(opts)}"
            r = as_user(user, f"unshare --user --map-root-user --mount sh -c '{inside}' 2>&1 || echo FAILED")
            if want:
                assert "FAILED" in r.stdout and want in r.stdout, r.stdout
            else:
                assert "FAILED" not in r.stdout, r.stdout
        # (useradd rewrites /etc/gshadow with the owner it was shown, 0:0: by hand nothing traps that
        # chown; the README says so and points to run/exec, which keep 0:42)
        h = subprocess.run([SHIFTFS, "mount", "--help"], capture_output=True, text=True).stdout
        assert "single_id" in h
        readme = readme_util.section("### Builders without subordinate ranges (single-id namespace)")
        assert "usermod --del-subuids" in readme and "--del-subgids" in readme and "-o single_id" in readme
        assert "`/etc/gshadow` comes back" in readme
    finally:
        ns_util.remove_tree(parent)


def test_mount_help_lists_every_option():
    """Every -o option the parser takes is in ``shiftfs mount --help`` and the README's
    table (``control_fd``, ``fuse_fd`` and ``source_checked`` are internal to run/exec, ``fuseoverlayfs_compat``
    an old alias)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "shiftfs/fs/options.py")) as f:
        src = f.read()
    keys = set(re.findall(r'key == "(\w+)"', src))
    for group in re.findall(r"key in \(([^)]*)\)", src):
        keys |= set(re.findall(r'"(\w+)"', group))
    keys -= {"control_fd", "fuse_fd", "source_checked", "fuseoverlayfs_compat", "comment"}
    assert {"single_id", "shared", "cache"} <= keys
    h = subprocess.run([SHIFTFS, "mount", "--help"], capture_output=True, text=True).stdout
    readme = readme_util.readme_text()
    assert [k for k in sorted(keys) if not re.search(rf"\b{k}\b", h)] == []
    assert [k for k in sorted(keys) if f"`{k}" not in readme] == []


def _proc_state(pid: int) -> str | None:
    """``/proc/PID/stat``'s state letter and parent (``Z ppid=N`` for a zombie), or None once it is reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return f"{fields[0]} ppid={fields[1]}"


def ps_of(name: str) -> str:
    return subprocess.run(["ps", "-o", "pid,ppid,stat,args", "-u", name], capture_output=True, text=True).stdout


#: systemd-nspawn without systemd as PID 1 and without D-Bus: no machined
#: registration and no scope unit of its own (README, "Using it with container tools").
_NSPAWN = ["systemd-nspawn", "-q", "--register=no", "--keep-unit"]


@pytest.mark.root
@pytest.mark.skipif(not have("systemd-nspawn"), reason="needs systemd-nspawn (apt-get install systemd-container)")
@pytest.mark.parametrize("backend", ["kernel", "fuse"])
def test_readme_quotes_nspawn_pick_errors(scratch, backend):
    """``--private-users=pick`` on a table view fails on both backends: the README's
    systemd-nspawn section quotes what nspawn says on each."""
    src, view = str(scratch / "rootfs"), str(scratch / "view")
    os.makedirs(src)
    os.chown(src, 100000, 100000)
    daemons = _mount_view(src, view, "--map", MAP, "-o", f"backend={backend}") if backend == "fuse" else []
    if backend == "kernel":
        os.makedirs(view)
        r = subprocess.run([SHIFTFS, "mount", "--map", MAP, "-o", "backend=kernel", src, view], capture_output=True)
        assert r.returncode == 0, r.stderr
    try:
        _tiny_rootfs(view)
        r = subprocess.run(
            _NSPAWN + ["--private-users=pick", "-D", view, "sh", "-c", "id"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode != 0, r.stdout
        said = [ln for ln in r.stderr.splitlines() if ln.startswith("Failed to")]
        assert said, r.stderr
        section = " ".join(readme_util.section("### systemd-nspawn").split())
        assert f'("{said[0]}")' in section, (said[0], backend)
    finally:
        _stop([], daemons, view)


@pytest.mark.root
@pytest.mark.skipif(not have("systemd-nspawn"), reason="needs systemd-nspawn (apt-get install systemd-container)")
def test_recipe_nspawn_on_table_views(scratch):
    """``systemd-nspawn -D VIEW`` on a table view; and with a user namespace
    (``--private-users=BASE:65536 --private-users-ownership=off``) on a second
    table of the same tree whose view side starts at BASE."""
    base = 0x80000
    src, view, view2 = str(scratch / "rootfs"), str(scratch / "view"), str(scratch / "view2")
    # Two daemons on one tree: both with -o shared (one daemon per SOURCE otherwise).
    daemons = _mount_view(src, view, "--map", MAP, "-o", "backend=fuse,shared")
    try:
        _tiny_rootfs(view)
        r = subprocess.run(
            _NSPAWN + ["-D", view, "sh", "-c", _IN_CONTAINER], capture_output=True, text=True, timeout=180
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["0", "1000:1000", "0:0"], r.stdout
        assert os.stat(os.path.join(src, "home/x")).st_uid == 101000
        # --private-users=pick would chown the tree into a range the table cannot show
        daemons += _mount_view(src, view2, "--map", f"b:100000:{base}:65536", "-o", "backend=fuse,shared")
        assert os.stat(os.path.join(view2, "etc/passwd")).st_uid == base
        r = subprocess.run(
            _NSPAWN
            + [
                f"--private-users={base}:65536",
                "--private-users-ownership=off",
                "-D",
                view2,
                "sh",
                "-c",
                "cat /proc/self/uid_map; touch /home/y; chown 1000:1000 /home/y; stat -c %u:%g /home/y /etc/passwd",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["0", str(base), "65536", "1000:1000", "0:0"], r.stdout
        st = os.stat(os.path.join(src, "home/y"))
        assert (st.st_uid, st.st_gid) == (101000, 101000)
    finally:
        _stop([], daemons[1:], view2)
        _stop([], daemons[:1], view)
