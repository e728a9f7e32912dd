"""The patched pyfuse3 (patches/pyfuse3, built by scripts/pyfuse3.sh): its own tests.

Each patch of the series carries a test in pyfuse3's style (test/test_*.py of the
patched sdist under build/pyfuse3). They run here against the pyfuse3 installed in
the venv, together with pyfuse3's own file-system tests (test_fs.py), so a change of
the series is checked the way upstream would check it.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.root]

ROOT = Path(__file__).resolve().parent.parent
PATCH_TESTS = ["test_fallocate.py", "test_copy_file_range.py", "test_lseek.py", "test_cache_readdir.py"]
PATCH_TESTS += ["test_connection.py", "test_fs.py"]


def test_series_is_installed():
    import pyfuse3

    from shiftfs.fs.connection import PATCHED

    n = len(glob.glob(str(ROOT / "patches" / "pyfuse3" / "*.patch")))
    assert PATCHED, "pyfuse3 lacks the patch series: run 'make setup'"
    assert pyfuse3.__version__.endswith(f"+shiftfs.{n}"), pyfuse3.__version__


def test_patch_tests_pass():
    tests = sorted(glob.glob(str(ROOT / "build" / "pyfuse3" / "pyfuse3-*" / "test")))
    if not tests:
        pytest.skip("build/pyfuse3 is gone (it is left by 'make setup' when it builds pyfuse3)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/fuse")
    r = subprocess.run(
        # in a mount namespace of its own: a copy of a test mount in another namespace (made by
        # anything that unshares meanwhile) would keep its daemon alive after the lazy unmount
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "pytest", "-q"]
        + ["-p", "no:cacheprovider", *PATCH_TESTS],
        cwd=tests[-1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
