"""Early writeback (shiftfs.fs.filedata): while a program syncs its files, as dpkg does,
closing a written file starts its backing writeback, which ``sync_file_range`` asked for
and FUSE does not pass on; a program that never syncs is left alone. Counted through
``-o stats=FILE`` (the daemon's ``early_writeback``), through real mounts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from fsutil import Mount, wait_until
from rel_util import make_pair, work  # noqa: F401  (fixture)

MODES = ["table", "xattr"]


def _stats(m: Mount, path: str) -> dict:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.kill(m.pid, signal.SIGUSR1)
    assert wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, 10)
    time.sleep(0.05)
    return json.loads(Path(path).read_text())


def _write_files(d: Path, prefix: str, n: int) -> None:
    for i in range(n):
        with open(d / f"{prefix}{i}", "wb") as f:
            f.write(f"{prefix}{i}".encode() * 1000)


def _dpkg_like(mp: Path) -> None:
    """Unpack a 'package' and make it durable one file at a time, then unpack the next."""
    _write_files(mp, "a", 5)
    for i in range(5):
        fd = os.open(mp / f"a{i}", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    _write_files(mp, "b", 20)


@pytest.mark.parametrize("mode", MODES)
def test_files_closed_while_a_program_syncs_start_their_writeback(work, mode):  # noqa: F811
    src, mp = make_pair(work)
    stats = str(work / "stats.json")
    with Mount(src, mp, mode=mode, opts=[f"stats={stats}"]) as m:
        _write_files(mp, "plain", 20)
        assert _stats(m, stats)["early_writeback"] == 0  # tar, cp: never synced, left alone
        _dpkg_like(mp)
        # the 20 files written after the fsyncs (RELEASE comes after close returns: wait for it);
        # the fsyncs' own read-only opens wrote nothing and are not counted
        assert wait_until(lambda: _stats(m, stats)["early_writeback"] >= 20, 10)
        assert _stats(m, stats)["early_writeback"] == 20
        for i in range(20):
            assert (mp / f"b{i}").read_bytes() == f"b{i}".encode() * 1000
            assert (src / f"b{i}").read_bytes() == f"b{i}".encode() * 1000


def test_early_writeback_off(work):  # noqa: F811
    src, mp = make_pair(work)
    stats = str(work / "stats.json")
    with Mount(src, mp, mode="table", opts=[f"stats={stats}", "early_writeback=off"]) as m:
        _dpkg_like(mp)
        assert _stats(m, stats)["early_writeback"] == 0
