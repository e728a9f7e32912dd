"""One SOURCE, one truth: one daemon per SOURCE (a lock on the backing
directory), ``-o shared`` for coherent views by several daemons, a second
``shiftfs run`` of ROOT joining the first, and a killed daemon never
blocking the next mount."""

from __future__ import annotations

import os
import signal
import stat
import subprocess

import pytest
from asuser import USER_ENV
from fsutil import SHIFTFS, mount_shiftfs, reap, unmount_lazy, wait_for
from ns_util import (
    HOST_USR,
    ROOT_USER,
    User,
    make_host_root,
    run_argv,
    stop,
    users_fixture,
)

from shiftfs.container import launcher, preflight
from shiftfs.container import run as runmod
from shiftfs.errors import UsageError
from shiftfs.fs import sourcelock
from shiftfs.fs.options import parse_options

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts and creates test users: run as root"),
]

MAP = "b:100000:0:65536"


users = users_fixture(1, 0)


@pytest.fixture(params=["root", "user"])
def who(request, users) -> User:
    if request.param == "root":
        return ROOT_USER
    if preflight.blocked_component(runmod.__file__, 65533, {65533}, 4):
        pytest.skip("the checkout is not reachable by other users (see README)")
    return users[0]


def _dirs(wd: str, who: User, *names: str) -> list[str]:
    out = []
    for name in names:
        p = os.path.join(wd, name)
        os.mkdir(p, 0o700)
        os.chown(p, who.uid, who.gid)
        out.append(p)
    return out


def _mount_cmd(who: User, *args: str) -> subprocess.CompletedProcess:
    cmd = [SHIFTFS, "mount", *args]
    if not who.is_root:
        cmd = ["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}", "--clear-groups", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=USER_ENV)


def _as(who: User) -> dict:
    return {} if who.is_root else {"as_uid": who.uid, "as_gid": who.gid}


# --- one daemon per SOURCE -------------------------------------------------------


@pytest.mark.parametrize("mode", ["xattr", "table"])
def test_second_mount_refused(who, wd, mode):
    src, mp1, mp2 = _dirs(wd, who, "src", "mp1", "mp2")
    os.symlink("src", os.path.join(wd, "alias"))
    args = ["--xattr"] if mode == "xattr" else ["--map", f"u:{who.uid}:0:1", "--map", f"g:{who.gid}:0:1"]
    with mount_shiftfs(src, mp1, *args, "-o", "backend=fuse", **_as(who)) as m:
        # The daemon alone holds the lock (its descriptor is O_CLOEXEC: nothing it started has it).
        assert sourcelock._lock_pids(os.stat(src)) == [m.pid]
        # The same inode however it is spelled: through a symlink, with a trailing "/.".
        for spelling in (os.path.join(wd, "alias"), src + "/."):
            r = _mount_cmd(who, *args, "-o", "backend=fuse", spelling, mp2)
            assert r.returncode != 0
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1, r.stderr
            assert "already served by the shiftfs daemon" in lines[0]
            assert f"(pid {m.pid}) on {mp1}" in lines[0]
            assert f"shiftfs umount {mp1}" in lines[0] and "-o shared" in lines[0]
            assert not os.path.ismount(mp2)
        # A shared mount next to an exclusive one is refused too.
        r = _mount_cmd(who, *args, "-o", "backend=fuse,shared", src, mp2)
        assert r.returncode != 0 and "already served" in r.stderr
    # Once the first is gone, the second mount works.
    with mount_shiftfs(src, mp2, *args, "-o", "backend=fuse", **_as(who)):
        pass


def test_kill9_leaves_no_stale_lock(who, wd):
    src, mp1, mp2 = _dirs(wd, who, "src", "mp1", "mp2")
    with mount_shiftfs(src, mp1, "--xattr", **_as(who)) as m:
        os.kill(m.pid, signal.SIGKILL)
        reap(m.pid, 10.0)
        with mount_shiftfs(src, mp2, "--xattr", **_as(who)) as m2:
            subprocess.run(who.wrap(["touch", os.path.join(mp2, "f")]), check=True, timeout=30)
            assert os.path.exists(os.path.join(src, "f"))
            # ...and the new daemon holds the lock: a third mount is refused naming it.
            r = _mount_cmd(who, "--xattr", src, mp1)
            assert r.returncode != 0 and f"(pid {m2.pid}) on {mp2}" in r.stderr
        unmount_lazy(mp1)


def test_kernel_backend_refused_next_to_an_exclusive_daemon(wd):
    src, mp1, mp2 = _dirs(wd, ROOT_USER, "src", "mp1", "mp2")
    with mount_shiftfs(src, mp1, "--map", MAP, "-o", "backend=fuse"):
        r = _mount_cmd(ROOT_USER, "--map", MAP, "-o", "backend=kernel", src, mp2)
        assert r.returncode != 0 and "already served" in r.stderr, r.stderr
        assert not os.path.ismount(mp2)


# --- -o shared ----------------------------------------------------------------------


def _owner(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@pytest.mark.parametrize("cache", ["never", "auto"])
@pytest.mark.parametrize("mode", ["xattr", "table"])
def test_shared_mounts_see_each_others_chown(wd, mode, cache):
    src, mp1, mp2 = _dirs(wd, ROOT_USER, "src", "mp1", "mp2")
    args = ["--xattr"] if mode == "xattr" else ["--map", MAP]
    opts = ["-o", f"shared,cache={cache}"]
    # cache=never: at once; cache=auto: within its 1 s timeout (README, caching).
    within = 0.2 if cache == "never" else 1.5
    with mount_shiftfs(src, mp1, *args, *opts) as m1, mount_shiftfs(src, mp2, *args, *opts) as m2:
        assert m1.pid != m2.pid
        a, b = mp1, mp2
        with open(os.path.join(a, "f"), "w") as f:
            f.write("x")
        os.symlink("f", os.path.join(a, "l"))
        os.mkfifo(os.path.join(a, "p"))
        names = ("f", "l", "p")
        for n in names:  # the other view has them cached now
            os.lstat(os.path.join(b, n))
        for round_, (uid, gid) in enumerate([(1000, 1000), (2000, 2001), (0, 0)]):
            for n in names:
                os.chown(os.path.join(a, n), uid, gid, follow_symlinks=False)
            for n in names:
                wait_for(
                    lambda n=n: _owner(os.path.join(b, n)) == (uid, gid),
                    timeout=within,
                    what=f"{n} owned by {uid}:{gid} through the other mount (round {round_})",
                )
            a, b = b, a  # the other way round next
        os.chmod(os.path.join(mp2, "f"), 0o4750)
        wait_for(lambda: stat.S_IMODE(os.stat(os.path.join(mp1, "f")).st_mode) == 0o4750, timeout=within)
        assert stat.S_ISFIFO(os.lstat(os.path.join(mp2, "p")).st_mode)


def test_shared_options():
    cfg = parse_options(["shared"], [], True, "s", "m")
    assert (cfg.shared, cfg.cache, cfg.writeback) == (True, "never", False)
    cfg = parse_options(["shared,cache=auto"], [], True, "s", "m")
    assert (cfg.cache, cfg.writeback) == ("auto", False)
    for bad in ("shared,cache=always", "shared,writeback"):
        with pytest.raises(UsageError, match="-o shared"):
            parse_options([bad], [], True, "s", "m")


def test_shared_refuses_cache_always():
    r = subprocess.run(
        [SHIFTFS, "mount", "--xattr", "-o", "shared,cache=always", "/", "/"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "-o shared needs coherent caching" in r.stderr


# --- shiftfs run: a second run joins the first -------------------------------------------


def _run_argv(who: User, root: str, *args: str) -> list[str]:
    return who.wrap([*run_argv(), *HOST_USR, *args, root, "--", "sh", "-c"])


def _start_first(who: User, root: str, wd: str, script: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    """The first ``shiftfs run`` of ROOT, running ``sh -c SCRIPT``, once SCRIPT made /ready."""
    first = subprocess.Popen([*_run_argv(who, root), script], stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=wd)
    try:
        wait_for(lambda: os.path.exists(os.path.join(root, "ready")), timeout=30, what="the first run to start")
    except BaseException:
        stop(first)
        raise
    return first


def test_second_run_joins_the_first(who, wd):
    root = make_host_root(os.path.join(wd, "root"), who)
    os.chmod(root, 0o700)
    first = _start_first(
        who, root, wd, "echo $$ > /ready; while [ ! -e /done ]; do sleep 0.05; done; stat -c '%u:%g %a' /made"
    )
    try:
        second = subprocess.run(
            [
                *_run_argv(who, root),
                "touch /made && chown 1000:1000 /made && chmod 640 /made && stat -c '%u:%g %a' /made && "
                "tr '\\0' ' ' < /proc/$(cat /ready)/cmdline && touch /done",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=wd,
        )
        assert second.returncode == 0, second.stderr
        assert "joining the running container" in second.stderr  # --bind given again: said, not refused
        out = second.stdout.split(maxsplit=2)
        assert out[0] == "1000:1000" and out[1] == "640"
        assert "while [ ! -e /done ]" in out[2]  # the first run's shell: one pid namespace
        # The first run sees the file with its owner: one view.
        stdout, stderr = first.communicate(timeout=60)
        assert first.returncode == 0, stderr
        assert stdout.split()[:2] == ["1000:1000", "640"]
        # On the host, the file is the user's; the record has the view owner.
        assert os.lstat(os.path.join(root, "made")).st_uid == who.uid
    finally:
        stop(first)


def test_run_new_and_exec_refused_while_a_run_lives(who, wd):
    root = make_host_root(os.path.join(wd, "root"), who)
    os.chmod(root, 0o700)
    first = _start_first(who, root, wd, "touch /ready; while [ ! -e /done ]; do sleep 0.05; done", subprocess.DEVNULL)
    try:
        r = subprocess.run([*_run_argv(who, root, "--new"), "true"], capture_output=True, text=True, cwd=wd, timeout=60)
        assert r.returncode == 125
        assert len(r.stderr.strip().splitlines()) == 1 and "the container of a 'shiftfs run'" in r.stderr
        r = subprocess.run(
            who.wrap([*run_argv()[:-1], "exec", "--shift", root, "--", "true"]),
            capture_output=True,
            text=True,
            cwd=wd,
            timeout=60,
        )
        assert r.returncode == 125
        assert len(r.stderr.strip().splitlines()) == 1 and "the container of a 'shiftfs run'" in r.stderr
        # (Made on the host, /done would stay hidden behind the view's cache: through a joined run.)
        r = subprocess.run([*_run_argv(who, root), "touch /done"], capture_output=True, text=True, cwd=wd, timeout=60)
        assert r.returncode == 0, r.stderr
        assert first.wait(timeout=60) == 0
        # Gone: --join now has nothing to join, and a plain run starts a new container.
        r = subprocess.run(
            [*_run_argv(who, root, "--join"), "true"], capture_output=True, text=True, cwd=wd, timeout=60
        )
        assert r.returncode == 125 and "no container of ROOT" in r.stderr
        r = subprocess.run([*_run_argv(who, root), "true"], capture_output=True, text=True, cwd=wd, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        stop(first)


#: Each command waits until all three are in, so that the container (whose
#: shell's parent is its pid 1) ends last: the joined ones end with it.
WAIT_FOR_ALL = (
    "echo x >> /n; while [ $(wc -l < /n) -lt 3 ]; do sleep 0.05; done; readlink /proc/self/ns/pid; "
    'if [ "$PPID" = 1 ]; then sleep 1; fi'
)


def test_simultaneous_runs_of_one_root_are_one_container(wd):
    """Started at the same moment, the later runs wait for the first one's container and join it."""
    root = make_host_root(os.path.join(wd, "root"), ROOT_USER)
    os.chmod(root, 0o700)
    procs = [
        subprocess.Popen(
            [*_run_argv(ROOT_USER, root), WAIT_FOR_ALL],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=wd,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1, results
