"""A hand-made pivot_root into a view never deadlocks the daemon (issue 16, item 1).

The user's recipe: in a mount namespace of one's own (``unshare --mount``,
as an unprivileged user also ``--user --map-auto --map-root-user``),
``shiftfs mount``, then ``cd VIEW && pivot_root . mnt/oldroot``. pivot_root
moves the root of every process of that namespace whose root is the old
root; a daemon sharing the namespace then resolves its next path through the
view, i.e. through itself, and waits on itself for good. The daemon now
lives in a mount namespace of its own (``shiftfs/fs/isolate.py``).

Each case runs the recipe in a real namespace through real tools, works
through the view after the pivot (create, write, chown, mkdir, ls), detaches
the old root with ``umount -l``, works again, and exits. Then the daemon
must exit by itself, with status 0: the namespace's last process is gone,
and with it the view (the daemon holds no copy of it). Everything runs with
timeouts; a hang is freed through fusectl's ``abort`` of our connection only,
and only processes this test started are killed, by pid.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fsutil  # noqa: E402
import mounttab  # noqa: E402
import ns_util  # noqa: E402
from records import RECORD  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.fuse]

#: Generous: two cores shared with other test runs. A deadlock shows as this timeout.
SCRIPT_TIMEOUT = 90
FUSECTL = "/sys/fs/fuse/connections"

#: Runs inside the namespace; $1 scratch dir, $2 mode (table|xattr), $3 disk id of view id 0.
#: Prints KEY=VALUE lines the test checks. `set -e`: any failing step ends it non-zero.
#: Table mode asks for the FUSE daemon: an idmapped bind mount (backend=kernel) has none.
#: No allow_shared_source: in the user namespace the host's directories above the scratch dir
#: read as the overflow id, and the private-SOURCE check takes them as the host's (root's).
RECIPE = r"""
set -eu
D=$1; MODE=$2; BASE=$3
SHIFTFS=$4
if [ "$MODE" = xattr ]; then
    "$SHIFTFS" mount --xattr -o log=$D/daemon.log $D/rt $D/rv
else
    "$SHIFTFS" mount --map b:$BASE:0:65536 -o backend=fuse,log=$D/daemon.log $D/rt $D/rv
fi
mountpoint -d $D/rv > $D/dev
cd $D/rv
mkdir -p mnt/oldroot usr proc
for n in bin sbin lib lib64; do ln -s usr/$n $n; done
mount --bind /usr usr
mount --rbind /proc proc  # umount(8) reads /proc/self/mountinfo
pivot_root . mnt/oldroot
cd /
echo hello > /f1
chown 1:2 /f1
mkdir /d
chown 3:4 /d
echo "LS=$(ls / | tr '\n' ' ')"
echo "F1=$(stat -c %u:%g /f1) $(cat /f1)"
echo "D=$(stat -c %u:%g /d)"
umount -l /mnt/oldroot
echo more >> /f1
ln -s f1 /l1
echo "AFTER=$(cat /f1 | tr '\n' ' ')$(readlink /l1) $(ls /mnt/oldroot | wc -l)"
"""


#: A user namespace of the subid user's ranges (root: the user), with a mount namespace of its own.
USERNS = ["unshare", "--user", "--map-auto", "--map-root-user", "--mount"]


def _abort_connection(scratch) -> None:
    """Free a hung daemon: abort the FUSE connection whose device the recipe wrote down."""
    try:
        majmin = open(os.path.join(scratch, "dev")).read().strip()
    except OSError:
        return
    if not os.path.isdir(os.path.join(FUSECTL, "0")) and not os.listdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], capture_output=True, timeout=10)
    minor = majmin.split(":")[1]
    try:
        with open(os.path.join(FUSECTL, minor, "abort"), "w") as f:
            f.write("1")
    except OSError:
        pass


def _in_session(sid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[4]) == sid:
                        out.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return out


def run_recipe(argv: list[str], scratch) -> tuple[subprocess.CompletedProcess | None, list[int], bool]:
    """Run the recipe; return (result, daemon pids it left to us, whether it hung).

    While it runs this process is a child subreaper, so the daemon (which
    double-forks) becomes our child: we can wait for it and read its status.
    """
    hung = False
    with mounttab.adopting() as new:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = p.communicate(timeout=SCRIPT_TIMEOUT)
        except subprocess.TimeoutExpired:
            hung = True
            _abort_connection(scratch)
            for pid in _in_session(p.pid):
                os.kill(pid, signal.SIGKILL)
            out, err = p.communicate(timeout=30)
    # A daemon that is exiting right now has already dropped its memory (empty
    # cmdline) but may not be a zombie yet: count it as well.
    daemons = [
        pid
        for pid in new
        if "mount" in mounttab._cmdline(pid) or not mounttab._cmdline(pid) or mounttab._proc_state(pid) == "Z"
    ]
    return subprocess.CompletedProcess(argv, p.returncode, out, err), daemons, hung


def _reap_unaided(pid: int, timeout: float = 20) -> int | None:
    """The daemon's wait status if it exits by itself in time; else None (then it is killed:
    our SIGTERM would make it exit 0 and pass for a clean exit)."""
    st = fsutil.reap(pid, timeout=timeout, kill=False)
    if st is None:
        fsutil.reap(pid, timeout=1)
    return st


def _values(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _finish(res, daemons, hung, scratch) -> None:
    """The recipe ran to its end and every daemon it started exited 0 by itself."""
    log = ""
    try:
        log = open(os.path.join(scratch, "daemon.log")).read()[-3000:]
    except OSError:
        pass
    statuses = {pid: _reap_unaided(pid) for pid in daemons}
    assert not hung, f"the recipe hung (daemon deadlocked?)\n{res.stderr[-2000:]}\n{log}"
    assert res.returncode == 0, f"recipe failed ({res.returncode}):\n{res.stdout}\n{res.stderr[-2000:]}\n{log}"
    assert len(daemons) == 1, f"expected the one daemon as our child, have {daemons}"
    for pid, st in statuses.items():
        assert st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, (
            f"daemon {pid} did not exit cleanly by itself (status {st})\n{log}"
        )
    assert "Traceback" not in log, log


def _check_view(out: str, table_base: int | None, scratch, xattr: bool) -> None:
    v = _values(out)
    assert {"bin", "d", "f1", "mnt", "usr"} <= set(v["LS"].split()), v
    assert v["F1"] == "1:2 hello", v
    assert v["D"] == "3:4", v
    # after umount -l of the old root: the view still works, the old root is gone
    assert v["AFTER"] == "hello more f1 0", v
    f1 = os.lstat(os.path.join(scratch, "rt", "f1"))
    if xattr:
        assert os.getxattr(os.path.join(scratch, "rt", "f1"), RECORD).startswith(b"1:2:")
        assert stat.S_IMODE(f1.st_mode) & 0o7022 == 0
    else:
        assert (f1.st_uid, f1.st_gid) == (table_base + 1, table_base + 2)


@pytest.fixture
def pivot_scratch():
    d = fsutil.make_scratch(prefix="shiftfs-pivot-")
    (d / "rt").mkdir()
    (d / "rv").mkdir()
    try:
        yield d
    finally:
        fsutil.remove_scratch(d)


@pytest.mark.parametrize("mode", ["table", "xattr"])
def test_pivot_as_root(pivot_scratch, mode):
    """Host root, ``unshare --mount``: pivot into the view, work, ``umount -l`` the old root, exit."""
    d = pivot_scratch
    base = 100000
    if mode == "table":
        os.chown(d / "rt", base, base)
    argv = ["unshare", "--mount", "sh", "-c", RECIPE, "sh", str(d), mode, str(base), fsutil.SHIFTFS]
    res, daemons, hung = run_recipe(argv, d)
    _finish(res, daemons, hung, d)
    _check_view(res.stdout, base, d, mode == "xattr")


subid_user = ns_util.users_fixture(1, 0, one=True)


@pytest.mark.parametrize("mode", ["table", "xattr"])
def test_pivot_as_user(pivot_scratch, subid_user, mode):
    """A plain user with a subuid range: ``unshare --user --map-auto --map-root-user --mount``."""
    d, u = pivot_scratch, subid_user
    ns_util.chown_tree(str(d), u)
    # Inside, namespace id 0 is the user and 1..65535 its subordinate ids: the
    # table maps disk id 1000+k (namespace ids) to view id k.
    base = 1000
    if mode == "table":
        os.chown(d / "rt", u.subid[0] + base - 1, u.subid[0] + base - 1)
    argv = u.wrap(
        [
            *USERNS,
            "sh",
            "-c",
            RECIPE,
            "sh",
            str(d),
            mode,
            str(base),
            fsutil.SHIFTFS,
        ]
    )
    res, daemons, hung = run_recipe(argv, d)
    _finish(res, daemons, hung, d)
    _check_view(res.stdout, u.subid[0] + base - 1, d, mode == "xattr")


def test_pivot_issue_recipe_with_pid_namespace(pivot_scratch, subid_user):
    """The issue's exact recipe (``--pid --fork`` too): no hang, nothing left behind.

    The daemon lives in the child pid namespace, so it ends with it; what
    matters is that the recipe finishes and no process stays (in D state).
    """
    d, u = pivot_scratch, subid_user
    ns_util.chown_tree(str(d), u)
    argv = u.wrap(
        [
            *USERNS,
            "--pid",
            "--fork",
            "sh",
            "-c",
            RECIPE,
            "sh",
            str(d),
            "xattr",
            "0",
            fsutil.SHIFTFS,
        ]
    )
    res, daemons, hung = run_recipe(argv, d)
    assert not hung, res.stderr[-2000:]
    assert res.returncode == 0, res.stderr[-2000:]
    _check_view(res.stdout, None, d, True)
    fsutil.wait_for(lambda: not ns_util.processes_mentioning(str(d)), 20, what="no process left")


def test_umount_ends_daemon_while_another_mount_lives(pivot_scratch):
    """The daemon holds no copy of other mounts: in one private namespace, mount A then B,
    unmount A: A's daemon exits (a copy of A held by B's daemon would keep it alive)."""
    d = pivot_scratch
    script = r"""
    set -eu
    D=$1; SHIFTFS=$2
    mkdir $D/a $D/va $D/b $D/vb
    "$SHIFTFS" mount --xattr $D/a $D/va
    "$SHIFTFS" mount --xattr $D/b $D/vb
    echo x > $D/vb/f
    "$SHIFTFS" umount $D/va
    i=0
    while pgrep -f "shiftfs mount --xattr $D/a " >/dev/null; do
        i=$((i+1)); [ $i -lt 100 ] || { echo A_ALIVE=1; break; }; sleep 0.1
    done
    cat $D/vb/f
    "$SHIFTFS" umount $D/vb
    """
    res, daemons, hung = run_recipe(["unshare", "--mount", "sh", "-c", script, "sh", str(d), fsutil.SHIFTFS], d)
    statuses = [_reap_unaided(pid) for pid in daemons]
    assert not hung and res.returncode == 0, res.stderr[-2000:]
    assert "A_ALIVE" not in res.stdout, "A's daemon kept serving after its umount"
    assert len(daemons) == 2 and all(
        st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0 for st in statuses
    ), statuses


def test_sigterm_still_unmounts(shiftfs_mount):
    """The served mount is not in the daemon's namespace: SIGTERM still removes it."""
    m = shiftfs_mount("--map", fsutil.MAP, "-o", "backend=fuse")
    with open(os.path.join(m.mountpoint, "f"), "w") as f:
        f.write("x")
    os.kill(m.pid, signal.SIGTERM)
    st = fsutil.reap(m.pid, timeout=20)
    assert st is not None and os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, st
    assert not fsutil.is_mounted(m.mountpoint)
    with open(f"/proc/{os.getpid()}/mountinfo") as f:
        assert m.mountpoint not in f.read()
