"""Bad input to every command: one line on stderr, the right exit code, nothing half-done (issue 8).

Exit codes: 2 for usage errors (wrong or missing arguments, bad maps,
unusable paths), 1 when the operation itself failed; ``shiftfs run`` and
``shiftfs exec`` use 125 for their own failures (the command's status is
theirs to pass on). After a failed mount nothing is mounted and no daemon is
left; after a failed import the tree holds no half-written file.

``tests/test_cli.py`` covers the ``mount`` option and map matrix; this file
covers the other commands and the environment: unreadable SOURCE, busy,
stale and hung mount points, no usable ``/dev/fuse``, an unwritable log,
corrupt archives.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import fsutil
import pytest
from fsutil import SHIFTFS, Mount, is_mounted, shiftfs_pids
from records import RECORD
from rel_util import make_pair, work

U = 1000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, other users)")


def run(cmd, *, env=None, timeout=60, input=None, cwd=None):
    """Run a command that may mount; returns (result, daemons it left behind)."""
    r, pids = fsutil.spawn_daemons([str(c) for c in cmd], env=env, timeout=timeout, input=input)
    return r, pids


def one_line(r, code: int) -> str:
    """The command failed with ``code`` and said so in exactly one line."""
    lines = r.stderr.splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].strip(), f"want one line on stderr, got {len(lines)}:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return lines[0]


def nothing_left(mp, pids) -> None:
    """No mount, and every process the command forked off exits by itself."""
    running = [p for p in pids if fsutil.reap(p, 5, kill=False) is None]
    for p in running:
        fsutil.reap(p, 5)
    assert not running, f"a daemon was left running: {running}"
    assert not is_mounted(mp), f"{mp} is still mounted"
    assert shiftfs_pids(mp) == []


@pytest.fixture
def pair(work):
    src, mp = make_pair(work)
    (src / "f").write_text("f")
    return src, mp


# -- the command line itself ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,code,words",
    [
        ([], 2, "no command"),
        (["frobnicate"], 2, "unknown command"),
        (["--frobnicate"], 2, "unrecognized"),
        (["mount"], 2, "required"),
        (["mount", "--map"], 2, "expected one argument"),
        (["mount", "-o"], 2, "expected one argument"),
        (["umount"], 2, "required"),
        (["umount", "-x", "/tmp"], 2, "unrecognized"),
        (["export"], 2, "required"),
        (["export", "--format", "zip", "/tmp"], 2, "invalid choice"),
        (["import"], 2, "required"),
        (["import", "only-one"], 2, "required"),
        (["stat"], 2, "required"),
        (["ls"], 2, "required"),
        (["ls", "--map", "b:1:2", "/tmp"], 2, "map"),
        (["absorb", "/tmp/nowhere-x"], 2, "--owner"),
        (["absorb", "--owner", "no-such-user-xyz", "/tmp"], 2, "no user"),
        (["materialize"], 2, "required"),
        (["run"], 125, "no ROOT"),
        (["exec"], 125, "no COMMAND"),
    ],
)
def test_usage_errors(argv, code, words):
    r, pids = run([SHIFTFS, *argv])
    line = one_line(r, code)
    assert words in line, line
    assert pids == []


def test_missing_and_wrong_paths_for_every_command(work):
    f = work / "plainfile"
    f.write_text("x")
    nope = work / "nope"
    root = work / "root"
    root.mkdir()
    cases = [
        (["export", nope], 1, "no such directory"),
        (["export", f], 1, "not a directory"),
        (["export", "-o", work / "no" / "dir" / "x.tar", root], 1, "cannot create"),
        (["import", work / "no-archive.tar", root], 2, "no such archive"),
        (["stat", nope], 1, "no such file"),
        (["ls", nope], 1, "no such directory"),
        (["ls", f], 1, "not a directory"),
        (["absorb", "--owner", str(U), nope], 1, "no such directory"),
        (["materialize", nope], 1, "no such directory"),
        (["materialize", f], 1, "not a directory"),
        (["run", nope, "--", "true"], 125, "not a directory"),
        (["run", f, "--", "true"], 125, "not a directory"),
        (["run", root], 125, "no COMMAND"),
        (["exec", "--shift", str(nope), "--", "true"], 125, "does not exist"),
        (["exec", "--shift", str(f), "--", "true"], 125, "not a directory"),
        (["umount", nope], 2, "does not exist"),
        (["umount", root], 2, "not a shiftfs mount"),
    ]
    for argv, code, words in cases:
        r, pids = run([SHIFTFS, *argv])
        line = one_line(r, code)
        assert words in line, (argv, line)
        assert pids == [], argv
    assert not nope.exists()
    assert os.listdir(root) == []


# -- mount: environment problems ---------------------------------------------------------------------
def test_unreadable_source(work, pair):
    src, mp = pair
    os.chmod(src, 0o700)
    os.chown(mp, U, U)
    r, pids = run(
        ["setpriv", f"--reuid={U}", f"--regid={U}", "--clear-groups", "--", SHIFTFS, "mount", "--xattr", src, mp],
        env=fsutil.USER_ENV,
    )
    assert "not readable" in one_line(r, 2)
    nothing_left(mp, pids)


def test_unprivileged_user_without_access_to_the_mountpoint(work, pair):
    src, mp = pair
    os.chown(src, U, U)  # SOURCE is the user's, the mount point root's (0755)
    r, pids = run(
        ["setpriv", f"--reuid={U}", f"--regid={U}", "--clear-groups", "--", SHIFTFS, "mount", "--xattr", src, mp],
        env=fsutil.USER_ENV,
    )
    line = one_line(r, 1)
    assert "write access" in line or "ermission" in line, line
    nothing_left(mp, pids)


def test_unwritable_log_leaves_nothing_mounted(work, pair):
    src, mp = pair
    r, pids = run(
        [SHIFTFS, "mount", "--map", "b:100000:0:65536", src, mp, "-o", f"backend=fuse,log={work}/no/such/dir/log"]
    )
    assert "log" in one_line(r, 1)
    nothing_left(mp, pids)


def test_no_dev_fuse(work, pair):
    """In a private mount namespace: /dev without fuse (usage error), and /dev/fuse that is
    not the FUSE device (the daemon fails at mount time: one line, nothing left)."""
    src, mp = pair
    for script, code, words in [
        (f"mount -t tmpfs none /dev && exec {SHIFTFS} mount --xattr {src} {mp}", 2, "/dev/fuse is missing"),
        (f"mount --bind /dev/null /dev/fuse && exec {SHIFTFS} mount --xattr {src} {mp}", 1, "cannot mount"),
        (
            f"mount --bind /dev/null /dev/fuse && exec setpriv --reuid={U} --regid={U} --clear-groups -- "
            f"{SHIFTFS} mount --xattr {src} {mp}",
            None,
            None,
        ),
    ]:
        if "setpriv" in script:
            os.chown(src, U, U)
            os.chown(mp, U, U)
        r, pids = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=fsutil.USER_ENV)
        line = one_line(r, code if code is not None else r.returncode)
        assert r.returncode in (1, 2), (r.returncode, line)
        if words:
            assert words in line, line
        nothing_left(mp, pids)
    assert stat.S_ISCHR(os.stat("/dev/fuse").st_mode)


def test_already_mounted_and_busy(work, pair):
    src, mp = pair
    with Mount(src, mp, mode="table") as m:
        r, pids = run([SHIFTFS, "mount", "--xattr", src, mp])
        assert "already a shiftfs mount" in one_line(r, 2)
        assert pids == [] and m.alive()
        assert sum(1 for x in open("/proc/self/mountinfo") if f" {mp} " in x) == 1
        # busy: a process has its cwd inside
        sleeper = subprocess.Popen(["sleep", "60"], cwd=str(mp))
        try:
            r, _ = run([SHIFTFS, "umount", mp])
            assert "cannot unmount" in one_line(r, 1)
            assert is_mounted(mp) and m.alive()
            r, _ = run([SHIFTFS, "umount", "--lazy", mp])
            assert r.returncode == 0 and r.stderr == "", r.stderr
            assert not is_mounted(mp)
        finally:
            sleeper.kill()
            sleeper.wait()
        assert fsutil.reap(m.pid, 10) is not None
        m.pid = None


@pytest.mark.parametrize("mode", ["table", "xattr"])
def test_stale_mountpoint_recovers(work, pair, mode):
    """The daemon killed: 'shiftfs mount' on the stale point replaces it, 'shiftfs umount' clears it;
    also when the kernel never asked the dead daemon anything."""
    src, mp = pair
    for fresh in (True, False):
        for recover in ("mount", "umount"):
            m = Mount(src, mp, mode=mode).mount()
            if not fresh:
                os.listdir(mp)
                os.stat(mp / "f")  # attributes cached in the kernel
            os.kill(m.pid, signal.SIGKILL)
            fsutil.reap(m.pid, 10)
            m.pid = None
            if recover == "mount":
                m.mount()
                assert (mp / "f").read_text() == "f"
                assert sum(1 for x in open("/proc/self/mountinfo") if f" {mp} " in x) == 1
                m.umount()
            else:
                r, pids = run([SHIFTFS, "umount", mp])
                assert r.returncode == 0 and r.stderr == "", r.stderr
                nothing_left(mp, pids)


def test_umount_with_a_hung_daemon(work, pair):
    """A stopped daemon must not hang 'shiftfs umount' (the mount table decides, not a stat)."""
    src, mp = pair
    m = Mount(src, mp, mode="xattr").mount()
    os.kill(m.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r, pids = run([SHIFTFS, "umount", mp], timeout=30)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 20
        assert not is_mounted(mp)
    finally:
        os.kill(m.pid, signal.SIGCONT)
    assert fsutil.reap(m.pid, 10) is not None  # and it goes away once it runs again
    m.pid = None


# -- corrupt archives ----------------------------------------------------------------------------------
def _good_tar(path: Path, n=20) -> bytes:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            data = bytes([65 + i % 26]) * 5000
            ti = tarfile.TarInfo(f"d/f{i}")
            ti.size, ti.uid, ti.gid, ti.mode = len(data), 100, 100, 0o644
            tf.addfile(ti, io.BytesIO(data))
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["garbage", "empty", "gzip-garbage", "header-only", "stdin-garbage"])
def test_import_of_garbage(work, kind):
    root = work / "root"
    root.mkdir()
    arch = work / "a.tar"
    if kind == "garbage" or kind == "stdin-garbage":
        arch.write_bytes(os.urandom(7000))
    elif kind == "empty":
        arch.write_bytes(b"")
    elif kind == "gzip-garbage":
        import gzip

        arch = work / "a.tar.gz"
        arch.write_bytes(gzip.compress(os.urandom(3000)))
    elif kind == "header-only":
        arch.write_bytes(_good_tar(work / "g.tar")[:300])
    if kind == "stdin-garbage":
        r, pids = run([SHIFTFS, "import", "-", root], input=arch.read_bytes().decode("latin-1"))
    else:
        r, pids = run([SHIFTFS, "import", arch, root])
    line = one_line(r, 1)
    assert "archive" in line or "tar" in line, line
    assert pids == []
    assert os.listdir(root) == [], os.listdir(root)


def test_import_of_truncated_archive_leaves_no_half_written_file(work):
    root = work / "root"
    root.mkdir()
    data = _good_tar(work / "g.tar")
    (work / "t.tar").write_bytes(data[:30000])  # five whole members, then the sixth cut short
    r, pids = run([SHIFTFS, "import", work / "t.tar", root])
    line = one_line(r, 1)
    assert "damaged" in line, line
    for p in sorted((root / "d").iterdir()):
        i = int(p.name[1:])
        assert p.read_bytes() == bytes([65 + i % 26]) * 5000, f"{p.name}: half written"
        assert os.getxattr(p, RECORD), f"{p.name}: no record"
