"""Real clients of shiftfs (project issue 16): the device-table subcommand, trees
that fuse-overlayfs reads, umount while other mount namespaces hold a copy,
and the container-tool recipes of the README.

Everything runs the installed ``shiftfs`` script and the real tools
(fuse-overlayfs, unshare, podman, systemd-nspawn) as subprocesses; a tool that
is not installed skips its test with a reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

from fsutil import SHIFTFS, USER_ENV, run_as

#: An ordinary user for the unprivileged cases (no passwd entry needed).
USER = 4716


def _user_dir(scratch, name: str = "home") -> str:
    d = scratch / name
    d.mkdir()
    os.chown(d, USER, USER)
    return str(d)


# --- item 4: shiftfs devtable -----------------------------------------------------------------


@pytest.mark.root
def test_devtable_subcommand_as_a_user(scratch):
    """The README's build recipe, device-table line included, works for an
    ordinary user through the ``shiftfs`` command (not ``python3 -m``, which
    is Debian's python without the venv)."""
    home = _user_dir(scratch)
    r = run_as(USER, USER, f"cd {home} && mkdir -p rootfs/etc && echo x > rootfs/etc/hostname && "
                           f"{SHIFTFS} devtable mmdebstrap > dev.table && "
                           f"{SHIFTFS} export ./rootfs --device-table dev.table -o rootfs.tar && "
                           f"{SHIFTFS} devtable add - rootfs.tar added.tar")
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
    r = run_as(USER, USER, [SHIFTFS, "devtable", "add", os.path.join(home, "bad.table"),
                            os.path.join(home, "rootfs.tar"), os.path.join(home, "x.tar")])
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
    hits = subprocess.run(["grep", "-rn", "-e", "-m shiftfs.devtable", "README.md", "shiftfs/container",
                           "shiftfs/offline/commands.py", "shiftfs/cli.py"],
                          cwd=repo, capture_output=True, text=True, env=USER_ENV).stdout
    assert hits == ""
