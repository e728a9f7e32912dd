"""Shared pytest fixtures for shiftfs's real-mount tests (helpers live in fsutil.py).

Fixtures:

* ``scratch`` — a fresh 0755 directory (reachable by other users), removed
  afterwards once nothing is mounted below it.
* ``shiftfs_mount`` — a factory: ``shiftfs_mount("--map", MAP)`` makes ``src``/``mp`` under
  ``scratch`` (or uses ``source=``/``mountpoint=``), mounts through the CLI and
  returns a :class:`fsutil.Mount`; every mount is detached and its daemon
  reaped at teardown, also when the test failed.
* ``mode`` — ``"table"`` and ``"xattr"`` in turn (``fsutil.MODE_ARGS`` holds their arguments).
* ``wd`` — a fresh directory every test user can enter (``ns_util.workdir``),
  removed afterwards; ``ns_util.users_fixture(N, M)`` makes a module's
  throwaway users.
* ``shiftfs_on_path`` — makes sure ``shiftfs`` is on root's PATH as
  ``/usr/local/bin/shiftfs`` (what ``mount -t fuse.shiftfs`` and fstab lines
  run through ``mount.fuse3``).

Markers: ``root`` (skips unless uid 0), ``fuse`` (skips without /dev/fuse).
The log policy, one for every mount: a failing test gets the daemon log of
each :class:`fsutil.Mount` it mounted (and of older ones still mounted).
With ``SHIFTFS_CI=1`` (``.ci/run`` sets it) a test that would skip because a
tool is missing (a ``skipif`` whose reason starts with "needs", other than "needs root") fails instead:
``make setup`` installs every such tool, so in CI a skip is a setup bug.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fsutil  # noqa: E402
import ns_util  # noqa: E402

LINK = "/usr/local/bin/shiftfs"


@pytest.fixture(autouse=True)
def _usual_umask():
    """Every test starts with umask 022, and none leaks its own (or a module
    fixture's) into the next test or module."""
    os.umask(0o022)
    try:
        yield
    finally:
        os.umask(0o022)


@pytest.fixture(scope="session")
def debian_tar():
    """The Debian bookworm minbase tarball (mmdebstrap, real root), built on
    first use into the cache (``SHIFTFS_CACHE_DIR``) and shared by every test
    that needs a real Debian root; skips only where it cannot be built."""
    why = ns_util.debian_tarball_unavailable()
    if why:
        pytest.skip(why)
    return ns_util.build_debian_tarball()


def pytest_configure(config):
    config.addinivalue_line("markers", "root: needs uid 0 (skipped otherwise)")
    config.addinivalue_line("markers", "fuse: needs /dev/fuse (skipped otherwise)")


#: Modules whose tests need no mount and no root: ``pytest -m "not mount"`` runs just these.
_NO_MOUNT_MODULES = ("test_unit", "test_record")


def _ci_tool_skip(item) -> str | None:
    """The reason of an applying ``skipif(…, reason="needs …")`` marker, under ``SHIFTFS_CI=1``."""
    if os.environ.get("SHIFTFS_CI") != "1":
        return None
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if mark.args and mark.args[0] is True and reason.startswith("needs") and not reason.startswith("needs root"):
            return reason
    return None


def pytest_collection_modifyitems(config, items):
    not_root = os.geteuid() != 0
    no_fuse = not os.path.exists("/dev/fuse")
    for item in items:
        if not item.module.__name__.startswith(_NO_MOUNT_MODULES):
            item.add_marker(pytest.mark.mount)
        if not_root and item.get_closest_marker("root"):
            item.add_marker(pytest.mark.skip(reason="needs root"))
        if no_fuse and item.get_closest_marker("fuse"):
            item.add_marker(pytest.mark.skip(reason="needs /dev/fuse"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._shiftfs_first_mount = len(fsutil.MOUNTS)  # mounts from here on are this test's
    # before pytest's own skipif evaluation (also tryfirst, but registered earlier)
    why = _ci_tool_skip(item)
    if why:
        pytest.fail(f"SHIFTFS_CI=1: this test would skip ({why}); 'make setup' must install it", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed:
        first = getattr(item, "_shiftfs_first_mount", len(fsutil.MOUNTS))
        older = [m for m in fsutil.MOUNTS[:first] if fsutil.is_mounted(m.mountpoint)]
        shown = set()
        for m in older + fsutil.MOUNTS[first:]:
            text = m.log_text()
            if text and m.log not in shown:
                shown.add(m.log)
                rep.sections.append((f"shiftfs daemon log {m.log}", text[-6000:]))


@pytest.fixture
def scratch():
    d = fsutil.make_scratch()
    try:
        yield d
    finally:
        fsutil.remove_scratch(d)


@pytest.fixture(params=sorted(fsutil.MODE_ARGS))
def mode(request):
    """Each of table and xattr mode (``fsutil.MODE_ARGS[mode]``: its arguments); a module's
    own ``mode`` fixture or parametrization takes precedence."""
    return request.param


@pytest.fixture
def wd():
    """A fresh directory every test user can enter, removed afterwards (modes lifted first)."""
    d = ns_util.workdir()
    yield d
    ns_util.remove_tree(d)


@pytest.fixture
def shiftfs_mount(scratch):
    """Factory fixture: ``m = shiftfs_mount(*cli_args, source=None, mountpoint=None, **mount_kw)``."""
    made: list[fsutil.Mount] = []
    counter = [0]

    def make(*args, source=None, mountpoint=None, **kw):
        counter[0] += 1
        n = counter[0]
        if source is None:
            source = scratch / (f"src{n}" if n > 1 else "src")
            source.mkdir()
        if mountpoint is None:
            mountpoint = scratch / (f"mp{n}" if n > 1 else "mp")
            mountpoint.mkdir()
        m = fsutil.Mount(source, mountpoint, *args, **kw).mount()
        made.append(m)
        return m

    yield make
    errors = []
    for m in reversed(made):
        try:
            m.__exit__(None, None, None)
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.fixture(scope="session")
def shiftfs_on_path():
    """``/usr/local/bin/shiftfs`` → the venv's script, for mount(8) helpers.

    ``make setup`` is meant to create it; if it is missing the fixture creates
    it and removes it again at the end of the session.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to create /usr/local/bin/shiftfs")
    created = False
    if not os.path.lexists(LINK):
        try:
            os.symlink(fsutil.SHIFTFS, LINK)
            created = True
        except FileExistsError:
            pass
    target = os.path.realpath(LINK)
    if not os.access(target, os.X_OK):
        pytest.skip(f"{LINK} exists but is not executable ({target})")
    yield LINK
    if created and os.path.islink(LINK) and os.readlink(LINK) == fsutil.SHIFTFS:
        os.unlink(LINK)
