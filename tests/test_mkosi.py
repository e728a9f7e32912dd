"""The real mkosi, as an ordinary user, through ``shiftfs exec`` (the README's
"Building images with mkosi").

mkosi from Debian's bookworm-backports (24.3; ``make setup`` installs it)
builds a small Debian bookworm image (``Format=directory``: systemd, dbus,
passwd, polkitd) whose tree has files of several owners (polkitd's 997,
groups shadow, utmp, messagebus, systemd-journal …), setuid and setgid
modes, and an ACL (``/var/log/journal``, group adm). The recipe is
:mod:`bench.mkosibuild`. The real-root build is made once and cached (like the
minbase tarball); the user's build, with a subordinate range, under
``shiftfs exec --shift BUILD``, is exported with ``shiftfs export`` and
compared entry by entry with it: type, mode, owner, group, link target,
device, hard links, and every xattr (the ACLs, file capabilities). The same
build by a user without a range (a single-id namespace) is compared too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time

import pytest
import readme_util
from ns_util import CACHE, MIRROR, host_owners, mirror_reachable, remove_tree, throwaway_users, workdir
from test_exec import diff_entries, tar_entries

from bench import artifacts, mkosibuild
from shiftfs.offline import devtable

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates test users and builds the reference as root"),
]


def xattrs(path: str) -> dict[str, tuple]:
    """name -> the entry's xattrs (pax ``SCHILY.xattr.*``: ACLs in their binary form)."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf:
            out[devtable.archive_name(m.name)] = tuple(
                sorted((k, v) for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr."))
            )
    return out


@pytest.fixture(scope="module")
def mkosi_ready():
    why = mkosibuild.unavailable()
    if why:
        pytest.skip(why)
    if not mirror_reachable():
        pytest.skip(f"{MIRROR} is not reachable, so mkosi cannot download packages")


def _versions(path: str) -> bytes | None:
    status = artifacts.dpkg_status(path)
    if status is None:
        return None
    return b"\n".join(
        line for line in status.splitlines() if line.startswith((b"Package: ", b"Version: ", b"Status: "))
    )


def _user_build(user, d: str, single_id: bool = False) -> tuple[str, float]:
    """The README's recipe as ``user`` in ``d``: the export of the image, and the build's seconds."""
    os.chown(d, user.uid, user.gid)
    project, build = os.path.join(d, "project"), os.path.join(d, "build")
    mkosibuild.write_project(project, build, single_id=single_id)
    mkosibuild.prepare_build(build)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", d], check=True)
    argv = mkosibuild.exec_argv([sys.executable, "-m", "shiftfs"], project, build)
    t0 = time.monotonic()
    res = subprocess.run(user.wrap(argv), capture_output=True, text=True, timeout=2400, cwd=project)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-4000:]
    # nothing on disk but the user's own files
    assert host_owners(d) == {(user.uid, user.gid)}
    tar = os.path.join(d, "image.tar")
    subprocess.run(
        user.wrap([sys.executable, "-m", "shiftfs", "export", mkosibuild.image(build), "-o", tar]),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return tar, took


def _reference(tar: str) -> str:
    """The cached real-root build with the package versions of ``tar`` (rebuilt when the mirror moved on)."""
    ref = mkosibuild.reference_path(CACHE)
    if _versions(ref) != _versions(tar):  # absent, unreadable, or the mirror moved on
        artifacts.discard(ref)
        t1 = time.monotonic()
        mkosibuild.build_reference(ref)
        print(f"\nmkosi build: real root {time.monotonic() - t1:.1f} s", end="")
        assert _versions(ref) == _versions(tar), "the Debian mirror changed between the two builds; rerun"
    return ref


def test_readme_recipe_runs_the_tested_exec_options():
    """The README's mkosi recipes run ``shiftfs exec`` with the options the test and the bench
    build with (bench.mkosibuild.EXEC_OPTIONS), the range recipe and the single-id one alike."""
    want = f"shiftfs exec {' '.join(mkosibuild.EXEC_OPTIONS)} --shift ~/img/build -- mkosi -f build"
    for heading in ("### Building images with mkosi", "#### mkosi with one id"):
        lines = [ln for ln in readme_util.sh_block(heading) if "shiftfs exec" in ln]
        assert lines and all(ln.endswith(want) for ln in lines), (heading, lines)


@pytest.mark.timeout(3600)
def test_mkosi_as_a_user_matches_a_real_root_build(mkosi_ready):
    with throwaway_users(with_range=1, without_range=0) as (user,):
        d = workdir()
        try:
            tar, took = _user_build(user, d)
            ref = _reference(tar)
            print(f"\nmkosi build: shiftfs exec as a user with a range {took:.1f} s")
            want, got = tar_entries(ref), tar_entries(tar)
            assert len(want) > 5000
            assert diff_entries(want, got) == []
            assert diff_entries(xattrs(ref), xattrs(tar)) == []
            # what the tree must hold for this to mean something
            assert got["./usr/lib/dbus-1.0/dbus-daemon-launch-helper"][:4] == ("reg", "4754", 0, 101)
            assert got["./usr/sbin/unix_chkpwd"][:4] == ("reg", "2755", 0, 42)
            assert got["./etc/shadow"][:4] == ("reg", "0640", 0, 42)
            assert got["./var/lib/polkit-1"][:4] == ("dir", "0700", 997, 0)
            assert got["./var/log/journal"][:4] == ("dir", "2755", 0, 999)
            assert any(k == "SCHILY.xattr.system.posix_acl_access" for k, _ in xattrs(tar)["./var/log/journal"])
        finally:
            remove_tree(d)


@pytest.mark.timeout(3600)
def test_mkosi_with_one_id_and_the_finalize_script(mkosi_ready):
    """Without a range: mkosi 24 builds in the single-id namespace (its
    setgroups([0]) succeeds as a no-op, chown, device and ACL calls are
    recorded through the seccomp supervisor); with the README's finalize
    script, which gives /etc/shadow and /etc/gshadow back the group that
    systemd-sysusers copied from a stat showing 0, the export equals real
    root's build."""
    try:
        import seccomp  # noqa: F401
    except ImportError:
        pytest.skip("python3-seccomp is not linked into the venv (make setup)")
    with throwaway_users(with_range=0, without_range=1) as (user,):
        d = workdir()
        try:
            tar, took = _user_build(user, d, single_id=True)
            ref = _reference(tar)
            print(f"\nmkosi build: shiftfs exec as a user with one id {took:.1f} s")
            want, got = tar_entries(ref), tar_entries(tar)
            assert len(want) > 5000
            assert diff_entries(want, got) == []
            assert diff_entries(xattrs(ref), xattrs(tar)) == []
            assert got["./var/log/journal"][:4] == ("dir", "2755", 0, 999)
        finally:
            remove_tree(d)
