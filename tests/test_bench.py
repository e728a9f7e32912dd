"""The benchmark suite runs end to end in quick mode (never a speed threshold).

One quick run (tiny generated tree, 1 round, disk backing) into a temp dir; the
tests then check that the output files exist, that every installed target ran
every workload, and that the correctness guard passed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import guard  # noqa: E402
from bench import targets as T  # noqa: E402
from bench import workloads as W  # noqa: E402

NEEDS = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts and drops caches: needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(not shutil.which("fio"), reason="fio is not installed (make setup)"),
]


def needs_run(f):
    for m in NEEDS:
        f = m(f)
    return f


PEERS = {"bindfs": "bindfs", "fuse-overlayfs": "fuse-overlayfs", "fuse-overlayfs-xattr": "fuse-overlayfs"}
SHIFTFS = ("shiftfs-table", "shiftfs-xattr")
# Targets whose tree must match native's exactly.  The peers' own defects (bindfs 1.14
# reports a stale nlink after link(); fuse-overlayfs 1.10 with xattr_permissions shows
# special files as mode|0755 and ignores chown on them) are reported by the guard but
# are not this project's to fix, so for them the test only requires that the guard ran.
STRICT = ("native", "idmapped", "shiftfs-table-kernel") + SHIFTFS


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-quick")
    cp = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=270,
    )
    assert cp.returncode == 0, f"bench failed:\n{cp.stdout[-4000:]}\n{cp.stderr[-4000:]}"
    with open(out / "latest.json") as f:
        res = json.load(f)
    return out, res


def _usable(res, target):
    """Skip (with the bench's reason) targets that are not installed or not available yet."""
    info = res["targets"][target]
    if target in PEERS and not shutil.which(PEERS[target]):
        pytest.skip(f"{PEERS[target]} is not installed")
    reason = info.get("skip_reason") or ""
    if (
        target in SHIFTFS
        and info["status"].get("disk") != "ok"
        and ("not available yet" in reason or "not runnable" in reason)
    ):
        pytest.skip(f"shiftfs target skipped by the bench: {reason}")
    if target == "idmapped" and "user namespace" in reason:
        pytest.skip(reason)
    return info


@needs_run
def test_outputs_exist(quick):
    out, res = quick
    for name in ("latest.json", "latest.md", "latest.png"):
        p = out / name
        assert p.exists() and p.stat().st_size > 0, name
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "latest.md").read_text()
    assert "Correctness guard" in md and "native" in md
    assert res["machine"]["cores"] and res["machine"]["kernel"]
    assert res["summary"]["disk"], "no summary rows"


@needs_run
def test_no_leftovers(quick):
    """Cleanup: no mounts, daemons or work directories of the run remain."""
    _, res = quick
    base = res["workdir"]
    assert base and "shiftfs-bench." in base
    with open("/proc/self/mountinfo") as f:
        assert base not in f.read()
    assert not os.path.exists(base)
    alive = subprocess.run(["pgrep", "-f", base], capture_output=True, text=True).stdout.split()
    assert not alive, f"daemons still running: {alive}"


@needs_run
@pytest.mark.parametrize("target", [t.name for t in T.ALL])
def test_target_ran_every_workload(quick, target):
    _, res = quick
    info = _usable(res, target)
    assert info["status"].get("disk") == "ok", f"{target} was skipped: {info.get('skip_reason')}"
    got = {r["workload"]: r for r in res["records"] if r["target"] == target and r["backing"] == "disk"}
    for w in W.ALL:
        rec = got.get(w.name)
        assert rec is not None, f"{target}: no result for {w.name}"
        assert rec["error"] is None, f"{target} {w.name}: {rec['error']}"
        assert rec["seconds"] and rec["seconds"] > 0
    if target in ("shiftfs-table", "shiftfs-xattr", "bindfs", "fuse-overlayfs"):
        assert any(r.get("daemon_peak_rss_kib") for r in got.values()), "no daemon RSS recorded"


@needs_run
@pytest.mark.parametrize("target", [t.name for t in T.ALL])
def test_correctness_guard(quick, target):
    _, res = quick
    _usable(res, target)
    guards = [g for g in res["guards"] if g["target"] == target and g["backing"] == "disk"]
    checked = {g["workload"] for g in guards}
    want = {w.name for w in W.ALL if w.guard}
    assert checked == want, f"guard did not run for {sorted(want - checked)}"
    assert all(g["checked"] >= 0 for g in guards)
    if target in STRICT:
        failed = [g for g in guards if not g["passed"]]
        assert not failed, "; ".join(f"{g['workload']}: {g['examples'][:3]}" for g in failed)


# ---- the guard itself (no root needed) ------------------------------------------


def _tree(root, mode=0o644, link="a", size=3):
    os.makedirs(root / "d")
    (root / "d" / "a").write_bytes(b"x" * size)
    os.chmod(root / "d" / "a", mode)
    os.symlink(link, root / "d" / "s")
    os.link(root / "d" / "a", root / "d" / "h")


def test_guard_passes_identical_trees(tmp_path):
    _tree(tmp_path / "n")
    _tree(tmp_path / "t")
    res = guard.compare(
        "t", guard.view_snapshot(str(tmp_path / "n")), guard.view_snapshot(str(tmp_path / "t")), None, None
    )
    assert res["passed"] and res["checked"] == 5


@pytest.mark.parametrize("kw,field", [({"mode": 0o600}, "mode"), ({"link": "b"}, "link"), ({"size": 4}, "size")])
def test_guard_catches_a_wrong_tree(tmp_path, kw, field):
    _tree(tmp_path / "n")
    _tree(tmp_path / "t", **kw)
    res = guard.compare(
        "t", guard.view_snapshot(str(tmp_path / "n")), guard.view_snapshot(str(tmp_path / "t")), None, None
    )
    assert not res["passed"] and any(field in e for e in res["examples"])


def test_guard_catches_missing_and_extra(tmp_path):
    _tree(tmp_path / "n")
    _tree(tmp_path / "t")
    os.unlink(tmp_path / "t" / "d" / "s")
    (tmp_path / "t" / "extra").write_text("")
    res = guard.compare(
        "t", guard.view_snapshot(str(tmp_path / "n")), guard.view_snapshot(str(tmp_path / "t")), None, None
    )
    assert res["mismatches"] == 2


def test_guard_checks_stored_owners():
    view = {"f": ("file", 1, "0o644", 0, 0, None, None, 1)}
    shifted = {"f": (100000, 100000, "0o644")}
    unshifted = {"f": (0, 0, "0o644")}
    expect = T.ShiftfsTable.expect_store.__get__(object())
    assert guard.compare("t", view, view, shifted, expect)["passed"]
    bad = guard.compare("t", view, view, unshifted, expect)
    assert not bad["passed"] and "stored" in bad["examples"][0]


def test_override_xattr_format():
    assert guard.parse_override(b"7:8:100644") == (7, 8, "0o644")
    assert guard.parse_override(b"0:0:0666:char-1-3") == (0, 0, "0o666")


def test_generated_tree_shape(tmp_path):
    from bench import trees

    p = str(tmp_path / "g.tar")
    trees.generate(p, scale=0.05)
    st = trees.stats(p)
    c = st["counts"]
    assert c["dir"] > 30 and c["file"] > 300 and c["symlink"] > 20 and c["hardlink"] >= 1 and c["chardev"] == 8
    assert 0 in st["ids"] and 42 in st["ids"]


def test_partial_names_keep_the_extension():
    """mmdebstrap (and tar -a) choose the format from the name: a half-built
    artifact keeps the real extension, so it is a tar, not a directory."""
    from bench import artifacts

    assert artifacts.partial_name("/c/debian-bookworm-minbase.tar") == "/c/debian-bookworm-minbase.partial.tar"
    assert artifacts.partial_name("/c/rootfs.tar.zst") == "/c/rootfs.partial.tar.zst"
    assert artifacts.partial_name("x.cpio") == "x.partial.cpio"


def test_bad_cached_generated_tree_is_rebuilt(tmp_path):
    """A directory or a truncated file where the cached archive should be is
    discarded and rebuilt, never handed to a workload."""
    from bench import trees

    gen = tmp_path / "generated-minbase-shape-x0.02.tar"
    gen.mkdir()
    (gen / "junk").write_text("left by an old run")
    path, desc = trees.obtain("generated", 0.02, cache=str(tmp_path))
    assert path == str(gen) and os.path.isfile(path) and trees.stats(path)["entries"] > 100
    with open(path, "r+b") as f:
        f.truncate(4096)
    path, _ = trees.obtain("generated", 0.02, cache=str(tmp_path))
    assert trees.stats(path)["entries"] > 100


@pytest.mark.timeout(900)
def test_bench_builds_the_minbase_archive_on_a_fresh_machine(tmp_path):
    """The path `make bench` takes on a fresh machine: no cached archive, or a
    directory left where it should be (what a build under a `.part` name used
    to leave), gives a real Debian root tarball built with mmdebstrap."""
    from bench import artifacts, trees

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ns_util

    why = ns_util.debian_tarball_unavailable()
    if why:
        pytest.skip(why)
    stale = tmp_path / trees.MINBASE_NAME
    stale.mkdir()
    path, desc = trees.obtain("minbase", 1.0, cache=str(tmp_path))
    assert path == str(stale) and desc["kind"] == "debian-bookworm-minbase", desc
    assert artifacts.dpkg_status(path) is not None
    assert os.listdir(tmp_path) == [trees.MINBASE_NAME], "no partial artifact may stay behind"
    assert trees.stats(path)["entries"] > 5000


def test_chosen_workloads_bring_what_they_need():
    """`--workloads stat_cold` alone used to time `find` on a tree nobody made."""
    assert W.with_needs(["stat_cold"]) == ["untar", "stat_cold"]
    assert W.with_needs(["seq_read", "rm_rf"]) == ["untar", "seq_write", "seq_read", "rm_rf"]
    assert W.with_needs(["rand_rw"]) == ["rand_rw"]


# ---- image build (bench.imagebuild / imagerun): the plumbing, cheaply ------------------------
# A real build takes several minutes (two mmdebstrap runs plus the cache fill), so it is
# verified by `python -m bench --full --rounds 1 --workloads image_build`, not here.


def test_image_build_is_its_own_step_in_the_cli():
    from bench import cli
    from bench.runner import IMAGE_BUILD

    cfg, _ = cli.parse(["--full"])
    assert cfg.workloads[-1] == IMAGE_BUILD and "untar" in cfg.workloads
    cfg, _ = cli.parse(["--quick"])
    assert IMAGE_BUILD not in cfg.workloads, "--quick skips the image build unless asked"
    cfg, out = cli.parse(["--quick", "--workloads", IMAGE_BUILD])
    assert cfg.workloads == [IMAGE_BUILD]
    cfg, out = cli.parse(["--full", "--workloads", f"stat_cold,{IMAGE_BUILD}"])
    assert cfg.workloads == ["untar", "stat_cold", IMAGE_BUILD] and out.endswith("partial")
    with pytest.raises(SystemExit):
        cli.parse(["--workloads", "image-build"])


def _image_result():
    recs = []
    for rd, (root, shift, peer) in enumerate([(30.0, 60.0, 45.0), (28.0, 70.0, 42.0)]):
        recs += [
            {
                "backing": "disk",
                "round": rd,
                "target": "real-root",
                "workload": "image_build",
                "seconds": root,
                "error": None,
            },
            {
                "backing": "disk",
                "round": rd,
                "target": "shiftfs-exec",
                "workload": "image_build",
                "seconds": shift,
                "error": None,
            },
            {
                "backing": "disk",
                "round": rd,
                "target": "fuse-overlayfs-xattr",
                "workload": "image_build",
                "seconds": peer,
                "error": None,
                "daemon_cpu_s": 9.5,
            },
        ]
    from bench.imagebuild import BUILDS

    builds = {n: {"label": lab, "how": how, "status": {"disk": "ok"}} for n, (lab, how) in BUILDS.items()}
    builds["bindfs"]["status"]["disk"] = "cannot"
    builds["bindfs"]["reason"] = "the build failed: mmdebstrap exited 1: E: usrmerge failed. | E: no"
    return {
        "schema": 1,
        "date": "2026-12-01T00:00:00Z",
        "duration_s": 300.0,
        "mode": "full",
        "config": {"rounds": 2},
        "map": {"disk": 100000, "view": 0, "count": 65536},
        "machine": {"cores": 2},
        "tree": {},
        "targets": {},
        "rounds": [],
        "guards": [],
        "notes": [],
        "backings": {"disk": {"fstype": "ext4", "options": "rw"}},
        "records": recs,
        "workdir": None,
        "image_build": {
            "suite": "bookworm",
            "variant": "minbase",
            "command": "mmdebstrap ...",
            "builds": builds,
            "notes": [],
            "debs": {"dir": "/c", "count": 96, "bytes": 38e6},
            "checks": [
                {
                    "backing": "disk",
                    "build": "shiftfs-exec",
                    "passed": True,
                    "checked": 8700,
                    "mismatches": 0,
                    "examples": [],
                    "dev_not_made": 8,
                    "entries_ref": 8708,
                    "entries_got": 8700,
                    "how": "shiftfs export",
                },
                {
                    "backing": "disk",
                    "build": "fuse-overlayfs-xattr",
                    "passed": False,
                    "checked": 8708,
                    "mismatches": 3,
                    "examples": ["dev/null: view mode"],
                    "entries_ref": 8708,
                    "entries_got": 8708,
                    "how": "the view",
                },
            ],
        },
    }


def test_image_build_report_from_a_fabricated_result(tmp_path):
    from bench import report

    paths = report.write(_image_result(), str(tmp_path))
    md = open(paths["md"]).read()
    sec = md[md.index("## Image build") :]
    row = next(ln for ln in sec.splitlines() if ln.startswith("| shiftfs exec"))
    # medians 65 s and 2.25x (pairs 60/30 = 2.0, 70/28 = 2.5), with the min-max
    assert "65.0 s (60.0–70.0)" in row and "2.25× (2.00–2.50)" in row and "same tree" in row
    assert "8 entries of /dev not made" in row
    assert "| real root |" in sec and "reference" in sec
    bad = next(ln for ln in sec.splitlines() if ln.startswith("| fuse-overlayfs (xattr)"))
    assert "✗ 3 differences" in bad
    cannot = next(ln for ln in sec.splitlines() if ln.startswith("| bindfs |"))
    assert "cannot" in cannot and "mmdebstrap exited 1" in cannot
    assert "usrmerge failed. \\| E: no |" in cannot, "a '|' in a reason must not split the table cell"
    assert "apt-get update` still runs" in sec
    assert "## Backing: disk" not in md, "a run of only the image build has no per-target table"
    with open(paths["json"]) as f:
        res = json.load(f)
    s = res["image_build"]["summary"]["disk"]
    assert s["shiftfs-exec"]["ratio"] == pytest.approx(2.25) and s["real-root"]["ratio"] == 1.0
    assert s["fuse-overlayfs-xattr"]["daemon_cpu_s"] == 9.5
    # --render redraws the same from the JSON
    from bench import cli

    assert cli.main(["--render", paths["json"], "--out", str(tmp_path / "again")]) == 0
    assert "## Image build" in (tmp_path / "again" / "latest.md").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="makes owned files and device nodes: needs root")
def test_image_build_tree_check(tmp_path):
    """The check compares a directory tree with an exported tar: owners, modes,
    types and link targets; the /dev entries mmdebstrap makes only where mknod
    works are counted apart, anything else differing is a mismatch."""
    import tarfile

    from bench import imagebuild as IB

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "etc/shadow").write_text("x")
    os.chown(root / "etc/shadow", 0, 42)
    os.chmod(root / "etc/shadow", 0o640)
    os.symlink("shadow", root / "etc/link")
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    os.chmod(root, 0o755)
    tar = tmp_path / "export.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(root, arcname=".", filter=lambda ti: None if ti.name == "./dev/null" else ti)
    ref = IB.dir_snapshot(str(root))
    res = IB.compare_trees(ref, IB.tar_snapshot(str(tar)))
    assert res["passed"] and res["dev_not_made"] == 1, res
    with tarfile.open(tar, "w") as tf:

        def wrong(ti):
            if ti.name == "./etc/shadow":
                ti.gid = 0
            return ti

        tf.add(root, arcname=".", filter=wrong)
    res = IB.compare_trees(ref, IB.tar_snapshot(str(tar)))
    assert not res["passed"] and res["mismatches"] == 1 and "etc/shadow" in res["examples"][0]


def test_image_build_cache_counts_only_when_complete(tmp_path):
    from bench import imagebuild as IB

    d = tmp_path / IB.DEBS_NAME
    d.mkdir()
    (d / "apt_2.6.1_amd64.deb").write_bytes(b"x")
    (d / "base-files_12.4%3a1_amd64.deb").write_bytes(b"x")
    assert IB.cached_debs(str(tmp_path)) == [], "a fill cut off before its marker is not trusted"
    (d / IB.COMPLETE).write_text("done")
    debs = IB.cached_debs(str(tmp_path))
    assert len(debs) == 2
    rootfs = tmp_path / "rootfs"
    (rootfs / "var/lib/dpkg").mkdir(parents=True)
    (rootfs / "var/lib/dpkg/status").write_text(
        "Package: apt\nStatus: install ok installed\nVersion: 2.6.1\n\n"
        "Package: base-files\nStatus: install ok installed\nVersion: 12.4:1\n\n"
        "Package: dpkg\nStatus: install ok installed\nVersion: 1.21.22\n"
    )
    assert IB.missing_from_cache(str(rootfs), debs) == ["dpkg_1.21.22"]


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a user: needs root")
def test_throwaway_user_is_removed_even_on_failure():
    import pwd

    from bench.subusers import SUBID_FILES, throwaway_user

    before = {p: open(p, "rb").read() if os.path.exists(p) else b"" for p in SUBID_FILES}
    with pytest.raises(RuntimeError, match="boom"):
        with throwaway_user() as u:
            assert pwd.getpwnam(u.name).pw_uid == u.uid
            assert f"{u.name}:{u.subid[0]}:65536\n" in open("/etc/subuid").read()
            raise RuntimeError("boom")
    with pytest.raises(KeyError):
        pwd.getpwnam(u.name)
    after = {p: open(p, "rb").read() if os.path.exists(p) else b"" for p in SUBID_FILES}
    assert u.name.encode() not in after["/etc/subuid"] and u.name.encode() not in after["/etc/subgid"]
    # other sessions may edit the files meanwhile; without them the bytes are the same
    assert all(after[p] == before[p] or u.name.encode() not in after[p] for p in SUBID_FILES)


def test_floor_times_every_target():
    """``python -m bench.floor`` (the README's command, fewer calls): one row of numbers per
    target, each daemon mounted, timed and unmounted; nothing left mounted."""
    r = subprocess.run(
        [sys.executable, "-m", "bench.floor", "-n", "3000"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    rows = {ln.split("|")[1].strip(): ln for ln in r.stdout.splitlines() if ln.startswith("| ") and "µs" not in ln}
    for name in ("native", "pyfuse3-null", "shiftfs", "bindfs", "fuse-overlayfs"):
        cells = [c.strip() for c in rows[name].split("|")[2:4]]
        if cells[0] == "missing" and os.environ.get("SHIFTFS_CI") != "1":
            continue  # a peer not installed here (make setup installs them; CI requires them)
        assert float(cells[0]) > 0, rows[name]
    with open("/proc/self/mountinfo") as f:
        assert "shiftfs-floor." not in f.read()
