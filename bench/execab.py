"""A paired A/B of ``shiftfs exec`` mount options on the real image build.

``python -m bench.execab --rounds 3 -v '' -v xattr_probes=off,nowriteback``
builds Debian minbase with mmdebstrap (the bench's image-build command,
:mod:`bench.imagebuild`) once as real root and once per variant under
``shiftfs exec -o VARIANT --shift ./rootfs`` as a throwaway user with a
range, on a fresh journaled ext4 loop image. The builds of a round run back
to back, the variants' order rotating each round, real root first; every
ratio is to the real-root build of the same round. Each variant's daemon
reports its CPU seconds and request count (``-o stats=FILE``). In the first
round each variant's tree is exported and compared with real root's, as the
bench does, so an option that changes the image is seen, not just timed.

It answers one question (which options pay on a build) and is run by hand;
the full bench (``python -m bench --full``) measures the chosen recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from . import imagebuild as IB
from . import targets as T
from .imagerun import _timed, exec_build
from .subusers import throwaway_user
from .sysutil import log, run

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")


def _fresh_ext4(workdir: str, size: int = 8 << 30, inodes: int | None = None) -> str:
    """A new journaled ext4 (mkfs defaults) on a loop image, as the bench's disk backing."""
    img = os.path.join(workdir, "disk.ext4")
    root = os.path.join(workdir, "disk")
    os.makedirs(root)
    with open(img, "wb") as f:
        f.truncate(size)
    count = ["-N", str(inodes)] if inodes else []
    run(["mkfs.ext4", "-q", "-F", *count, "-E", "lazy_itable_init=0,lazy_journal_init=0", img])
    run(["mount", "-o", "loop", img, root])
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--variant", action="append", required=True, help="exec -o options ('' = none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--inodes", type=int, help="mkfs.ext4 -N (the full bench's disk has 1048576)")
    a = ap.parse_args(argv)
    shiftfs = T.default_shiftfs()
    debs = IB.cached_debs(CACHE)
    if not debs:
        raise SystemExit("bench.execab: no package cache; run 'python -m bench --workloads image_build' once first")
    work = tempfile.mkdtemp(prefix="shiftfs-execab.", dir=a.workdir)
    os.chmod(work, 0o755)  # the throwaway user builds below it
    base = _fresh_ext4(work, inodes=a.inodes)
    records: list[dict] = []
    try:
        staged = IB.stage_debs(debs, os.path.join(base, "debs"))
        with throwaway_user() as user:
            names = [f"v{i}" for i in range(len(a.variant))]
            for r in range(a.rounds):
                k = r % len(names)
                order = names[k:] + names[:k]
                log(f"round {r + 1}/{a.rounds}: real-root then {' '.join(order)}")
                ref = os.path.join(base, f"real-root-{r}", "rootfs")
                os.makedirs(ref)
                os.sync()
                ref_s = _timed(IB.mmdebstrap_argv(staged, ref), a.timeout)
                log(f"  real-root {ref_s:.1f}s")
                trees = {}
                for n in order:
                    opts = a.variant[int(n[1:])]
                    options = ["-o", opts] if opts else []
                    work_n = os.path.join(base, f"{n}-{r}")
                    tree, s, cpu, req = exec_build(shiftfs, user, work_n, options, staged, a.timeout)
                    trees[n] = tree
                    rec = {"round": r, "variant": opts, "seconds": round(s, 3), "ratio": round(s / ref_s, 3)}
                    rec.update({"real_root_s": round(ref_s, 3), "daemon_cpu_s": cpu, "daemon_requests": req})
                    records.append(rec)
                    log(f"  -o {opts or '(none)'}: {s:.1f}s {s / ref_s:.2f}x cpu {cpu} requests {req}")
                if r == 0:
                    snap = IB.dir_snapshot(ref)
                    for n, tree in trees.items():
                        out = os.path.join(os.path.dirname(tree), "export.tar")
                        IB.export(user.wrap([]), shiftfs, tree, out, a.timeout)
                        res = IB.compare_trees(snap, IB.tar_snapshot(out), n)
                        opts = a.variant[int(n[1:])]
                        verdict = "pass" if res["passed"] else f"FAIL {res['examples'][:3]}"
                        log(f"  check -o {opts or '(none)'}: {verdict}")
                        records.append({"check": opts, "passed": res["passed"], "mismatches": res["mismatches"]})
                for d in os.listdir(base):
                    if d != "debs" and d != "lost+found":
                        IB.remove_tree(os.path.join(base, d))
    finally:
        subprocess.run(["umount", base], check=False)
        IB.remove_tree(work)
    print("\n| -o | seconds (median) | ratio to real root: median (rounds) | daemon CPU s | requests |")
    print("|---|---:|---:|---:|---:|")
    for opts in a.variant:
        rs = [x for x in records if x.get("variant") == opts]
        ratios = [x["ratio"] for x in rs]
        cpus = [x["daemon_cpu_s"] for x in rs if x["daemon_cpu_s"] is not None]
        reqs = [x["daemon_requests"] for x in rs if x["daemon_requests"] is not None]
        print(
            f"| {opts or '(none)'} | {statistics.median(x['seconds'] for x in rs):.1f} | "
            f"{statistics.median(ratios):.2f}× ({', '.join(f'{x:.2f}' for x in ratios)}) | "
            f"{statistics.median(cpus) if cpus else '-'} | {statistics.median(reqs) if reqs else '-'} |"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
