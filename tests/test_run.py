"""Tests for ``shiftfs run``: containers on a shiftfs view, as root and as an
unprivileged user with (and without) a subordinate id range."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import time

import pytest
from ns_util import (
    EXIT_CASES,
    HOST_USR,
    REPO,
    ROOT_USER,
    User,
    assert_usage_error,
    chown_tree,
    command_pid,
    host_owners,
    make_host_root,
    mounts_mentioning,
    processes_mentioning,
    pty_run,
    remove_tree,
    run_argv,
    users_fixture,
    wait_for_line,
)
from records import RECORD

from shiftfs.container import preflight, rootfs, userns
from shiftfs.container import run as runmod

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates test users: run as root")


def _repo_reachable_by_all() -> str | None:
    return preflight.blocked_component(os.path.join(runmod.__file__), 65533, {65533}, 4)


users = users_fixture(1, 1)


@pytest.fixture(params=["root", "user"])
def who(request, users) -> User:
    if request.param == "root":
        return ROOT_USER
    bad = _repo_reachable_by_all()
    if bad:
        pytest.skip(f"{bad} is not searchable by other users; move the checkout (see README)")
    return users[0]


def make_root(wd: str, owner: User, name: str = "root") -> str:
    return make_host_root(os.path.join(wd, name), owner)


def shiftfs_run(
    owner: User, root: str, *cmd: str, opts=(), timeout=60, check=True, **kw
) -> subprocess.CompletedProcess:
    argv = owner.wrap([*run_argv(), *HOST_USR, *opts, root, "--", *cmd])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(root), **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}")
    return res


def record(path: str) -> str:
    out = subprocess.run(["getfattr", "--only-values", "-n", RECORD, path], capture_output=True, text=True)
    return out.stdout.strip()


def assert_clean(marker: str) -> None:
    assert mounts_mentioning(marker) == []
    deadline = time.monotonic() + 5
    while processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(marker) == []


# --- ownership ------------------------------------------------------------------

OWNERSHIP_SCRIPT = """
set -e
echo hello > /file
chown 1000:1000 /file
cp /bin/true /suid
chmod 4755 /suid
cp /bin/true /cap
setcap cap_net_raw+ep /cap
mkdir -p /home/alice
chown 1000:1000 /home/alice
chmod 700 /home/alice
echo secret > /home/alice/.profile
chown 1000:1000 /home/alice/.profile
ln -s /file /link
ls -ln /file /suid /home
stat -c '%n %u:%g %a' /file /suid /home/alice /home/alice/.profile
getcap /cap
"""


def test_ownership_inside_and_outside(who, wd):
    root = make_root(wd, who)
    out = shiftfs_run(who, root, "sh", "-c", OWNERSHIP_SCRIPT).stdout
    assert "/file 1000:1000 644" in out
    assert "/suid 0:0 4755" in out
    assert "/home/alice 1000:1000 700" in out
    assert "/home/alice/.profile 1000:1000 644" in out
    assert "/cap cap_net_raw=ep" in out
    ls = {line.split()[-1]: line.split()[:4] for line in out.splitlines() if line.startswith(("-", "d"))}
    assert ls["/suid"] == ["-rwsr-xr-x", "1", "0", "0"]  # ls -ln shows view ids
    assert ls["/file"] == ["-rw-r--r--", "1", "1000", "1000"]
    assert ls["alice"] == ["drwx------", "2", "1000", "1000"]
    # Host side: everything belongs to the invoking user, records hold view ids.
    assert host_owners(root) == {(who.uid, who.gid)}
    assert record(f"{root}/file") == "1000:1000:100644"
    assert record(f"{root}/suid") == "0:0:104755"
    assert record(f"{root}/home/alice") == "1000:1000:40700"
    assert not os.stat(f"{root}/suid").st_mode & 0o4000
    assert_clean(root)
    # The second run sees the same view: the records persist on disk.
    out = shiftfs_run(
        who, root, "stat", "-c", "%n %u:%g %a", "/file", "/suid", "/home/alice", "/home/alice/.profile"
    ).stdout
    assert out.split("\n")[:4] == [
        "/file 1000:1000 644",
        "/suid 0:0 4755",
        "/home/alice 1000:1000 700",
        "/home/alice/.profile 1000:1000 644",
    ]
    out = shiftfs_run(who, root, "getcap", "/cap").stdout
    assert "cap_net_raw=ep" in out
    # The invoking user can delete everything, even what view root locked away.
    shiftfs_run(who, root, "sh", "-c", "mkdir -p /locked/sub && touch /locked/sub/f && chmod 000 /locked/sub /locked")
    os.chown(wd, who.uid, who.gid)
    subprocess.run(who.wrap(["rm", "-rf", root]), check=True, cwd="/")
    assert not os.path.exists(root)


def test_user_option_and_view_ids(who, wd):
    root = make_root(wd, who)
    out = shiftfs_run(
        who, root, "sh", "-c", "mkdir -p /home/alice && chown alice:alice /home/alice && chmod 755 /home/alice"
    ).stdout
    res = shiftfs_run(
        who,
        root,
        "sh",
        "-c",
        "id -u; id -g; echo $HOME; touch /home/alice/mine; stat -c '%u:%g' /home/alice/mine; touch /forbidden",
        opts=["--user", "alice"],
        check=False,
    )
    lines = res.stdout.split()
    assert lines[:4] == ["1000", "1000", "/home/alice", "1000:1000"]
    assert "Permission denied" in res.stderr
    assert record(f"{root}/home/alice/mine") == "1000:1000:100644"
    assert host_owners(root) == {(who.uid, who.gid)}
    out = shiftfs_run(who, root, "id", "-u", opts=["--user", "4242:4243"]).stdout
    assert out.strip() == "4242"


# --- the container's environment --------------------------------------------------


def test_container_mounts(wd):
    root = make_root(wd, ROOT_USER)
    data = os.path.join(wd, "data")
    os.mkdir(data)
    os.chmod(data, 0o1777)  # container root is not host root: a host directory it may write
    script = """
    echo pid=$$
    cat /proc/1/cmdline | tr '\\0' ' ' | grep -q python && echo init-ok
    echo x > /dev/null && head -c4 /dev/zero | wc -c
    head -c4 /dev/urandom | wc -c
    test -e /dev/pts/ptmx && test -L /dev/ptmx && echo pts-ok
    touch /sys/shiftfs-test 2>&1 | grep -q 'Read-only' && echo sys-ro
    grep -q ' /tmp tmpfs' /proc/mounts && echo tmp-tmpfs
    grep -q ' /dev/shm tmpfs' /proc/mounts && echo shm-ok
    hostname; pwd; echo "home=$HOME"
    echo data > /data/out
    touch /ro/x 2>&1 | grep -q 'Read-only' && echo bind-ro
    """
    out = shiftfs_run(
        ROOT_USER,
        root,
        "sh",
        "-c",
        script,
        opts=["--hostname", "box", "--chdir", "/tmp", "--bind", f"{data}:/data", "--bind", f"{data}:/ro:ro"],
    ).stdout
    for word in ("home=/root", "pid=2", "init-ok", "pts-ok", "sys-ro", "tmp-tmpfs", "shm-ok", "bind-ro", "box", "/tmp"):
        assert word in out.split("\n") or word in out, (word, out)
    assert out.count("4\n") == 2
    with open(os.path.join(data, "out")) as f:
        assert f.read() == "data\n"
    # Mount points the container needed were created in ROOT (ls sees them).
    assert {"proc", "dev", "sys", "tmp"} <= set(os.listdir(root))


def test_shifted_bind(who, wd):
    root = make_root(wd, who)
    data = os.path.join(wd, "data")
    os.mkdir(data)
    os.chown(data, who.uid, who.gid)
    out = shiftfs_run(
        who,
        root,
        "sh",
        "-c",
        "mkdir /data/home && chown 1000:1000 /data/home && "
        "touch /data/home/f && chown 1000:1000 /data/home/f && "
        "stat -c '%u:%g' /data/home/f",
        opts=["--bind", f"{data}:/data:rw,shift"],
    ).stdout
    assert out.strip() == "1000:1000"
    assert host_owners(data) == {(who.uid, who.gid)}
    assert record(os.path.join(data, "home/f")) == "1000:1000:100644"
    out = shiftfs_run(who, root, "touch", "/data/x", opts=["--bind", f"{data}:/data:ro,shift"], check=False)
    assert out.returncode == 1 and "Read-only" in out.stderr
    assert_clean(data)


def test_bind_follows_symlinks_inside_root(wd):
    root = make_root(wd, ROOT_USER)
    os.makedirs(os.path.join(root, "srv/real"))
    os.symlink("/srv/real", os.path.join(root, "data"))  # absolute: must stay in ROOT
    src = os.path.join(wd, "src")
    os.mkdir(src)
    with open(os.path.join(src, "f"), "w") as f:
        f.write("ok\n")
    out = shiftfs_run(ROOT_USER, root, "cat", "/srv/real/f", opts=["--bind", f"{src}:/data/"]).stdout
    assert out == "ok\n"
    assert not os.path.exists("/srv/real")


# --- exit status and signals ---------------------------------------------------------


@pytest.mark.parametrize("cmd,code", EXIT_CASES)
def test_exit_status(wd, cmd, code):
    root = make_root(wd, ROOT_USER)
    res = shiftfs_run(ROOT_USER, root, *cmd, check=False)
    assert res.returncode == code, res.stderr
    if code in (126, 127):
        assert len(res.stderr.strip().splitlines()) == 1


def _start(owner: User, root: str, *cmd: str, opts=()) -> subprocess.Popen:
    return subprocess.Popen(
        owner.wrap([*run_argv(), *HOST_USR, *opts, root, "--", *cmd]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(root),
    )


def test_sigterm_reaches_command(who, wd):
    root = make_root(wd, who)
    p = _start(who, root, "sh", "-c", 'trap "echo got-term; exit 42" TERM; echo ready; while :; do sleep 0.05; done')
    wait_for_line(p.stdout, "ready", 20)
    os.kill(command_pid(p, who, "shiftfs run"), signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 42, err
    assert "got-term" in out
    assert_clean(root)


def test_sigint_kills_command(wd):
    root = make_root(wd, ROOT_USER)
    p = _start(ROOT_USER, root, "sh", "-c", "echo ready; exec sleep 60")
    wait_for_line(p.stdout, "ready", 20)
    os.kill(p.pid, signal.SIGINT)
    p.communicate(timeout=20)
    assert p.returncode == 130
    assert_clean(root)


def test_ctrl_c_on_a_terminal(wd):
    """^C on the terminal: the command gets SIGINT exactly once (from the tty);
    the supervisors do not relay a second copy."""
    root = make_root(wd, ROOT_USER)
    script = (
        "n=0; trap 'n=$((n+1)); echo \"int $n\"' INT; tty; echo ready; "
        'sleep 1 & wait; sleep 0.5; echo "total $n"; exit 3'
    )
    text, code = pty_run([*run_argv(), *HOST_USR, root, "--", "sh", "-c", script], wd, when=b"ready", send=b"\x03")
    assert "total 1" in text, text
    assert "/dev/console" in text  # the terminal is found inside (ttyname)
    assert code == 3
    assert_clean(root)


def test_sigkill_of_run_leaves_nothing(who, wd):
    root = make_root(wd, who)
    marker = "shiftfs-kill-marker"
    p = _start(who, root, "sh", "-c", f"echo ready; sleep 60; : {marker}")
    wait_for_line(p.stdout, "ready", 20)
    os.kill(command_pid(p, who, "shiftfs run"), signal.SIGKILL)  # `shiftfs run` itself, not runuser
    p.communicate(timeout=20)
    assert_clean(marker)
    assert_clean(root)


# --- id maps -----------------------------------------------------------------------


def _drop_dir(wd: str) -> str:
    drop = os.path.join(wd, "drop")
    os.makedirs(drop, exist_ok=True)
    os.chmod(drop, 0o1777)
    return drop


def test_root_range_is_private(wd):
    """As root every view id, 0 included, is a host id of a fresh block:
    container root is host id BASE (README "Security model")."""
    root = make_root(wd, ROOT_USER)
    drop = _drop_dir(wd)
    out = shiftfs_run(
        ROOT_USER,
        root,
        "sh",
        "-c",
        "cat /proc/self/uid_map /proc/self/gid_map; touch /drop/a",
        opts=["--bind", f"{drop}:/drop"],
    ).stdout
    rows = [tuple(map(int, line.split())) for line in out.strip().splitlines()]
    # numbered by the daemons' namespace, whose 65536 is BASE (shiftfs.container.userns)
    assert rows == [(0, 65536, 1), (1, 1, 65535)] * 2
    base = os.stat(os.path.join(drop, "a")).st_uid
    assert base % 65536 == 0 and os.stat(os.path.join(drop, "a")).st_gid == base
    assert userns.CONTAINER_RANGE[0] <= base <= userns.CONTAINER_RANGE[1]
    shiftfs_run(
        ROOT_USER,
        root,
        "touch",
        "/drop/b",
        opts=["--userns-base", str(0x70000000 - 0x10000), "--bind", f"{drop}:/drop"],
    )
    assert os.stat(os.path.join(drop, "b")).st_uid == 0x70000000 - 0x10000


def test_map_mode_with_a_fixed_block(wd):
    root = make_root(wd, ROOT_USER)
    base = 0x70000000 - 0x20000
    opts = ["--map", "b:0:0:65536", "--userns-base", str(base)]
    shiftfs_run(ROOT_USER, root, "sh", "-c", "touch /f && chown 7:8 /f", opts=opts)
    st = os.stat(os.path.join(root, "f"))
    assert (st.st_uid, st.st_gid) == (base + 7, base + 8)
    out = shiftfs_run(ROOT_USER, root, "stat", "-c", "%u:%g", "/f", opts=opts).stdout
    assert out.strip() == "7:8"


def test_parallel_runs_get_distinct_blocks(wd):
    # Three ROOTs: parallel runs of one ROOT are one container (tests/test_one_source.py).
    roots = [make_root(wd, ROOT_USER, f"root{i}") for i in range(3)]
    drop = _drop_dir(wd)
    procs = [
        _start(ROOT_USER, root, "sh", "-c", f"touch /drop/{i}; sleep 1", opts=["--bind", f"{drop}:/drop"])
        for i, root in enumerate(roots)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    assert len({os.stat(os.path.join(drop, str(i))).st_uid for i in range(3)}) == 3


def test_unprivileged_range_from_subuid(users, wd):
    u = users[0]
    root = make_root(wd, u)
    out = shiftfs_run(u, root, "cat", "/proc/self/uid_map").stdout
    rows = [line.split() for line in out.strip().splitlines()]
    assert rows == [["0", str(u.uid), "1"], ["1", str(u.subid[0]), str(u.subid[1])]]


def test_single_id_fallback(users, wd):
    u = users[1]
    root = make_root(wd, u)
    res = shiftfs_run(
        u,
        root,
        "sh",
        "-c",
        "cat /proc/self/uid_map; touch /f /tmp/g; chown 0:0 /f && echo chown0-ok; "
        "chown 1000:1000 /f && stat -c %u /f; chown 1000:1000 /tmp/g",
        check=False,
    )
    notes = [line for line in res.stderr.splitlines() if "note:" in line]
    assert len(notes) == 1
    assert "EINVAL" in notes[0] and "usermod --add-subuids" in notes[0] and u.name in notes[0]
    assert "su or setpriv to another account fails" in notes[0] and "APT::Sandbox::User" in notes[0]
    # In ROOT the chown is recorded (and shown as 0 inside); on /tmp (a tmpfs) the kernel refuses it.
    assert "Invalid argument" in res.stderr and "/tmp/g" in res.stderr
    assert "chown0-ok" in res.stdout
    assert res.stdout.split()[4:] == ["0"]
    assert res.stdout.split()[:3] == ["0", str(u.uid), "1"]
    assert res.returncode == 1
    # Asking for single explicitly is quiet; asking for full explains the fix.
    res = shiftfs_run(u, root, "true", opts=["--userns", "single"])
    assert "note:" not in res.stderr
    res = shiftfs_run(u, root, "true", opts=["--userns", "full"], check=False)
    assert res.returncode == 125 and "usermod --add-subuids" in res.stderr


def test_free_block_and_subid_parsing(tmp_path):
    used = [(0x80000, 0x10000), (0x90000 + 5, 1)]
    import random

    for seed in range(20):
        base = userns.free_block(used, random.Random(seed))
        assert base % userns.BLOCK == 0 and base not in (0x80000, 0x90000)
    p = tmp_path / "subuid"
    p.write_text("# comment\nbob:100000:65536\n1234:300000:10\nbob:500000:5\nbad line\n")
    assert userns.parse_subid_file(str(p), "bob", 1) == [(100000, 65536), (500000, 5)]
    assert userns.parse_subid_file(str(p), "carol", 1234) == [(300000, 10)]


def test_subid_file_edits_are_undone_exactly(tmp_path):
    from bench import subusers

    for original in (b"", b"a:1:2\n", b"a:1:2", b"# c\nb:5:6\n\n"):
        p = str(tmp_path / "subuid")
        with open(p, "wb") as f:
            f.write(original)
        added = subusers._add_lines(p, ["sftx:100:5\n"])
        with open(p, "ab") as f:  # somebody else's edit meanwhile
            f.write(b"other:9:9\n")
        subusers._remove_lines(p, {"sftx", "other"}, added)
        with open(p, "rb") as f:
            assert f.read() == original


def test_resolve_in_root(tmp_path):
    r = str(tmp_path)
    os.makedirs(f"{r}/usr/lib")
    os.symlink("usr/lib", f"{r}/lib")
    os.symlink("/usr", f"{r}/abs")
    os.symlink("../../..", f"{r}/usr/lib/up")
    assert rootfs.resolve_in_root(r, "/lib/x") == f"{r}/usr/lib/x"
    assert rootfs.resolve_in_root(r, "/abs/lib") == f"{r}/usr/lib"
    assert rootfs.resolve_in_root(r, "/usr/lib/up/etc") == f"{r}/etc"
    assert rootfs.resolve_in_root(r, "/../../etc") == f"{r}/etc"


# --- bad input -----------------------------------------------------------------------


def test_bad_inputs_get_one_line(users, wd, capsys):
    root = make_root(wd, ROOT_USER)
    other = make_root(wd, users[0], "other")
    hidden = os.path.join(wd, "hidden")
    os.mkdir(hidden, 0o700)
    os.chown(hidden, users[0].uid, users[0].gid)
    deep = os.path.join(hidden, "root")
    os.mkdir(deep)
    cases = [
        ([os.path.join(wd, "missing"), "--", "true"], "not a directory"),
        ([root], "no COMMAND"),
        ([other, "--", "true"], "chown -R 0"),
        ([deep, "--", "true"], "chmod o+x"),
        (["--bind", "/nonexistent:/x", root, "--", "true"], "does not exist"),
        (["--bind", "/usr:rel", root, "--", "true"], "absolute"),
        (["--bind", "/usr:/usr:shft", root, "--", "true"], "ro, rw and shift"),
        (["--bind", "/etc/passwd:/p:shift", root, "--", "true"], "needs a directory"),
        (["--bind", f"{other}:/o:shift", root, "--", "true"], "drop shift"),
        (["--user", "70000", root, "--", "true"], "not mapped"),
        (["--user", "nosuchuser", root, "--", "true"], "ROOT/etc/passwd"),
        (["--chdir", "rel", root, "--", "true"], "absolute"),
        (["--userns-base", "12345", root, "--", "true"], "multiple of 65536"),
        (["--map", "x:1", root, "--", "true"], "u|g|b:DISK:VIEW:COUNT"),
        ([root, "--chdir", "/nonexistent", "--", "true"], "--chdir /nonexistent"),
        (["--map", "b:0:0:65536", root, "--", "true"], "--userns-base"),
        (["--xattr", "--map", "b:0:0:1", root, "--", "true"], "exclude each other"),
        (["--setenv", "1X=2", root, "--", "true"], "NAME must be"),
        (["--bind", "/usr:/x,ro", root, "--", "true"], "ro and rw go after a colon"),
    ]
    for args, needle in cases:
        if "--chdir" in args and "/nonexistent" in args:  # fails inside the container
            res = subprocess.run([*run_argv(), *args], capture_output=True, text=True, timeout=30)
            code, err = res.returncode, res.stderr
        else:  # fails before anything is forked: check in-process, it is quicker
            capsys.readouterr()
            code = runmod.COMMAND_LINE.main(args)
            err = capsys.readouterr().err
        assert_usage_error(code, err, needle, "run", args)


# --- environment, --bind forms, shifted trees, logs (issue 16) ---------------------------


def _env_of(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_clean_environment(who, wd):
    root = make_root(wd, who)
    host = dict(
        os.environ,
        PATH=os.environ["PATH"] + ":/host/only",
        MAIL="/var/mail/me",
        OLDPWD="/somewhere",
        TERM="xterm-shiftfs",
        FROM_HOST="h",
    )
    out = shiftfs_run(
        who,
        root,
        "env",
        env=host,
        opts=["--setenv", "A=1", "--env", "FROM_HOST", "--setenv", "B=x=y", "--env", "UNSET_ON_HOST"],
    ).stdout
    assert _env_of(out) == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "TERM": "xterm-shiftfs",
        "container": "shiftfs",
        "PWD": "/",
        "A": "1",
        "FROM_HOST": "h",
        "B": "x=y",
    }
    # useradd and friends are found on the root PATH; --user gets its own HOME
    out = shiftfs_run(
        who,
        root,
        "sh",
        "-c",
        "command -v useradd; echo $HOME $USER $PWD",
        opts=["--user", "alice", "--chdir", "/tmp"],
        env=host,
    ).stdout
    assert out.split() == ["/usr/sbin/useradd", "/home/alice", "alice", "/tmp"]


def _tree(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


def test_bind_forms_from_the_help(wd):
    root = make_root(wd, ROOT_USER)
    data = os.path.join(wd, "data")
    os.mkdir(data)
    script = (
        "touch /srv/shared/f && chown 1000:1000 /srv/shared/f && "
        "stat -c %u:%g /srv/shared/f && grep -c ' /srv/shared fuse' /proc/mounts"
    )
    out = shiftfs_run(ROOT_USER, root, "sh", "-c", script, opts=["--bind", f"{data}:/srv/shared,shift"]).stdout
    assert out.split() == ["1000:1000", "1"]
    assert record(os.path.join(data, "f")) == "1000:1000:100644"
    assert host_owners(data) == {(0, 0)}
    out = shiftfs_run(
        ROOT_USER, root, "touch", "/srv/shared/g", opts=["--bind", f"{data}:/srv/shared:ro,shift"], check=False
    )
    assert out.returncode == 1 and "Read-only" in out.stderr
    out = shiftfs_run(
        ROOT_USER, root, "stat", "-c", "%u", "/srv/shared/f", opts=["--bind", f"{data}:/srv/shared:rw"]
    ).stdout
    # a plain bind: the host owner, no record applied; host root is no id of the container
    assert out.strip() == "65534"
    before = _tree(root)
    assert "srv/shared,shift" not in before
    for spec, needle in [
        (f"{data}:/srv/a,ro", "ro and rw go after a colon"),
        (f"{data}:/srv/b,shift,ro", "ro and rw go after a colon"),
        (f"{data}:/srv/c:ro:x", "too many ':'"),
        (f"{data}:/srv/d:shift,ro", "ro, rw and shift"),
        (f"{data}:/srv/e:ro,rw", "ro, rw and shift"),
        (f"{data}:/srv/f,g:ro", "cannot be bound"),
        (data, "separated by one ':'"),
        (f"{data}:/", "ROOT itself"),
    ]:
        res = shiftfs_run(ROOT_USER, root, "true", opts=["--bind", spec], check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 125 and len(lines) == 1, (spec, res.stderr)
        assert lines[0].startswith("shiftfs run: --bind") and needle in lines[0], (spec, lines)
        assert "SRC:DST[:ro|rw][,shift]" in lines[0] or needle == "ROOT itself"
    assert _tree(root) == before


def test_shifted_tree_gets_the_mount_recipe(wd):
    root = make_root(wd, ROOT_USER)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            os.lchown(n, 100000, 100000)  # a classic lxc / rootless-podman tree
    for opts in (["--map", "b:100000:0:65536"], []):
        res = subprocess.run(
            [*run_argv(), *HOST_USR, *opts, root, "--", "true"], capture_output=True, text=True, timeout=30
        )
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 125 and len(lines) == 1, (opts, res.stderr)
        assert f"shiftfs mount --map b:100000:0:65536 {root} VIEW" in lines[0]
        assert "systemd-nspawn -D VIEW" in lines[0] and "chown" not in lines[0]


def test_daemon_log_belongs_to_the_real_user(users, wd):
    """A daemon without log= and without syslog, started as namespace root
    by a user, logs into that user's own place, never a shared /tmp file."""
    if _repo_reachable_by_all():
        pytest.skip("the checkout is not reachable by other users")
    if os.path.exists("/dev/log"):
        pytest.skip("/dev/log exists: daemons log to syslog")
    user = users[1]
    src, mnt, xdg = (os.path.join(wd, n) for n in ("src", "mnt", "xdg"))
    for d in (src, mnt, xdg):
        os.mkdir(d, 0o700)
        os.chown(d, user.uid, user.gid)
    shared = "/tmp/shiftfs-0.log"
    shared_size = os.path.getsize(shared) if os.path.exists(shared) else None
    private = f"/tmp/shiftfs-{user.uid}"
    remove_tree(private)
    py = f"{sys.executable} -m shiftfs"
    # In a bare user namespace the host's directories above src read as the overflow id;
    # the private-SOURCE check takes them as the host's, so no allow_shared_source is needed.
    script = f"{py} mount --xattr {src} {mnt} && touch {mnt}/f && {py} umount {mnt}"

    def run_in_userns(*env: str) -> None:
        res = subprocess.run(
            [
                "runuser",
                "-u",
                user.name,
                "--",
                "env",
                "-u",
                "XDG_RUNTIME_DIR",
                "HOME=/",
                *env,
                "unshare",
                "--user",
                "--map-root-user",
                "--mount",
                "sh",
                "-c",
                script,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr

    try:
        run_in_userns()  # no $XDG_RUNTIME_DIR, no home: a 0700 directory of the user
        st = os.stat(private)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o700)
        log = os.path.join(private, "shiftfs.log")
        with open(log) as f:
            assert f"mounted {src} on {mnt}" in f.read()
        assert os.stat(log).st_uid == user.uid
        run_in_userns(f"XDG_RUNTIME_DIR={xdg}")
        with open(os.path.join(xdg, "shiftfs.log")) as f:
            assert f"mounted {src} on {mnt}" in f.read()
        assert os.stat(os.path.join(xdg, "shiftfs.log")).st_uid == user.uid
    finally:
        remove_tree(private)
    assert (os.path.getsize(shared) if os.path.exists(shared) else None) == shared_size


# --- nesting ---------------------------------------------------------------------------


def test_shiftfs_mount_inside_a_container(who, wd):
    """Nesting: root of the container mounts shiftfs itself, with the CLI and
    with mount(8) through fuse3's mount helper."""
    root = make_root(wd, who)
    script = f"""
    set -e
    mkdir -p /src /mnt /mnt2
    echo x > /src/f
    {sys.executable} -m shiftfs mount --xattr -o log=/tmp/log /src /mnt
    chown 1234:1234 /mnt/f
    stat -c '%u:%g' /mnt/f /src/f
    {sys.executable} -m shiftfs umount /mnt
    grep -c ' /mnt ' /proc/mounts || true
    if [ -x /usr/local/bin/shiftfs ] && [ -x /sbin/mount.fuse3 ]; then
        mount -t fuse.shiftfs /src /mnt2 -o xattr,log=/tmp/log2
        stat -c '%u:%g' /mnt2/f
        umount /mnt2
    else
        echo 1234:1234
    fi
    """
    out = shiftfs_run(who, root, "sh", "-c", script, opts=["--bind", f"{REPO}:{REPO}:ro"]).stdout
    assert out.split() == ["1234:1234", "0:0", "0", "1234:1234"]
    # The inner record is kept, escaped, next to the outer one.
    assert record(f"{root}/src/f") == "0:0:100644"
    inner = subprocess.run(
        ["getfattr", "--only-values", "-n", "user.containers.override_" + RECORD, f"{root}/src/f"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert inner == "1234:1234:100644"
    assert host_owners(root) == {(who.uid, who.gid)}
    assert_clean(root)


def test_shiftfs_run_inside_shiftfs_run(who, wd):
    """A container's root runs its own container: the inner namespace gets the
    outer one's ids unchanged."""
    root = make_root(wd, who)
    inner = make_host_root(os.path.join(root, "inner"), who)
    for d in ("proc", "dev", "sys", "tmp"):  # see test_create_through_nested_shiftfs
        os.mkdir(os.path.join(inner, d))
    open(os.path.join(inner, "f"), "w").close()
    chown_tree(inner, who)
    script = (
        f"{sys.executable} -m shiftfs run --bind /usr:/usr:ro /inner -- "
        "sh -c 'sed -n 2p /proc/self/uid_map; chown 1000:1000 /f; stat -c %u:%g /f'"
    )
    # --unmask: a nested /proc needs a fully visible one (as podman's unmask=ALL)
    out = shiftfs_run(who, root, "sh", "-c", script, opts=["--unmask", "--bind", f"{REPO}:{REPO}:ro"]).stdout
    words = out.split()
    assert words[:2] == ["1", "1"] and words[3] == "1000:1000"
    assert int(words[2]) == (who.subid[1] if who.subid else 65535)
    assert host_owners(root) == {(who.uid, who.gid)}
    assert_clean(root)


def test_create_through_nested_shiftfs(wd):
    root = make_root(wd, ROOT_USER)
    script = f"""
    mkdir -p /src /mnt
    {sys.executable} -m shiftfs mount --xattr -o log=/tmp/log /src /mnt
    mkdir /mnt/d && touch /mnt/f && ln -s f /mnt/l && chown -h 5:5 /mnt/l &&
    stat -c '%u:%g' /mnt/d /mnt/f /mnt/l
    """
    out = shiftfs_run(ROOT_USER, root, "sh", "-c", script, opts=["--bind", f"{REPO}:{REPO}:ro"]).stdout
    assert out.split() == ["0:0", "0:0", "5:5"]


# --- a real Debian root ------------------------------------------------------------------


@pytest.mark.timeout(1200)  # the first user of debian_tar builds it
def test_debian_rootfs(debian_tar, wd):
    work = make_root(wd, ROOT_USER, "work")
    os.mkdir(os.path.join(work, "target"))
    cache = os.path.dirname(debian_tar)
    shiftfs_run(
        ROOT_USER,
        work,
        "tar",
        "--numeric-owner",
        "-xpf",
        f"/cache/{os.path.basename(debian_tar)}",
        "-C",
        "/target",
        "--exclude=./dev/*",
        opts=["--bind", f"{cache}:/cache:ro"],
        timeout=300,
    )
    target = os.path.join(work, "target")
    assert host_owners(target) == {(0, 0)}
    res = subprocess.run([*run_argv(), target, "--", "dpkg", "--verify"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr
    res = subprocess.run(
        [
            *run_argv(),
            target,
            "--",
            "sh",
            "-c",
            "useradd -m u1 && stat -c %U /home/u1 && stat -c '%U %a' /usr/bin/passwd /etc/shadow",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["u1", "root", "4755", "root", "640"]
    uid = subprocess.run(
        [*run_argv(), target, "--", "id", "-u", "u1"], capture_output=True, text=True, timeout=60
    ).stdout.strip()
    assert record(os.path.join(target, "home/u1")).startswith(f"{uid}:{uid}:")
    assert host_owners(target) == {(0, 0)}
