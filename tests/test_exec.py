"""Tests for ``shiftfs exec`` (directories shifted for a command run as
namespace root on the host's filesystem) and for device tables.

The image tests run as a throwaway user with a subordinate id range: a
Debian minbase made with ``mmdebstrap --mode=root`` inside ``shiftfs exec``
is exported and compared entry by entry with the same build made by real
root (cached under /var/cache/shiftfs-test/); without the Debian archive a
generated tree unpacked with ``tar --same-owner`` stands in.
"""

from __future__ import annotations

import io
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import readme_util
from ns_util import (
    CACHE,
    EXIT_CASES,
    MIRROR,
    REPO,
    ROOT_USER,
    User,
    assert_usage_error,
    command_pid,
    host_owners,
    mirror_reachable,
    mounts_mentioning,
    processes_mentioning,
    pty_run,
    remove_tree,
    users_fixture,
    wait_for_line,
    workdir,
)
from records import record

from bench import artifacts, imagebuild
from shiftfs.container import exec as execcmd
from shiftfs.container import launcher, preflight
from shiftfs.offline import devtable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates test users: run as root")

REFERENCE_TAR = os.path.join(CACHE, "bookworm-minbase-exec-reference.tar")


def exec_argv() -> list[str]:
    return [sys.executable, "-m", "shiftfs", "exec"]


users = users_fixture(1, 1)


@pytest.fixture(scope="module")
def user(users) -> User:
    bad = preflight.blocked_component(execcmd.__file__, 65533, {65533}, 4)
    if bad:
        pytest.skip(f"{bad} is not searchable by other users; move the checkout (see README)")
    return users[0]


@pytest.fixture(params=["root", "user"])
def who(request, users) -> User:
    if request.param == "root":
        return ROOT_USER
    return request.getfixturevalue("user")


def owned_dir(path: str, owner: User) -> str:
    os.makedirs(path, exist_ok=True)
    os.chown(path, owner.uid, owner.gid)
    return path


def shiftfs_exec(
    owner: User, *args: str, cwd: str, timeout: float = 60, check: bool = True, env: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    argv = ["env", *env, *exec_argv(), *args] if env else [*exec_argv(), *args]
    res = subprocess.run(owner.wrap(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}")
    return res


def assert_clean(marker: str) -> None:
    deadline = time.monotonic() + 10
    while processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(marker) == []
    assert mounts_mentioning(marker) == []


def export(owner: User, root: str, out: str) -> str:
    subprocess.run(
        owner.wrap([sys.executable, "-m", "shiftfs", "export", root, "-o", out]),
        check=True,
        capture_output=True,
        timeout=300,
        cwd="/",
    )
    return out


_KINDS = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.LNKTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "chr",
    tarfile.BLKTYPE: "blk",
    tarfile.FIFOTYPE: "fifo",
}


def tar_entries(path: str) -> dict[str, tuple]:
    """name -> (type, mode, uid, gid, link target, device, hard link group):
    hard links are compared as the set of names that share an inode, so
    which name an archiver stored first does not matter."""
    raw: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            raw[devtable.archive_name(m.name)] = m
    groups: dict[str, set[str]] = {}
    for name, m in raw.items():
        if m.type == tarfile.LNKTYPE:
            first = devtable.archive_name(m.linkname)
            groups.setdefault(first, {first}).add(name)
    member_of = {n: frozenset(g) for g in groups.values() for n in g}
    out = {}
    for name, m in raw.items():
        kind = _KINDS[m.type]
        out[name] = (
            kind,
            f"{m.mode:04o}",
            m.uid,
            m.gid,
            m.linkname if kind == "symlink" else "",
            (m.devmajor, m.devminor) if kind in ("chr", "blk") else None,
            member_of.get(name),
        )
    return out


def diff_entries(want: dict, got: dict, limit: int = 20) -> list[str]:
    lines = []
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            lines.append(f"{name}: want {want.get(name)} got {got.get(name)}")
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


# --- shifting ----------------------------------------------------------------------

SCRIPT = """
set -e
id -u
pwd
echo hello > r/file
chown 1000:1000 r/file
cp /bin/true r/suid
chmod 4755 r/suid
mkdir -p r/home/alice
chown 1000:1000 r/home/alice
chmod 700 r/home/alice
ln -s file r/link
chown -h 7:8 r/link
ln r/file r/hard
mkfifo r/fifo
stat -c '%n %u:%g %a' r/file r/suid r/home/alice r/link
grep -q "$PWD/r .*fuse.shiftfs" /proc/self/mountinfo
grep "$PWD/r " /proc/self/mountinfo | grep -q allow_other && echo allow_other
"""


def test_shift_over_itself(who, wd):
    owned_dir(wd, who)
    r = owned_dir(os.path.join(wd, "r"), who)
    out = shiftfs_exec(who, "--shift", "r", "--", "sh", "-c", SCRIPT, cwd=wd).stdout.splitlines()
    assert out[:2] == ["0", wd]
    assert out[2:] == [
        "r/file 1000:1000 644",
        "r/suid 0:0 4755",
        "r/home/alice 1000:1000 700",
        "r/link 7:8 777",
        "allow_other",
    ]
    # On the host: everything is the caller's, the records hold the view.
    assert host_owners(r) == {(who.uid, who.gid)}
    assert record(f"{r}/file") == b"1000:1000:100644"
    assert record(f"{r}/suid") == b"0:0:104755"
    assert not os.stat(f"{r}/suid").st_mode & 0o4000
    assert_clean(r)
    # A second command sees the same view, also from a cwd inside it.
    out = shiftfs_exec(
        who, "--shift", r, "--", "sh", "-c", "pwd; stat -c '%u:%g %a' ../file alice", cwd=os.path.join(r, "home")
    )
    assert out.stdout.splitlines() == [os.path.join(r, "home"), "1000:1000 644", "1000:1000 700"]
    # The export carries the view.
    tar = export(who, r, os.path.join(wd, "r.tar"))
    entries = tar_entries(tar)
    assert entries["./file"][:4] == ("reg", "0644", 1000, 1000)
    assert entries["./suid"][:4] == ("reg", "4755", 0, 0)
    assert entries["./home/alice"][:4] == ("dir", "0700", 1000, 1000)
    assert entries["./link"][:5] == ("symlink", "0777", 7, 8, "file")
    assert entries["./fifo"][0] == "fifo"
    assert entries["./hard"][6] == frozenset({"./file", "./hard"})


def test_dst_elsewhere_and_nested(user, wd):
    """SRC:DST mounts the view elsewhere (SRC stays unshifted); a shift
    inside another one is mounted on top of it, whatever the order given."""
    owned_dir(wd, user)
    src = owned_dir(os.path.join(wd, "src"), user)
    dst = owned_dir(os.path.join(wd, "dst"), user)
    inner = owned_dir(os.path.join(wd, "inner"), user)
    owned_dir(os.path.join(src, "sub"), user)
    script = """
    set -e
    touch dst/f && chown 1000:1000 dst/f
    touch dst/sub/g && chown 2000:2000 dst/sub/g
    stat -c '%n %u:%g' dst/f src/f dst/sub/g inner/g
    """
    out = shiftfs_exec(
        user, "--shift", f"inner:{wd}/dst/sub", "--shift", "src:dst", "--", "sh", "-c", script, cwd=wd
    ).stdout.splitlines()
    # src itself is the host directory: the caller's files are view id 0.
    assert out == ["dst/f 1000:1000", "src/f 0:0", "dst/sub/g 2000:2000", "inner/g 0:0"]
    assert record(f"{src}/f") == b"1000:1000:100644"
    assert record(f"{inner}/g") == b"2000:2000:100644"
    assert not os.path.exists(f"{dst}/f")
    assert host_owners(wd) == {(user.uid, user.gid)}
    assert_clean(src)


def test_nested_user_namespaces_use_the_views(user, wd):
    """allow_other: a user namespace made inside COMMAND (what sandboxes and
    apt's _apt do) reads and writes the shifted directory."""
    owned_dir(wd, user)
    r = owned_dir(os.path.join(wd, "r"), user)
    script = """
    set -e
    echo data > r/f
    chown 42:42 r/f && chmod 0600 r/f
    unshare --user --map-root-user sh -c 'cat /proc/self/uid_map; touch r/from-nested'
    setpriv --reuid 42 --regid 42 --clear-groups sh -c 'cat r/f; id -u'
    stat -c '%u:%g' r/from-nested
    """
    out = shiftfs_exec(user, "--shift", "r", "--", "sh", "-c", script, cwd=wd).stdout.split()
    assert out == ["0", "0", "1", "data", "42", "0:0"]
    assert record(f"{r}/f") == b"42:42:100600"
    assert host_owners(r) == {(user.uid, user.gid)}


def test_host_filesystem_as_it_is(user, wd):
    owned_dir(wd, user)
    owned_dir(os.path.join(wd, "r"), user)
    with open("/etc/hostname") as f:
        hostname = f.read().strip()
    script = """
    cat /etc/hostname
    echo $$ $HOME
    ls /proc | grep -c '^[0-9]'
    touch outside && stat -c %u outside
    echo $PATH | tr : '\\n' | grep -cx /usr/sbin
    """
    out = shiftfs_exec(
        user, "--shift", "r", "--", "sh", "-c", script, cwd=wd, env=("HOME=/nonexistent-home", "PATH=/usr/bin:/bin")
    )
    lines = out.stdout.splitlines()
    assert lines[0] == hostname
    assert lines[1] == "2 /nonexistent-home"  # own pid namespace, caller's environment
    assert int(lines[2]) <= 5  # a /proc of that pid namespace (init, sh, ls, grep)
    assert lines[3:] == ["0", "1"]
    assert os.stat(os.path.join(wd, "outside")).st_uid == user.uid


# --- exit status, signals, teardown ------------------------------------------------------


@pytest.mark.parametrize("cmd,code", EXIT_CASES)
def test_exit_status(wd, cmd, code):
    r = owned_dir(os.path.join(wd, "r"), ROOT_USER)
    res = shiftfs_exec(ROOT_USER, "--shift", r, "--", *cmd, cwd=wd, check=False)
    assert res.returncode == code, res.stderr
    if code in (126, 127):
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shiftfs exec: ")
    assert_clean(r)


def _start(owner: User, cwd: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        owner.wrap([*exec_argv(), *args]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd
    )


def test_sigterm_reaches_command(user, wd):
    owned_dir(wd, user)
    r = owned_dir(os.path.join(wd, "r"), user)
    p = _start(
        user,
        wd,
        "--shift",
        "r",
        "--",
        "sh",
        "-c",
        'trap "chown 5:5 r/f; echo got-term; exit 42" TERM; touch r/f; echo ready; while :; do sleep 0.05; done',
    )
    wait_for_line(p.stdout, "ready", 30)
    os.kill(command_pid(p, user, "shiftfs exec"), signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 42, err
    assert "got-term" in out
    assert record(f"{r}/f") == b"5:5:100644"  # written out before exec returned
    assert_clean(r)


def test_ctrl_c_on_a_terminal(wd):
    """^C on the terminal: COMMAND (in the caller's process group, on the
    host's /dev) gets SIGINT once; the supervisors do not relay a copy."""
    r = owned_dir(os.path.join(wd, "r"), ROOT_USER)
    script = (
        "n=0; trap 'n=$((n+1)); echo \"int $n\"' INT; tty; echo ready; "
        'sleep 1 & wait; sleep 0.5; echo "total $n"; exit 3'
    )
    text, code = pty_run([*exec_argv(), "--shift", r, "--", "sh", "-c", script], wd, when=b"ready", send=b"\x03")
    assert "total 1" in text, text
    assert "/dev/pts/" in text  # the caller's terminal, as it is
    assert code == 3
    assert_clean(r)


def test_sigkill_of_exec_leaves_nothing(user, wd):
    owned_dir(wd, user)
    r = owned_dir(os.path.join(wd, "r"), user)
    marker = "shiftfs-exec-kill-marker"
    p = _start(
        user, wd, "--shift", "r", "--", "sh", "-c", f"touch r/f; chown 3:3 r/f; echo ready; sleep 60; : {marker}"
    )
    wait_for_line(p.stdout, "ready", 30)
    os.kill(command_pid(p, user, "shiftfs exec"), signal.SIGKILL)
    p.communicate(timeout=30)
    assert_clean(marker)
    assert_clean(r)  # the daemon (its command line names SRC) is gone too
    assert record(f"{r}/f") == b"3:3:100644"
    assert host_owners(r) == {(user.uid, user.gid)}


def test_single_id_fallback(users, wd):
    u = users[1]
    owned_dir(wd, u)
    owned_dir(os.path.join(wd, "r"), u)
    res = shiftfs_exec(
        u,
        "--shift",
        "r",
        "--",
        "sh",
        "-c",
        "cat /proc/self/uid_map; touch r/f outside; chown 0:0 r/f && echo chown0-ok; "
        "chown 1000:1000 r/f && echo recorded; chown 1000:1000 outside",
        cwd=wd,
        check=False,
    )
    notes = [line for line in res.stderr.splitlines() if "note:" in line]
    assert len(notes) == 1 and "usermod --add-subuids" in notes[0] and u.name in notes[0]
    assert notes[0].startswith("shiftfs exec: ")
    assert "APT::Sandbox::User" in notes[0]
    # In the view the chown is trapped and recorded; outside it the kernel refuses it as before.
    assert "Invalid argument" in res.stderr and "outside" in res.stderr
    assert res.stdout.split() == ["0", str(u.uid), "1", "chown0-ok", "recorded"]
    assert res.returncode == 1
    assert tar_entries(export(u, os.path.join(wd, "r"), os.path.join(wd, "r.tar")))["./f"][2:4] == (1000, 1000)
    assert host_owners(wd) == {(u.uid, u.gid)}
    res = shiftfs_exec(u, "--userns", "full", "--", "true", cwd=wd, check=False)
    assert res.returncode == 125 and "usermod --add-subuids" in res.stderr


def test_unprivileged_range_and_no_shift(user, wd):
    out = shiftfs_exec(user, "--", "sh", "-c", "cat /proc/self/uid_map; id -u", cwd="/").stdout
    rows = [line.split() for line in out.strip().splitlines()]
    assert rows == [["0", str(user.uid), "1"], ["1", str(user.subid[0]), str(user.subid[1])], ["0"]]


def test_map_mode_with_a_fixed_block(wd):
    r = owned_dir(os.path.join(wd, "r"), ROOT_USER)
    base = 0x70000000 - 0x30000
    opts = ["--map", "b:0:0:65536", "--userns-base", str(base), "--shift", r, "--"]
    shiftfs_exec(ROOT_USER, *opts, "sh", "-c", f"touch {r}/f && chown 7:8 {r}/f", cwd=wd)
    st = os.stat(os.path.join(r, "f"))
    assert (st.st_uid, st.st_gid) == (base + 7, base + 8)


def test_bad_inputs_get_one_line(users, wd, capsys):
    mine = owned_dir(os.path.join(wd, "mine"), ROOT_USER)
    other = owned_dir(os.path.join(wd, "other"), users[0])
    afile = os.path.join(wd, "file")
    open(afile, "w").close()
    cases = [
        (["--shift", os.path.join(wd, "missing"), "--", "true"], "does not exist"),
        (["--shift", afile, "--", "true"], "not a directory"),
        (["--shift", f"{mine}:{wd}/nodst", "--", "true"], "DST"),
        (["--shift", f"{mine}:", "--", "true"], "SRC[:DST]"),
        (["--shift", mine], "no COMMAND"),
        (["--shift", f"{mine}:/", "--", "true"], "shiftfs run"),
        (["--shift", other, "--", "true"], "chown -R 0"),
        (["--shift", mine, "--shift", f"{other}:{mine}", "--", "true"], "both mount on"),
        (["--map", "x:1", "--", "true"], "u|g|b:DISK:VIEW:COUNT"),
        (["--map", "b:0:0:65536", "--shift", mine, "--", "true"], "--userns-base"),
        (["--xattr", "--map", "b:0:0:1", "--", "true"], "exclude each other"),
        (["--userns-base", "12345", "--", "true"], "multiple of 65536"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        code = execcmd.COMMAND_LINE.main(args)
        err = capsys.readouterr().err
        assert_usage_error(code, err, needle, "exec", args)


def test_command_env_adds_sbin():
    env = execcmd.command_env({"PATH": "/usr/bin:/bin", "X": "1"})
    assert env["PATH"] == "/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin" and env["X"] == "1"
    assert execcmd.command_env({"PATH": "/sbin:/usr/sbin"})["PATH"] == "/sbin:/usr/sbin:/usr/local/sbin"


# --- device tables ----------------------------------------------------------------------


def test_device_table_parsing(tmp_path):
    entries = devtable.parse(devtable.MMDEBSTRAP_DEV)
    by_name = {e.name: e for e in entries}
    assert by_name["./dev/null"] == devtable.Entry("./dev/null", "c", 1, 3, 0o666, 0, 0)
    assert by_name["./dev/fd"].target == "/proc/self/fd"
    assert [e.name for e in entries] == sorted(by_name)
    t = devtable.parse("dev/sda b 8 0 0660 0 6  # a disk\n\n/run/initctl p - - 0600 0 0\n")
    assert [(e.name, e.kind, e.st_mode) for e in t] == [("./dev/sda", "b", 0o60660), ("./run/initctl", "p", 0o10600)]
    bad = [
        ("/dev/null c 1 3 0666 0", "fields"),
        ("/dev/null x 1 3 0666 0 0", "type"),
        ("/dev/null c one 3 0666 0 0", "major"),
        ("/dev/null c 1 3 0999 0 0", "octal"),
        ("/dev/null c 1 3 0666 -1 0", "uid"),
        ("/dev/pts d 1 2 0755 0 0", "'-'"),
        ("/dev/fd l - - 0777 0 0", "TARGET"),
        ("/dev/null c 1 3 0666 0 0 x", "only symlinks"),
        ("/../etc/x c 1 3 0666 0 0", ".."),
        ("/ d - - 0755 0 0", "root"),
        ("/dev/null c 1 3 0666 0 0\n/dev//null c 1 3 0666 0 0", "twice"),
    ]
    for text, needle in bad:
        with pytest.raises(devtable.DeviceTableError) as e:
            devtable.parse(text, "t")
        assert needle in str(e.value) and str(e.value).startswith("t:"), (text, e.value)
    p = tmp_path / "table"
    p.write_text("/dev/zero c 1 5 0666 0 0\n")
    table = devtable.DeviceTable.from_file(str(p))
    assert table.covers("dev/zero") and table.covers("./dev/zero") and not table.covers("./dev")
    assert table.mtime == int(p.stat().st_mtime)


def _small_tar(path: str) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:

        def add(name, type_, data=b"", **kw):
            ti = tarfile.TarInfo(name)
            ti.type = type_
            ti.size = len(data)
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add(".", tarfile.DIRTYPE, mode=0o755)
        add("./dev", tarfile.DIRTYPE, mode=0o755)
        add("./dev/null", tarfile.REGTYPE, mode=0o644)  # a placeholder to be replaced
        add("./etc", tarfile.DIRTYPE, mode=0o755)
        add("./etc/passwd", tarfile.REGTYPE, b"root:x:0:0::/root:/bin/sh\n" * 50, mode=0o644)
        add(
            "./etc/" + "l" * 150,
            tarfile.REGTYPE,
            b"long name",
            uid=1000,
            gid=1000,
            pax_headers={"SCHILY.xattr.user.k": "v"},
        )
        add("./etc/hard", tarfile.LNKTYPE, linkname="./etc/passwd")


def test_device_table_added_to_a_tar(tmp_path):
    src = str(tmp_path / "in.tar")
    _small_tar(src)
    table = devtable.DeviceTable(devtable.parse("/dev/null c 1 3 0666 0 0\n/dev/pts d - - 0755 0 5\n"), mtime=123)
    out = tmp_path / "out.tar"
    with open(out, "wb") as f:
        assert devtable.add_to_tar(src, f, table) == 1
    got = tar_entries(str(out))
    assert got["./dev/null"][:6] == ("chr", "0666", 0, 0, "", (1, 3))
    assert got["./dev/pts"][:4] == ("dir", "0755", 0, 5)
    want = tar_entries(src)
    for name in ("./etc/passwd", "./etc/" + "l" * 150, "./etc/hard", "."):
        assert got[name] == want[name]
    with tarfile.open(out) as tf:
        assert tf.getmember("./etc/" + "l" * 150).pax_headers["SCHILY.xattr.user.k"] == "v"
        assert tf.extractfile("./etc/passwd").read().count(b"\n") == 50
        assert tf.getmember("./dev/null").mtime == 123
    # GNU tar reads it, and the members not replaced are the input's bytes.
    assert subprocess.run(["tar", "-tvf", str(out)], capture_output=True).returncode == 0
    with open(src, "rb") as f:
        data = f.read()
    assert out.read_bytes().startswith(data[:1024])
    # A hard link target must not be replaced.
    with pytest.raises(devtable.DeviceTableError, match="hard link"):
        with open(tmp_path / "bad.tar", "wb") as f:
            devtable.add_to_tar(src, f, devtable.DeviceTable(devtable.parse("/etc/passwd c 1 3 0666 0 0")))
    # The command line: '-' is mmdebstrap's /dev.
    res = subprocess.run(
        [sys.executable, "-m", "shiftfs.devtable", "add", "-", src, str(tmp_path / "cli.tar")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    assert tar_entries(str(tmp_path / "cli.tar"))["./dev/tty"][5] == (5, 0)


# --- building images ------------------------------------------------------------------------


def _generated_tar(path: str) -> None:
    """A tree that needs root to unpack: owners, setuid/setgid, symlinks,
    hard links, a FIFO, a sticky directory (no devices: EPERM in a userns)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:

        def add(name, type_, mode, uid=0, gid=0, data=b"", linkname=""):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid = type_, mode, uid, gid
            ti.size, ti.linkname, ti.mtime = len(data), linkname, 1700000000
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add(".", tarfile.DIRTYPE, 0o755)
        for d in ("etc", "usr", "usr/bin", "home", "var", "var/mail"):
            add(f"./{d}", tarfile.DIRTYPE, 0o755)
        add("./tmp", tarfile.DIRTYPE, 0o1777)
        add("./var/mail", tarfile.DIRTYPE, 0o2775, 0, 8)
        add("./home/alice", tarfile.DIRTYPE, 0o700, 1000, 1000)
        add("./home/alice/.profile", tarfile.REGTYPE, 0o644, 1000, 1000, b"# hi\n")
        add("./etc/shadow", tarfile.REGTYPE, 0o640, 0, 42, b"root:*:1::::::\n")
        add("./usr/bin/su", tarfile.REGTYPE, 0o4755, data=b"\x7fELF fake")
        add("./usr/bin/wall", tarfile.REGTYPE, 0o2755, 0, 5, b"\x7fELF fake2")
        add("./usr/bin/su-hard", tarfile.LNKTYPE, 0o4755, linkname="./usr/bin/su")
        add("./bin", tarfile.SYMTYPE, 0o777, linkname="usr/bin")
        add("./etc/alice-link", tarfile.SYMTYPE, 0o777, 1000, 1000, linkname="/home/alice")
        add("./run-fifo", tarfile.FIFOTYPE, 0o600, 33, 33)
        add("./srv", tarfile.DIRTYPE, 0o750, 65534, 65534)


def test_tar_same_owner_as_namespace_root(user, wd):
    """The fallback of the image test, and what every build tool does at
    heart: unpack as root keeping owners, then export."""
    owned_dir(wd, user)
    rootfs = owned_dir(os.path.join(wd, "rootfs"), user)
    src = os.path.join(wd, "gen.tar")
    _generated_tar(src)
    os.chmod(src, 0o644)
    shiftfs_exec(
        user,
        "--shift",
        "rootfs",
        "--",
        "tar",
        "--same-owner",
        "--numeric-owner",
        "-xpf",
        "gen.tar",
        "-C",
        "rootfs",
        cwd=wd,
    )
    assert host_owners(rootfs) == {(user.uid, user.gid)}
    out = export(user, rootfs, os.path.join(wd, "out.tar"))
    want, got = tar_entries(src), tar_entries(out)
    assert diff_entries(want, got) == []


def test_setgid_kept_by_cp_a_and_setfacl(user, wd):
    """cp -a (and dpkg, usrmerge) write a minimal access ACL after chmod; the daemon's
    SGID rule must judge the caller it is told about. It read /proc/PID of another pid
    namespace, took root for an outsider and dropped the SGID of unix_chkpwd in a
    mmdebstrap build."""
    owned_dir(wd, user)
    owned_dir(os.path.join(wd, "r"), user)
    script = (
        "set -e; cp /bin/true r/u; chown 0:42 r/u; chmod 2755 r/u; cp -a r/u r/u2; "
        "setfacl -m g::rwx r/u; stat -c '%a %g' r/u r/u2"
    )
    out = shiftfs_exec(user, "--shift", "./r", "--", "sh", "-c", script, cwd=wd).stdout
    assert out.split() == ["2775", "42", "2755", "42"], out


def _dpkg_versions(status: bytes) -> dict[str, str]:
    out, pkg = {}, None
    for line in status.decode(errors="replace").splitlines():
        if line.startswith("Package: "):
            pkg = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and pkg:
            out[pkg] = line.split(": ", 1)[1]
    return out


def _tar_versions(path: str) -> dict[str, str] | None:
    status = artifacts.dpkg_status(path)
    return None if status is None else _dpkg_versions(status)


def reference_and_build(debian_tar: str, versions: dict[str, str], tar: str, full: str) -> tuple[dict, dict]:
    """The entries of the reference tarball (``versions`` as real root would build them) and of
    the built ``tar`` with mmdebstrap's /dev added from the device table (the kernel refused the
    device nodes), written to ``full``."""
    ref = reference_tar(debian_tar, versions)
    with open(full, "wb") as out:
        devtable.add_to_tar(tar, out, devtable.DeviceTable(devtable.parse(devtable.MMDEBSTRAP_DEV)))
    return tar_entries(ref), tar_entries(full)


def reference_tar(debian_tar: str, versions: dict[str, str]) -> str:
    """The real-root build (mmdebstrap --mode=root, tar output) with these
    package versions: the shared cached tarball, or our own one, rebuilt when
    the mirror has moved on since."""
    if _tar_versions(debian_tar) == versions:
        return debian_tar
    if _tar_versions(REFERENCE_TAR) == versions:
        return REFERENCE_TAR
    artifacts.build_minbase(REFERENCE_TAR, timeout=900)
    got = _tar_versions(REFERENCE_TAR)
    assert got == versions, "the Debian mirror changed between the two builds; rerun"
    return REFERENCE_TAR


@pytest.fixture(scope="module")
def debian_build(user):
    """``shiftfs exec --shift ./rootfs -- mmdebstrap --mode=root ...`` as the
    test user; yields (workdir, rootfs, export made right after the build)."""
    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is missing (apt-get install mmdebstrap)")
    if not mirror_reachable():
        pytest.skip(f"{MIRROR} is not reachable: test_tar_same_owner_as_namespace_root covers unpacking without it")
    # The README's recipe: its mkdir line as written, then its shiftfs exec line.
    mkdir, build = readme_util.sh_block("## Building images: `shiftfs exec`")[:2]
    argv = shlex.split(build)
    assert mkdir.startswith("mkdir ") and argv[:2] == ["shiftfs", "exec"], (mkdir, build)
    d = workdir()
    try:
        os.chown(d, user.uid, user.gid)
        subprocess.run(user.wrap(["sh", "-ec", mkdir]), cwd=d, check=True)
        rootfs = os.path.join(d, "rootfs")
        res = shiftfs_exec(user, *argv[2:], cwd=d, timeout=900, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        yield d, rootfs, export(user, rootfs, os.path.join(d, "rootfs.tar"))
    finally:
        remove_tree(d)


@pytest.mark.timeout(1200)  # may build the shared real-root tarball first
def test_mmdebstrap_matches_a_real_root_build(user, debian_build, debian_tar, tmp_path):
    d, rootfs, tar = debian_build
    assert host_owners(d) == {(user.uid, user.gid)}
    with open(os.path.join(rootfs, "var/lib/dpkg/status"), "rb") as f:
        versions = _dpkg_versions(f.read())
    assert "dpkg" in versions and "apt" in versions
    want, got = reference_and_build(debian_tar, versions, tar, str(tmp_path / "rootfs-dev.tar"))
    assert len(want) > 5000
    assert diff_entries(want, got) == []
    without_dev = tar_entries(tar)
    assert {n for n in want if n not in without_dev} == {e.name for e in devtable.parse(devtable.MMDEBSTRAP_DEV)} - {
        "./dev"
    }


@pytest.mark.timeout(1200)  # alone, it builds the module's Debian root first
def test_changes_inside_land_in_the_export(user, debian_build):
    d, rootfs, _ = debian_build
    script = """
    set -e
    chroot rootfs useradd -m -s /bin/sh builder
    chroot rootfs id -u builder
    mkdir rootfs/srv/data
    chown 1000:1000 rootfs/srv/data
    chmod u+s rootfs/usr/bin/env
    """
    out = shiftfs_exec(user, "--shift", "rootfs", "--", "sh", "-c", script, cwd=d, timeout=120).stdout
    assert out.split()[0] == "1000"
    assert host_owners(d) == {(user.uid, user.gid)}
    got = tar_entries(export(user, rootfs, os.path.join(d, "after.tar")))
    assert got["./home/builder"][:4][2:] == (1000, 1000)
    assert got["./home/builder/.profile"][2:4] == (1000, 1000)
    assert got["./srv/data"][:4] == ("dir", "0755", 1000, 1000)
    assert got["./usr/bin/env"][:4] == ("reg", "4755", 0, 0)
    assert got["./etc/shadow"][:4] == ("reg", "0640", 0, 42)
    assert got["./usr/bin/passwd"][:4] == ("reg", "4755", 0, 0)
    with tarfile.open(os.path.join(d, "after.tar")) as tf:
        passwd = tf.extractfile("./etc/passwd").read().decode()
    assert "builder:x:1000:1000::/home/builder:/bin/sh" in passwd
    assert_clean(rootfs)


def test_view_options(who, wd):
    """-o reaches every view's daemon (issue #28: build defaults can be tried);
    options the views do not take are refused with one line."""
    owned_dir(wd, who)
    r = owned_dir(os.path.join(wd, "r"), who)
    with open(os.path.join(r, "plain"), "w"):
        pass
    os.chown(os.path.join(r, "plain"), who.uid, who.gid)
    out = shiftfs_exec(
        who, "-o", "default_owner=7:8,nowriteback", "--shift", "r", "--", "stat", "-c", "%u:%g", "r/plain", cwd=wd
    )
    assert out.stdout.strip() == "7:8"
    bad = shiftfs_exec(who, "-o", "ro", "--shift", "r", "--", "true", cwd=wd, check=False)
    assert bad.returncode == 125 and len(bad.stderr.strip().splitlines()) == 1
    assert "-o ro: not an option of the views" in bad.stderr


def test_view_stats_follow_no_symlink(who, wd):
    """-o stats=FILE never writes through a symlink, neither at FILE nor on the way to it: the
    directory may be one a container's root can write (a bind, a shifted directory), and the
    daemon may be host root."""
    owned_dir(wd, who)
    owned_dir(os.path.join(wd, "a"), who)
    victim_dir = owned_dir(os.path.join(wd, "victim_dir"), who)
    victim = os.path.join(wd, "victim")
    with open(victim, "w") as f:
        f.write("keep")
    os.symlink("victim", os.path.join(wd, "st.json"))
    os.symlink("victim_dir", os.path.join(wd, "d"))
    for stats in ("st.json", "d/st.json"):
        shiftfs_exec(who, "-o", f"stats={stats}", "--shift", "a", "--", "touch", "a/x", cwd=wd)
    with open(victim) as f:
        assert f.read() == "keep"
    assert os.listdir(victim_dir) == []


def test_view_stats_name_each_views_counters(who, wd):
    """-o stats=FILE (relative to the caller's directory): each view's daemon writes its
    counters and its own CPU seconds when it exits, the first view to FILE, the second to
    FILE.1, before exec returns (how a build's daemon time is measured, issue #25)."""
    owned_dir(wd, who)
    for d in ("a", "b"):
        owned_dir(os.path.join(wd, d), who)
    shiftfs_exec(who, "-o", "stats=st.json", "--shift", "a", "--shift", "b", "--", "touch", "a/x", "b/y", cwd=wd)
    for name in ("st.json", "st.json.1"):
        with open(os.path.join(wd, name)) as f:
            data = json.load(f)
        assert data["counts"].get("create", 0) == 1, data
        # the daemon's CPU since it forked off (a touch costs it less than a clock tick)
        assert set(data["cpu_s"]) == {"user", "system"} and min(data["cpu_s"].values()) >= 0, data


def test_readme_mmdebstrap_recipe_runs_the_bench_options():
    """The README's mmdebstrap recipe builds with the options the bench times
    (bench.imagebuild.EXEC_OPTIONS), so the numbers it quotes are the recipe's."""
    build = readme_util.sh_block("## Building images: `shiftfs exec`")[1]
    assert build.startswith(f"shiftfs exec {' '.join(imagebuild.EXEC_OPTIONS)} --shift ./rootfs -- mmdebstrap "), build
