"""The ``shiftfs`` command line, mount(8) integration and daemon lifecycle (project issue 2).

Real mounts only: every case runs the installed ``shiftfs`` script (or
``mount``/``mount.fuse3`` in front of it) as a subprocess and checks the
mount table, the exit status and what the user sees on stderr.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import threading
import time

import pytest
from asuser import USER_ENV, run_as
from fsutil import MAP, SHIFTFS, find_mount, is_mounted, mount_shiftfs, reap, spawn_daemons, unmount_lazy, wait_for
from sysx import errno_of

pytestmark = [pytest.mark.root, pytest.mark.fuse]

BASE = 100000
ENV = dict(os.environ, PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


@pytest.fixture
def dirs(scratch):
    src, mp = scratch / "src", scratch / "mp"
    src.mkdir()
    mp.mkdir()
    os.chown(src, BASE, BASE)
    (src / "f").write_bytes(b"hello")
    os.chown(src / "f", BASE + 5, BASE + 6)
    return src, mp


@pytest.fixture
def tracked(request):
    """Run mounting commands; whatever daemons they leave are detached and reaped afterwards."""
    started = []  # (mountpoint, pids)

    def run(cmd, mp, env=ENV, timeout=60, input=None):
        r, pids = spawn_daemons([str(c) for c in cmd], env=env, timeout=timeout, input=input)
        started.append((str(mp), pids))
        return r, pids

    yield run
    for mp, pids in started:
        m = find_mount(mp)
        if m is not None and (m.fstype.startswith("fuse") or "idmapped" in m.options):
            unmount_lazy(mp)
        for p in pids:
            reap(p, 10)


def one_line_error(r, code=2):
    """The command failed with ``code`` and said so in exactly one line on stderr."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1, f"expected one line, got:\n{r.stderr}"
    assert lines[0].startswith("shiftfs: "), lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def check_table_view(mp):
    st = os.stat(os.path.join(mp, "f"))
    assert (st.st_uid, st.st_gid) == (5, 6)
    assert open(os.path.join(mp, "f"), "rb").read() == b"hello"


# -- mount(8) and the helper form -----------------------------------------------------


def test_helper_form(dirs, tracked):
    """What mount.fuse3 runs: ``shiftfs SOURCE MOUNTPOINT -o OPTS`` (with its rw,dev,suid additions)."""
    src, mp = dirs
    r, pids = tracked(
        [SHIFTFS, src, mp, "-o", "rw,backend=fuse,uidmap=100000:0:65536,gidmap=100000:0:65536,dev,suid"], mp
    )
    assert r.returncode == 0, r.stderr
    assert len(pids) == 1
    info = find_mount(mp)
    assert info.fstype == "fuse.shiftfs"
    assert info.source == str(src)
    check_table_view(mp)


def test_mount_t_fuse_shiftfs(dirs, tracked, shiftfs_on_path):
    """``mount -t fuse.shiftfs`` finds /sbin/mount.fuse3 (via mount.fuse), which runs ``shiftfs`` from PATH."""
    src, mp = dirs
    r, pids = tracked(
        [
            "mount",
            "-t",
            "fuse.shiftfs",
            src,
            mp,
            "-o",
            "backend=fuse,uidmap=100000:0:65536,gidmap=100000:0:65536,fsname=shifted-root",
        ],
        mp,
    )
    assert r.returncode == 0, r.stderr
    assert len(pids) == 1
    info = find_mount(mp)
    assert info.fstype == "fuse.shiftfs"
    assert info.source == "shifted-root"
    check_table_view(mp)
    # and a plain umount(8) takes it down; the daemon exits by itself
    r = subprocess.run(["umount", str(mp)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)
    st = reap(pids[0], 10, kill=False)
    assert st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


def test_mount_t_keeps_nosuid_nodev(dirs, tracked, shiftfs_on_path, scratch):
    """mount.fuse3 appends dev,suid (mount(8)'s block-device defaults) to every helper call;
    shiftfs still defaults to nosuid,nodev: a setuid file of view uid 0 would be real root."""
    src, mp = dirs
    r, pids = tracked(["mount", "-t", "fuse.shiftfs", src, mp, "-o", "backend=fuse,uidmap=100000:0:65536"], mp)
    assert r.returncode == 0, r.stderr
    opts = find_mount(mp).options
    assert "nosuid" in opts and "nodev" in opts, opts
    unmount_lazy(mp)
    assert reap(pids[0], 10) is not None
    # asked for explicitly (mount.fuse3 run directly; mount(8) itself drops a
    # plain "suid" from fstab lines before calling the helper): granted
    r, pids = tracked(
        ["/sbin/mount.fuse3", src, mp, "-t", "fuse.shiftfs", "-o", "backend=fuse,uidmap=100000:0:65536,suid"], mp
    )
    assert r.returncode == 0, r.stderr
    opts = find_mount(mp).options
    assert "nosuid" not in opts and "nodev" in opts, opts


def test_mount_t_errors_pass_through(dirs, tracked, shiftfs_on_path):
    src, mp = dirs
    r, pids = tracked(["mount", "-t", "fuse.shiftfs", src, mp, "-o", "bogus=1"], mp)
    assert r.returncode != 0
    assert "unknown -o option 'bogus=1'" in r.stderr
    assert pids == [] and not is_mounted(mp)


def test_fstab_line(dirs, tracked, shiftfs_on_path, scratch):
    src, mp = dirs
    fstab = scratch / "fstab"
    fstab.write_text(
        "# a temporary fstab\n"
        f"{src} {mp} fuse.shiftfs noauto,nofail,x-systemd.automount,backend=fuse,"
        "uidmap=100000:0:65536,gidmap=100000:0:65536,"
        "fsname=from-fstab,allow_other 0 0\n"
    )
    r, pids = tracked(["mount", "-T", fstab, mp], mp)
    assert r.returncode == 0, r.stderr
    assert len(pids) == 1
    info = find_mount(mp)
    assert info.fstype == "fuse.shiftfs" and info.source == "from-fstab"
    check_table_view(mp)
    # ownership through the map, both directions
    with open(os.path.join(mp, "new"), "w"):
        pass
    assert os.stat(src / "new").st_uid == BASE
    r = subprocess.run(["umount", str(mp)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert reap(pids[0], 10, kill=False) is not None
    # the same line by source, with --fstab
    r, pids = tracked(["mount", "--fstab", fstab, src], mp)
    assert r.returncode == 0, r.stderr
    check_table_view(mp)


def test_fstab_coherent_reaches_shiftfs(dirs, tracked, scratch):
    """``-o shared`` never reaches shiftfs through mount(8) (it is mount(8)'s propagation
    flag): the second fstab view of one SOURCE is then refused as already served. Spelled
    ``coherent`` it passes, both views mount, and a chown through one shows through the
    other at once. (fstab's ``PROG#SOURCE`` form with type ``fuse`` runs this checkout's
    shiftfs, not whichever /usr/local/bin/shiftfs links to.)"""
    src, _ = dirs
    mps = [scratch / "v1", scratch / "v2"]
    for mp in mps:
        mp.mkdir()
    table = "backend=fuse,uidmap=100000:0:65536,gidmap=100000:0:65536"
    for word, both in (("shared", False), ("coherent", True)):
        fstab = scratch / f"fstab-{word}"
        fstab.write_text("".join(f"{SHIFTFS}#{src} {mp} fuse noauto,{table},{word} 0 0\n" for mp in mps))
        r1, _ = tracked(["mount", "-T", fstab, mps[0]], mps[0])
        assert r1.returncode == 0, r1.stderr
        assert find_mount(mps[0]).fstype == "fuse.shiftfs"
        r2, _ = tracked(["mount", "-T", fstab, mps[1]], mps[1])
        if not both:
            assert r2.returncode != 0 and "already" in r2.stderr, r2.stderr
            unmount_lazy(mps[0])
            wait_for(lambda: sourcelock_free(src), 10, what="the first daemon to let go of SOURCE")
            continue
        assert r2.returncode == 0, r2.stderr
        os.stat(os.path.join(mps[1], "f"))  # cached in the second view first
        os.chown(os.path.join(mps[0], "f"), 7, 8)
        st = os.stat(os.path.join(mps[1], "f"))
        assert (st.st_uid, st.st_gid) == (7, 8)
        assert os.stat(src / "f").st_uid == BASE + 7


def sourcelock_free(src) -> bool:
    from shiftfs.fs import sourcelock

    return sourcelock.probe(str(src)) is None


def test_fsname_and_subtype(dirs, shiftfs_mount):
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, "-o", "fsname=my-rootfs", source=src, mountpoint=mp)
    info = m.info
    assert info.fstype == "fuse.shiftfs"
    assert info.source == "my-rootfs"
    with open("/proc/self/mounts") as f:
        line = next(ln for ln in f if f" {mp} " in ln)
    assert line.split()[0] == "my-rootfs" and line.split()[2] == "fuse.shiftfs"
    # default fsname: the absolute SOURCE
    m2 = shiftfs_mount("--xattr")
    assert m2.info.source == m2.source


# -- backgrounding ------------------------------------------------------------------------


def test_exit_zero_means_live(dirs, tracked):
    src, mp = dirs
    for _i in range(3):
        r, pids = tracked([SHIFTFS, "mount", "--map", MAP, "-o", "backend=fuse", src, mp], mp)
        # no waiting: the moment the command returns, the mount answers
        assert r.returncode == 0, r.stderr
        st = os.stat(mp)
        assert st.st_dev != os.stat(src).st_dev
        check_table_view(mp)
        assert r.stdout == ""
        assert len(pids) == 1 and reap(pids[0], 0, kill=False) is None  # daemon running
        r2 = subprocess.run([SHIFTFS, "umount", str(mp)], capture_output=True, text=True)
        assert r2.returncode == 0, r2.stderr
        assert not is_mounted(mp)
        st = reap(pids[0], 10, kill=False)
        assert st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0


#: What runs a command as uid/gid 1000, without capabilities or groups.
AS_1000 = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--"]


def user_dirs(base, *names: str, uid: int = 1000) -> list:
    """Directories ``base/NAME`` made and owned by ``uid``."""
    out = []
    for n in names:
        (base / n).mkdir()
        os.chown(base / n, uid, uid)
        out.append(base / n)
    return out


def test_daemon_failure_reported(scratch, tracked):
    """A failure only the daemon can see (fusermount3 refuses a mount point the user cannot write)."""
    (src,) = user_dirs(scratch, "usrc")
    mp = scratch / "rootmp"
    mp.mkdir(mode=0o755)
    cmd = [*AS_1000, SHIFTFS, "mount", "--xattr", src, mp]
    r, pids = tracked(cmd, mp, env=USER_ENV)
    line = one_line_error(r, code=1)
    assert str(mp) in line
    assert "no write access" in line  # the reason fusermount3 gave, not a guess
    assert not is_mounted(mp)
    for p in pids:  # the daemon must not linger
        assert reap(p, 10, kill=False) is not None


def test_unprivileged_user_mount_and_umount(scratch, tracked):
    src, mp, logdir = user_dirs(scratch, "usrc", "ump", "ulog")
    cmd = [*AS_1000, SHIFTFS, "mount", "--xattr", "-o", f"log={logdir}/user.log", src, mp]
    r, pids = tracked(cmd, mp, env=USER_ENV)
    assert r.returncode == 0, r.stderr
    assert find_mount(mp).fstype == "fuse.shiftfs"
    run_as(1000, 1000, ["touch", f"{mp}/mine"], check=True)
    assert run_as(1000, 1000, ["stat", "-c", "%u:%g", f"{mp}/mine"]).stdout.strip() == "1000:1000"
    # without allow_other nobody else gets in, root included (FUSE's rule)
    assert run_as(1001, 1001, ["ls", str(mp)]).returncode != 0
    r = run_as(1000, 1000, [SHIFTFS, "umount", str(mp)])
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)
    assert reap(pids[0], 10, kill=False) is not None


# -- bad input: one line, exit 2, nothing mounted ----------------------------------------------

BAD_ARGS = {
    "map-overlap-disk": ["--map", "b:0:0:10", "--map", "b:5:100:10"],
    "map-overlap-view": ["--map", "b:0:0:10", "--map", "b:100:5:10"],
    "map-zero-count": ["--map", "b:100000:0:0"],
    "map-too-big": ["--map", "b:0:0:4294967296"],
    "map-past-max": ["--map", "u:4294967290:0:10"],
    "map-garbage": ["--map", "b:a:b:c"],
    "map-kind": ["--map", "x:1:2:3"],
    "map-short": ["--map", "b:1:2"],
    "map-negative": ["--map", "b:-1:0:10"],
    "uidmap-garbage": ["-o", "uidmap=1:2"],
    "gidmap-overlap": ["-o", "gidmap=0:0:10:5:100:10"],
    "unknown-opt": ["-o", "frobnicate"],
    "unknown-opt-value": ["-o", "allow_other,colour=blue"],
    "cache-bogus": ["-o", "cache=bogus"],
    "spin-bogus": ["-o", "spin=fast"],
    "spin-too-long": ["-o", "spin=20000"],
    "default-owner-bogus": ["--xattr", "-o", "default_owner=root"],
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_options(dirs, tracked, case):
    src, mp = dirs
    r, pids = tracked([SHIFTFS, "mount", *BAD_ARGS[case], src, mp], mp)
    one_line_error(r)
    assert pids == [] and not is_mounted(mp)


def test_bad_paths(dirs, tracked, scratch):
    src, mp = dirs
    f = scratch / "plainfile"
    f.write_text("")
    cases = {
        "source missing": ([scratch / "nope", mp], "does not exist"),
        "source not a dir": ([f, mp], "not a directory"),
        "mountpoint missing": ([src, scratch / "nomp"], "does not exist"),
        "mountpoint not a dir": ([src, f], "not a directory"),
    }
    for what, (args, words) in cases.items():
        r, pids = tracked([SHIFTFS, "mount", *args], mp)
        line = one_line_error(r)
        assert words in line, (what, line)
        assert pids == []
    r, pids = tracked([SHIFTFS, "mount", src], mp)  # MOUNTPOINT not given
    one_line_error(r)
    assert not is_mounted(mp)


def test_already_mounted(dirs, shiftfs_mount, tracked):
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, source=src, mountpoint=mp)
    r, pids = tracked([SHIFTFS, "mount", "--map", MAP, "-o", "backend=fuse", src, mp], mp)
    line = one_line_error(r)
    assert "already a shiftfs mount" in line
    assert pids == []
    # the first mount is untouched
    assert m.alive()
    check_table_view(mp)
    assert sum(1 for x in open("/proc/self/mountinfo") if f" {mp} " in x) == 1


def test_dev_fuse_not_accessible(scratch, tracked):
    """An unprivileged user in a mount namespace where /dev/fuse is a 0600 copy."""
    src, mp = scratch / "usrc", scratch / "ump"
    for d in (src, mp):
        d.mkdir()
        os.chown(d, 1000, 1000)
    before = os.stat("/dev/fuse")
    node = scratch / "fuse0600"
    script = (
        f"set -e; mknod {node} c 10 229; chmod 0600 {node}; mount --bind {node} /dev/fuse; "
        f"exec setpriv --reuid=1000 --regid=1000 --clear-groups -- {SHIFTFS} mount --xattr {src} {mp}"
    )
    r, pids = tracked(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], mp, env=USER_ENV)
    line = one_line_error(r)
    assert "/dev/fuse" in line
    assert pids == [] and not is_mounted(mp)
    after = os.stat("/dev/fuse")
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode)
    assert after.st_rdev == before.st_rdev


def test_usage_errors(tracked, scratch):
    for argv in ([], ["mount"], ["bogus-subcommand-that-is-not-a-dir", "x", "y", "z"], ["mount", "--nope", "a", "b"]):
        r, pids = tracked([SHIFTFS, *argv], scratch)
        assert r.returncode == 2, (argv, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
        assert pids == []


# -- umount ----------------------------------------------------------------------------------


def test_umount(dirs, shiftfs_mount, scratch):
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, source=src, mountpoint=mp)
    r = m.umount()
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)
    assert m.status is not None and os.WIFEXITED(m.status) and os.WEXITSTATUS(m.status) == 0
    # not a mount / not there: one line, exit 2
    r = subprocess.run([SHIFTFS, "umount", str(mp)], capture_output=True, text=True)
    assert "not a shiftfs mount" in one_line_error(r)
    r = subprocess.run([SHIFTFS, "umount", str(scratch / "missing")], capture_output=True, text=True)
    one_line_error(r)
    r = subprocess.run([SHIFTFS, "umount", "/proc"], capture_output=True, text=True)
    one_line_error(r)
    assert is_mounted("/proc")


def test_umount_busy_and_lazy(dirs, shiftfs_mount):
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, source=src, mountpoint=mp)
    fd = os.open(os.path.join(mp, "f"), os.O_RDONLY)
    try:
        r = subprocess.run([SHIFTFS, "umount", str(mp)], capture_output=True, text=True)
        one_line_error(r, code=1)
        assert is_mounted(mp)
        r = subprocess.run([SHIFTFS, "umount", "--lazy", str(mp)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mp)
        assert os.read(fd, 5) == b"hello"  # still served until the last user goes
        assert m.alive()
    finally:
        os.close(fd)
    assert m.wait_exit(10) is not None


# -- signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_daemon_exits_cleanly_on_signal(dirs, shiftfs_mount, sig):
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, source=src, mountpoint=mp)
    check_table_view(mp)
    os.kill(m.pid, sig)
    st = m.wait_exit(15)
    assert st is not None, "daemon still running"
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, st
    assert not is_mounted(mp)
    assert not os.path.exists(f"/proc/{m.pid}")
    assert "signal" in m.log_text() and "unmounted" in m.log_text()


def foreground_sigint(src, mp, backend: str, timeout: float) -> str:
    """``shiftfs mount -f`` on ``backend``: the view is there while it runs, SIGINT ends it with
    exit 0 and the mount gone. Returns its stderr."""
    p = subprocess.Popen(
        [SHIFTFS, "mount", "-f", "--map", MAP, "-o", f"backend={backend}", str(src), str(mp)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: is_mounted(mp) or p.poll() is not None, 30, what="foreground mount")
        assert p.poll() is None, p.communicate()
        check_table_view(mp)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        assert not is_mounted(mp)
        return err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        unmount_lazy(mp)


def test_foreground_sigint(dirs):
    src, mp = dirs
    err = foreground_sigint(src, mp, "fuse", timeout=15)
    assert "Traceback" not in err


def test_signal_while_busy(dirs, shiftfs_mount):
    """SIGTERM with a file open: the daemon still exits, the mount goes away."""
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, source=src, mountpoint=mp)
    fd = os.open(os.path.join(mp, "f"), os.O_RDONLY)
    try:
        os.kill(m.pid, signal.SIGTERM)
        st = m.wait_exit(15)
        assert st is not None and os.WIFEXITED(st)
        assert not is_mounted(mp)
    finally:
        try:
            os.close(fd)
        except OSError as e:  # the flush on close finds the daemon gone
            assert e.errno == errno.ENOTCONN


def test_signals_while_requests_keep_coming(dirs, shiftfs_mount):
    """A stream of requests with no gap does not starve the signal handler.

    The request loop serves requests that are already queued without going
    through trio's scheduler (shiftfs.fs.loop), but only a bounded number in a
    row: SIGUSR1 and SIGTERM are still answered while clients keep it busy.
    """
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, "-o", "cache=never", source=src, mountpoint=mp, stats=True)
    stop = threading.Event()

    def hammer() -> None:
        path = os.path.join(mp, "f")
        while not stop.is_set():
            try:
                os.stat(path)
            except OSError:
                return  # unmounted

    workers = [threading.Thread(target=hammer) for _ in range(3)]
    for t in workers:
        t.start()
    try:
        time.sleep(0.3)
        before = m.read_stats()["counts"].get("getattr", 0)
        time.sleep(0.3)
        assert m.read_stats()["counts"].get("getattr", 0) > before
        os.kill(m.pid, signal.SIGTERM)
        st = m.wait_exit(15)
        assert st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, st
        assert not is_mounted(mp)
    finally:
        stop.set()
        for t in workers:
            t.join(30)


# -- caching -----------------------------------------------------------------------------------


def test_cache_never_sees_backing_changes(dirs, shiftfs_mount):
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, "-o", "cache=never", source=src, mountpoint=mp)
    view = lambda *p: os.path.join(mp, *p)  # noqa: E731
    assert sorted(os.listdir(mp)) == ["f"]
    assert not os.path.exists(view("late"))
    (src / "late").write_bytes(b"1")
    os.chown(src / "late", BASE + 9, BASE + 9)
    assert os.path.exists(view("late"))
    assert sorted(os.listdir(mp)) == ["f", "late"]
    assert os.stat(view("late")).st_uid == 9
    # content and size changes behind the mount
    assert open(view("f"), "rb").read() == b"hello"
    (src / "f").write_bytes(b"changed content")
    assert os.stat(view("f")).st_size == 15
    assert open(view("f"), "rb").read() == b"changed content"
    # ownership and mode changes
    os.chown(src / "f", BASE + 1, BASE + 2)
    os.chmod(src / "f", 0o600)
    st = os.stat(view("f"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1, 2, 0o600)
    # removal and replacement
    os.unlink(src / "late")
    assert not os.path.exists(view("late"))
    assert sorted(os.listdir(mp)) == ["f"]
    os.rename(src / "f", src / "g")
    (src / "f").write_bytes(b"another inode")
    assert open(view("f"), "rb").read() == b"another inode"
    assert open(view("g"), "rb").read() == b"changed content"
    os.mkdir(src / "d")
    (src / "d" / "x").write_bytes(b"")
    assert os.listdir(view("d")) == ["x"]
    m.umount()


def test_cache_auto_catches_up(dirs, shiftfs_mount):
    src, mp = dirs
    shiftfs_mount("--map", MAP, "-o", "cache=auto", source=src, mountpoint=mp)
    assert not os.path.exists(os.path.join(mp, "late"))
    (src / "late").write_bytes(b"1")
    wait_for(lambda: os.path.exists(os.path.join(mp, "late")), 5, what="entry to show up within ~1 s")


def test_default_cache_is_long(dirs, shiftfs_mount):
    """Default (always): the mount owns SOURCE; entries, attributes and misses are cached."""
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, source=src, mountpoint=mp, stats=True)
    os.stat(os.path.join(mp, "f"))
    assert not os.path.exists(os.path.join(mp, "missing"))
    before = m.read_stats()["counts"]
    for _ in range(50):
        os.stat(os.path.join(mp, "f"))
        assert not os.path.exists(os.path.join(mp, "missing"))
    after = m.read_stats()["counts"]
    for op in ("lookup", "getattr"):
        assert after.get(op, 0) == before.get(op, 0), (op, before, after)


def test_log_and_stats_files_not_world_writable(dirs, shiftfs_mount):
    """The daemon runs with umask 0; the files it creates for the admin must not be 0666."""
    src, mp = dirs
    m = shiftfs_mount("--map", MAP, source=src, mountpoint=mp, stats=True)
    os.stat(os.path.join(mp, "f"))
    assert m.read_stats()["counts"]
    for path in (m.log, m.stats):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o022 == 0, (path, oct(mode))
    assert "mounted" in m.log_text()


# -- the kernel backend (-o backend=auto|kernel|fuse) -----------------------------------------


def _info_lines(r):
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def test_auto_picks_kernel_and_says_so(dirs, tracked):
    """Root, ext4: ``auto`` makes an idmapped bind mount, says so in one line, runs no daemon."""
    src, mp = dirs
    r, pids = tracked([SHIFTFS, "mount", "--map", MAP, src, mp], mp)
    assert r.returncode == 0, r.stderr
    lines = _info_lines(r)
    assert len(lines) == 1 and lines[0].startswith("shiftfs: backend kernel:"), r.stderr
    assert pids == []
    info = find_mount(mp)
    assert "idmapped" in info.options and {"nosuid", "nodev"} <= set(info.options), info.options
    check_table_view(mp)
    # 'already mounted' and umount know it
    r2, _ = tracked([SHIFTFS, "mount", "--map", MAP, src, mp], mp)
    assert "already a shiftfs mount" in one_line_error(r2)
    r3 = subprocess.run([SHIFTFS, "umount", str(mp)], capture_output=True, text=True)
    assert r3.returncode == 0 and r3.stderr == "", r3.stderr
    assert not is_mounted(mp)
    r4 = subprocess.run([SHIFTFS, "umount", str(mp)], capture_output=True, text=True)
    assert "not a shiftfs mount" in one_line_error(r4)


def test_kernel_backend_helper_form_and_flags(dirs, tracked):
    """The helper form mount.fuse3 runs (with its trailing dev,suid); ro and noexec apply to the bind."""
    src, mp = dirs
    r, pids = tracked(
        [SHIFTFS, src, mp, "-o", "backend=kernel,ro,noexec,uidmap=100000:0:65536,gidmap=100000:0:65536,dev,suid"], mp
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr  # backend asked for: nothing to say
    assert pids == []
    opts = set(find_mount(mp).options)
    assert {"ro", "noexec", "nosuid", "nodev", "idmapped"} <= opts, opts
    check_table_view(mp)
    assert errno_of(open, os.path.join(mp, "new"), "w") == errno.EROFS
    # explicit suid,dev clear the defaults
    subprocess.run([SHIFTFS, "umount", str(mp)], check=True)
    r, _ = tracked([SHIFTFS, "mount", "--map", MAP, "-o", "backend=kernel,suid,dev", src, mp], mp)
    assert r.returncode == 0, r.stderr
    opts = set(find_mount(mp).options)
    assert not {"nosuid", "nodev"} & opts, opts


def test_kernel_backend_mountpoint_with_space_and_utf8(scratch, tracked):
    """The mount table escapes a space as \\040 and keeps UTF-8 bytes: umount still finds the mount."""
    src, mp = scratch / "src", scratch / "mount point ü"
    src.mkdir()
    mp.mkdir()
    r, pids = tracked([SHIFTFS, "mount", "--map", MAP, "-o", "backend=kernel", src, mp], mp)
    assert r.returncode == 0 and pids == [], r.stderr
    assert "idmapped" in find_mount(mp).options
    r2 = subprocess.run([SHIFTFS, "umount", str(mp)], capture_output=True, text=True)
    assert r2.returncode == 0 and r2.stderr == "", r2.stderr
    assert not is_mounted(mp)


def test_mount_t_fuse_shiftfs_kernel_backend(dirs, tracked, shiftfs_on_path):
    """``mount -t fuse.shiftfs -o backend=kernel`` (the shared /usr/local/bin/shiftfs must be this checkout)."""
    if os.path.realpath(shiftfs_on_path) != os.path.realpath(SHIFTFS):
        pytest.skip(f"{shiftfs_on_path} runs another checkout ({os.path.realpath(shiftfs_on_path)})")
    src, mp = dirs
    r, pids = tracked(
        ["mount", "-t", "fuse.shiftfs", src, mp, "-o", "backend=kernel,uidmap=100000:0:65536,gidmap=100000:0:65536"], mp
    )
    assert r.returncode == 0, r.stderr
    assert pids == [] and "idmapped" in find_mount(mp).options
    check_table_view(mp)
    r = subprocess.run(["umount", str(mp)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)


def test_kernel_backend_foreground(dirs):
    """``-f``: the mount lives as long as the command; SIGINT takes it down."""
    src, mp = dirs
    foreground_sigint(src, mp, "kernel", timeout=20)


def test_auto_falls_back_to_fuse(dirs, tracked, shiftfs_mount, scratch):
    """A SOURCE whose filesystem cannot be idmapped (here: a FUSE mount) gets FUSE, with the reason."""
    src, mp = dirs
    inner = shiftfs_mount("-o", "backend=fuse", source=src, mountpoint=mp)  # identity FUSE: SOURCE for the next
    mp2 = scratch / "mp2"
    mp2.mkdir()
    r, pids = tracked(
        [SHIFTFS, "mount", "--map", "b:100005:0:10", "-o", "log=" + str(scratch / "l"), inner.mountpoint, mp2], mp2
    )
    assert r.returncode == 0, r.stderr
    lines = _info_lines(r)
    assert len(lines) == 1 and lines[0].startswith("shiftfs: backend fuse:") and "idmapped" in lines[0], r.stderr
    assert len(pids) == 1 and find_mount(mp2).fstype == "fuse.shiftfs"
    assert os.stat(mp2 / "f").st_uid == 0  # disk 100005 -> inner (identity) 100005 -> outer view 0
    # backend=kernel there: one line, exit 1, nothing mounted
    unmount_lazy(mp2)
    reap(pids[0], 10)
    r, pids = tracked([SHIFTFS, "mount", "--map", MAP, "-o", "backend=kernel", inner.mountpoint, mp2], mp2)
    line = one_line_error(r, code=1)
    assert "kernel backend" in line and "backend=fuse" in line
    assert pids == [] and not is_mounted(mp2)


def test_auto_unprivileged_user_gets_fuse(scratch, tracked):
    src, mp = user_dirs(scratch, "usrc", "ump")
    cmd = [*AS_1000, SHIFTFS, "mount", "--map", "b:1000:0:1", "-o", f"log={scratch}/u.log", src, mp]
    with open(scratch / "u.log", "w"):
        pass
    os.chown(scratch / "u.log", 1000, 1000)
    r, pids = tracked(cmd, mp, env=USER_ENV)
    assert r.returncode == 0, r.stderr
    lines = _info_lines(r)
    assert len(lines) == 1 and lines[0].startswith("shiftfs: backend fuse:") and "CAP_SYS_ADMIN" in lines[0], r.stderr
    assert find_mount(mp).fstype == "fuse.shiftfs"
    r = run_as(1000, 1000, [SHIFTFS, "umount", str(mp)])
    assert r.returncode == 0, r.stderr
    assert reap(pids[0], 10, kill=False) is not None


@pytest.mark.parametrize(
    "args,words,code",
    [
        (["--xattr", "-o", "backend=kernel"], "table mode only", 2),
        (["--map", MAP, "-o", "backend=turbo"], "backend=auto, backend=kernel or backend=fuse", 2),
        (["--map", MAP, "-o", "backend=kernel,sync"], "bind mount cannot carry", 2),
    ],
)
def test_kernel_backend_bad_input(dirs, tracked, args, words, code):
    src, mp = dirs
    r, pids = tracked([SHIFTFS, "mount", *args, src, mp], mp)
    assert words in one_line_error(r, code)
    assert pids == [] and not is_mounted(mp)


def test_kernel_backend_fuse_only_options_warned(dirs, tracked):
    """FUSE-only options are ignored on the kernel backend, in the one line it prints."""
    src, mp = dirs
    r, pids = tracked([SHIFTFS, "mount", "--map", MAP, "-o", "cache=never,nowriteback", src, mp], mp)
    assert r.returncode == 0, r.stderr
    lines = _info_lines(r)
    assert len(lines) == 1 and "ignoring FUSE-only -o cache,nowriteback" in lines[0], r.stderr
    assert pids == [] and "idmapped" in find_mount(mp).options
