"""Cached directory listings (FOPEN_CACHE_DIR) and cached symlink targets (project issue 27).

With ``cache=always`` the kernel keeps a directory's listing and answers a second
listing without a READDIRPLUS request; every change through the mount (create,
mkdir, mknod, symlink, link, unlink, rmdir, rename in and out) must show in the very
next listing. With ``cache=auto|never`` listings are never kept, so a change made
behind the mount shows in the next listing. Symlink targets are cached with
``cache=always`` (one READLINK per symlink).
"""

from __future__ import annotations

import os

import pytest
from fsutil import MAP, MODE_ARGS

pytestmark = [pytest.mark.root, pytest.mark.fuse]


def _readdirs(m) -> int:
    return m.read_stats()["counts"].get("readdir", 0)


def _answered_from_cache(m, d: str, want: set[str]) -> bool:
    """Whether a listing of ``d`` (right) was answered with no READDIRPLUS. Three tries: the
    kernel may reclaim a cached listing under memory pressure, as it may reclaim any page."""
    for _ in range(3):
        n = _readdirs(m)
        assert set(os.listdir(d)) == want
        if _readdirs(m) == n:
            return True
    return False


def test_listing_cached_and_invalidated(shiftfs_mount, mode):
    m = shiftfs_mount(*MODE_ARGS[mode], stats=True)
    d = m.path("d")
    os.mkdir(d)
    os.mkdir(m.path("other"))
    for i in range(50):
        open(os.path.join(d, f"f{i}"), "w").close()
    want = {f"f{i}" for i in range(50)}
    assert set(os.listdir(d)) == want
    assert _answered_from_cache(m, d, want), "no second listing was answered from the kernel's cache"

    changes = [
        (lambda: open(os.path.join(d, "new"), "w").close(), {"new"}, set()),
        (lambda: os.mkdir(os.path.join(d, "sub")), {"sub"}, set()),
        (lambda: os.mkfifo(os.path.join(d, "fifo")), {"fifo"}, set()),
        (lambda: os.symlink("f1", os.path.join(d, "ln")), {"ln"}, set()),
        (lambda: os.link(os.path.join(d, "f2"), os.path.join(d, "hard")), {"hard"}, set()),
        (lambda: os.unlink(os.path.join(d, "f3")), set(), {"f3"}),
        (lambda: os.rmdir(os.path.join(d, "sub")), set(), {"sub"}),
        (lambda: os.rename(os.path.join(d, "f4"), os.path.join(d, "g4")), {"g4"}, {"f4"}),
        (lambda: os.rename(os.path.join(d, "f5"), m.path("other", "f5")), set(), {"f5"}),
        (lambda: os.rename(m.path("other", "f5"), os.path.join(d, "back")), {"back"}, set()),
    ]
    for change, added, removed in changes:
        change()
        want = (want | added) - removed
        assert set(os.listdir(d)) == want, (added, removed)
    # reopening keeps the cache while nothing changes
    assert _answered_from_cache(m, d, want)


@pytest.mark.parametrize("cache", ["auto", "never"])
def test_listing_not_cached_without_cache_always(shiftfs_mount, mode, cache):
    m = shiftfs_mount(*MODE_ARGS[mode], "-o", f"cache={cache}", stats=True)
    os.mkdir(m.path("d"))
    open(m.path("d", "a"), "w").close()
    assert os.listdir(m.path("d")) == ["a"]
    n = _readdirs(m)
    # a change behind the mount shows in the next listing
    open(m.backing("d", "b"), "w").close()
    assert sorted(os.listdir(m.path("d"))) == ["a", "b"]
    assert _readdirs(m) > n


def test_symlink_target_cached(shiftfs_mount, mode):
    m = shiftfs_mount(*MODE_ARGS[mode], stats=True)
    os.symlink("target", m.path("l"))
    assert os.readlink(m.path("l")) == "target"
    n = m.read_stats()["counts"].get("readlink", 0)
    for _ in range(5):
        assert os.readlink(m.path("l")) == "target"
    assert m.read_stats()["counts"].get("readlink", 0) == n
