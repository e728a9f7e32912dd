"""The attack suite of ``shiftfs run`` (README "Security model"): container
root tries every way out it can see, as root and as users, in xattr, table
and single-id namespaces, and as a joined second shell. Each attack must fail.

The way out is checked, not guessed: the host holds a marker file at a path
nothing binds into the container; an attack escapes if from any descriptor,
working directory or root of any process it can see (walking up through
``..``), the marker can be read, or if container root is host root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from ns_util import (
    HOST_USR,
    ROOT_USER,
    User,
    make_host_root,
    run_argv,
    users_fixture,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates test users: run as root")

#: Run inside the container with the host's python3 (/usr is bound read-only).
ATTACK = r"""
import ctypes, errno, json, os, sys
marker = sys.argv[1]
me = os.getpid()
found = []
def walk_up(start, what):
    p = start
    for _ in range(40):
        try:
            if os.path.exists(p + marker):
                found.append(what)
                return
        except OSError:
            return
        p += "/.."
def attempt(path, what):
    try:
        os.stat(path)
    except OSError:
        return
    walk_up(path, what)
pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
mine = {me}
others = []
for pid in pids:
    try:
        with open(f"/proc/{pid}/status") as f:
            ppid = int([l for l in f if l.startswith("PPid:")][0].split()[1])
    except OSError:
        continue
    for link in ("cwd", "root"):
        attempt(f"/proc/{pid}/{link}", f"/proc/{pid}/{link}")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        attempt(f"/proc/{pid}/fd/{fd}", f"/proc/{pid}/fd/{fd}")
    if pid in mine:
        continue
    try:  # the container's own commands are the container's; shiftfs's processes are the targets
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            helper = pid == 1 or b"shiftfs" in f.read()
    except OSError:
        helper = True
    if helper:
        others.append(pid)
libc = ctypes.CDLL(None, use_errno=True)
traced, mem, exe, readable = [], [], [], []
for pid in others:
    if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
        traced.append(pid)
        libc.ptrace(17, pid, None, None)
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
        mem.append(pid)
    except OSError:
        pass
    try:
        os.close(os.open(f"/proc/{pid}/exe", os.O_WRONLY))
        exe.append(pid)
    except OSError:
        pass
    for name in ("environ", "map_files"):
        try:
            (os.listdir if name == "map_files" else open)(f"/proc/{pid}/{name}")
            readable.append(f"{pid}/{name}")
        except OSError:
            pass
print(json.dumps({"found": found, "traced": traced, "mem": mem, "exe": exe, "readable": readable,
                  "others": others, "uid": os.getuid()}))
"""


users = users_fixture(1, 1)


def _setup(wd: str, owner: User) -> tuple[str, str, str]:
    """ROOT, a host marker file outside it, and a world-writable host drop directory."""
    root = make_host_root(os.path.join(wd, "root"), owner)
    secret = os.path.join(wd, "hostsecret")
    os.makedirs(secret)
    marker = os.path.join(secret, "MARKER")
    with open(marker, "w") as f:
        f.write("host\n")
    os.chmod(secret, 0o755)
    os.chmod(marker, 0o644)
    drop = os.path.join(wd, "drop")
    os.makedirs(drop)
    os.chmod(drop, 0o1777)
    return root, marker, drop


def _run(owner: User, root: str, cmd: list[str], opts: list[str] = (), timeout: int = 90, **kw):
    argv = owner.wrap([*run_argv(), *HOST_USR, *opts, root, "--", *cmd])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/", **kw)


def _attack(owner: User, root: str, marker: str, opts: list[str] = ()) -> dict:
    import json

    res = _run(owner, root, ["python3", "-c", ATTACK, marker], opts)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_contained(out: dict) -> None:
    assert out["found"] == [], f"the host's marker is reachable through {out['found']}"
    assert out["traced"] == [], f"ptrace attached to {out['traced']}"
    assert out["mem"] == [], f"/proc/PID/mem opened for {out['mem']}"
    assert out["exe"] == [], f"/proc/PID/exe opened for writing for {out['exe']}"
    assert out["readable"] == [], f"readable: {out['readable']}"
    assert 1 in out["others"], "pid 1 of the container was not examined"


MODES = {
    "xattr": [],
    "table": ["--map", "b:0:0:65536", "--userns-base", "0x700000"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("who", ["root", "user", "single"])
def test_no_way_out(who, mode, users, wd):
    owner = {"root": ROOT_USER, "user": users[0], "single": users[1]}[who]
    opts = list(MODES[mode])
    if who != "root":
        opts = [o for o in opts if o not in ("--userns-base", "0x700000")]
        if mode == "table":
            opts = ["--map", "b:0:0:1" if who == "single" else "b:0:0:65536"]
    root, marker, _drop = _setup(wd, owner)
    _assert_contained(_attack(owner, root, marker, opts))


@pytest.mark.parametrize("who", ["root", "user"])
def test_joined_shell_has_no_way_out(who, users, wd):
    owner = ROOT_USER if who == "root" else users[0]
    root, marker, _drop = _setup(wd, owner)
    first = subprocess.Popen(
        owner.wrap([*run_argv(), *HOST_USR, root, "--", "sleep", "60"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    try:
        deadline = time.monotonic() + 30
        out = None
        while time.monotonic() < deadline:
            res = _run(owner, root, ["python3", "-c", ATTACK, marker], ["--join"])
            if res.returncode == 0:
                import json

                out = json.loads(res.stdout.strip().splitlines()[-1])
                break
            time.sleep(0.3)
        if out is None:
            first.kill()
            raise AssertionError(f"could not join: {res.stderr}; the first run: {first.communicate()[1]!r}")
        _assert_contained(out)
    finally:
        first.kill()
        first.wait()


def test_root_is_not_host_root(wd):
    root, _marker, drop = _setup(wd, ROOT_USER)
    res = _run(ROOT_USER, root, ["sh", "-c", "touch /drop/f; id -u"], ["--bind", f"{drop}:/drop"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0"
    host_uid = os.stat(os.path.join(drop, "f")).st_uid
    assert host_uid != 0, "container root created a file as host root"
    assert host_uid >= 0x80000
    # ROOT's own ownership is kept as before: the backing files stay root's
    res = _run(ROOT_USER, root, ["sh", "-c", "echo x > /made"])
    assert res.returncode == 0, res.stderr
    assert os.stat(os.path.join(root, "made")).st_uid == 0


def test_host_root_only_on_request(wd):
    root, _marker, drop = _setup(wd, ROOT_USER)
    res = _run(ROOT_USER, root, ["touch", "/drop/f"], ["--host-root", "--bind", f"{drop}:/drop"])
    assert res.returncode == 0, res.stderr
    assert os.stat(os.path.join(drop, "f")).st_uid == 0


#: Run inside as container root: the masked directories are empty and each read-only file
#: (checked only if it exists, unless its flag says it must) cannot be written; prints "ok".
_MASKS = (
    "import os\n"
    "for d in ('/proc/acpi', '/sys/firmware'):\n"
    "    if os.path.isdir(d):\n"
    "        assert os.listdir(d) == [], d\n"
    "for p, must in {readonly!r}:\n"
    "    if not must and not os.path.exists(p):\n"
    "        continue\n"
    "    try:\n"
    "        open(p, 'w').close()\n"
    "    except OSError as e:\n"
    "        assert e.errno in (30, 13), (p, e)\n"
    "    else:\n"
    "        raise AssertionError(p + ' is writable')\n"
    "print('ok')\n"
)


def test_masked_and_readonly_paths(wd):
    root, _marker, _drop = _setup(wd, ROOT_USER)
    script = (
        "import os\n"
        "for p in ('/proc/keys', '/proc/timer_list', '/proc/sched_debug'):\n"
        "    if os.path.exists(p):\n"
        "        assert open(p).read() == '', p\n"
    ) + _MASKS.format(readonly=[("/proc/sys/kernel/hostname", False), ("/proc/sysrq-trigger", False)])
    res = _run(ROOT_USER, root, ["python3", "-c", script])
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_masks_hold_when_proc_and_sys_are_symlinks_in_root(wd):
    """Container root may leave /proc and /sys as symlinks for the next run;
    the masks go where /proc and /sys were mounted, not where a name leads."""
    root, _marker, _drop = _setup(wd, ROOT_USER)
    os.makedirs(os.path.join(root, "mnt/p"))
    os.makedirs(os.path.join(root, "mnt/s"))
    os.symlink("/mnt/p", os.path.join(root, "proc"))
    os.symlink("/mnt/s", os.path.join(root, "sys"))
    script = _MASKS.format(readonly=[("/proc/sys/kernel/hostname", True)])
    res = _run(ROOT_USER, root, ["python3", "-c", script])
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_bind_destination_swapped_for_a_symlink(wd):
    """runc CVE-2021-30465 class: DST in ROOT swapped for a symlink to a host
    path while the container starts; the bind still lands inside ROOT."""
    root, marker, _drop = _setup(wd, ROOT_USER)
    data = os.path.join(wd, "data")
    os.makedirs(data)
    with open(os.path.join(data, "DATA"), "w") as f:
        f.write("data\n")
    secret = os.path.dirname(marker)
    dst = os.path.join(root, "dst")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            for make in (lambda: os.mkdir(dst), lambda: os.symlink(secret, dst)):
                try:
                    if os.path.islink(dst):
                        os.unlink(dst)
                    elif os.path.isdir(dst):
                        os.rmdir(dst)
                    make()
                except OSError:
                    pass

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    try:
        for _ in range(4):
            res = _run(
                ROOT_USER,
                root,
                ["sh", "-c", f"ls /dst; test ! -e {marker} && test ! -e /dst/MARKER"],
                ["--bind", f"{data}:/dst"],
            )
            assert "MARKER" not in res.stdout, res.stdout
            # the host's directory was never mounted over
            assert os.listdir(secret) == ["MARKER"]
    finally:
        stop.set()
        t.join()
    with open("/proc/self/mountinfo") as f:
        assert secret not in f.read()


def test_exec_leaks_nothing_more(users, wd):
    """``shiftfs exec`` is not a sandbox, but a user's COMMAND holds only stdio."""
    user = users[0]
    src = os.path.join(wd, "src")
    os.makedirs(src, mode=0o700)
    os.chown(src, user.uid, user.gid)
    os.chown(wd, user.uid, user.gid)
    argv = user.wrap(
        [sys.executable, "-m", "shiftfs", "exec", "--shift", src, "--", "sh", "-c", "ls /proc/self/fd | wc -l"]
    )
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) <= 4  # 0, 1, 2 and ls's own directory
