"""The root filesystem archive that the untar workload extracts.

Preferred: a Debian bookworm minbase built once with mmdebstrap and cached under
bench/cache/ (or ``$SHIFTFS_CACHE_DIR``, see :mod:`bench.artifacts`).  Fallback (no network,
or quick mode): a deterministic generated tree of the same shape (entry counts by type, size quantiles, directory depth,
files per directory, owners and special modes measured on the minbase archive).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import random
import tarfile

from . import artifacts
from .sysutil import StepError, log

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = artifacts.cache_dir(os.path.join(HERE, "cache"))
MINBASE_NAME = "debian-bookworm-minbase.tar"

# Shape of `mmdebstrap --variant=minbase bookworm` (measured 2026-11 on this project's
# build machine): 8743 entries.
SHAPE = {"dir": 1132, "file": 6946, "symlink": 655, "hardlink": 2, "chardev": 8}
# Regular-file size quantiles (percent -> bytes); sizes are drawn log-linearly between them.
SIZE_Q = [
    (0, 0),
    (0.32, 0),
    (5, 161),
    (10, 360),
    (15, 543),
    (20, 629),
    (25, 753),
    (30, 955),
    (35, 1220),
    (40, 1540),
    (45, 1882),
    (50, 2256),
    (55, 2745),
    (60, 3686),
    (65, 5071),
    (70, 7984),
    (75, 12632),
    (80, 18680),
    (85, 23248),
    (90, 41082),
    (95, 80192),
    (97.5, 151344),
    (99, 328052),
    (99.5, 529216),
    (99.9, 2190440),
    (100, 4472989),
]
# Directory depth histogram (depth -> count) and the heaviest directories' file counts.
DEPTH = {1: 15, 2: 50, 3: 78, 4: 288, 5: 317, 6: 116, 7: 226, 8: 36, 9: 5}
# (uid, gid, count) of non-root owned entries, and special modes, per full-size tree.
ODD_OWNERS = [(0, 42, 5), (0, 43, 3), (42, 0, 2), (0, 50, 1), (0, 8, 1)]
FILE_MODES = [(0o644, 6414), (0o755, 507), (0o4755, 8), (0o640, 6), (0o600, 5), (0o2755, 3), (0o664, 2), (0o660, 1)]
DIR_MODES = [(0o755, 1123), (0o700, 4), (0o1777, 3), (0o2775, 2)]
DEVICES = [
    ("console", 5, 1),
    ("full", 1, 7),
    ("null", 1, 3),
    ("ptmx", 5, 2),
    ("random", 1, 8),
    ("tty", 5, 0),
    ("urandom", 1, 9),
    ("zero", 1, 5),
]


def _draw_size(rng: random.Random) -> int:
    p = rng.uniform(0, 100)
    i = bisect.bisect_left([q for q, _ in SIZE_Q], p)
    i = min(max(i, 1), len(SIZE_Q) - 1)
    (p0, s0), (p1, s1) = SIZE_Q[i - 1], SIZE_Q[i]
    if s1 == 0:
        return 0
    f = (p - p0) / (p1 - p0) if p1 > p0 else 0.0
    lo = math.log(max(s0, 1))
    return int(math.exp(lo + f * (math.log(s1) - lo)))


def _name(rng: random.Random, taken: set) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    while True:
        n = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 14)))
        if rng.random() < 0.4:
            n += rng.choice([".conf", ".so.1", ".gz", ".py", ".txt", "-dev", ".list", ".h"])
        if n not in taken:
            taken.add(n)
            return n


def _weighted(pairs, rng):
    total = sum(c for _, c in pairs)
    x = rng.uniform(0, total)
    for v, c in pairs:
        x -= c
        if x <= 0:
            return v
    return pairs[-1][0]


def generate(path: str, scale: float = 1.0, seed: int = 6) -> None:
    """Write a tar of a synthetic root filesystem with the minbase shape."""
    rng = random.Random(seed)
    n = {k: max(1, round(v * scale)) for k, v in SHAPE.items()}
    n["chardev"] = len(DEVICES)
    # directories: depth histogram, each parent chosen among dirs one level up
    by_depth: dict[int, list[str]] = {0: [""]}
    names: dict[str, set] = {"": set()}
    dirs = []
    total_depth = sum(DEPTH.values())
    for depth in sorted(DEPTH):
        want = max(1, round(DEPTH[depth] / total_depth * (n["dir"] - 1)))
        for _ in range(want):
            parents = by_depth.get(depth - 1) or by_depth[max(by_depth)]
            parent = (
                parents[min(int(rng.paretovariate(1.2)) - 1, len(parents) - 1)]
                if rng.random() < 0.5
                else rng.choice(parents)
            )
            nm = _name(rng, names[parent])
            d = f"{parent}/{nm}" if parent else nm
            names[d] = set()
            by_depth.setdefault(depth, []).append(d)
            dirs.append(d)
    all_dirs = [""] + dirs
    # files per directory: heavy-tailed (a few directories hold hundreds of files)
    weights = [rng.paretovariate(0.9) for _ in all_dirs]
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)

    def pick_dir():
        return all_dirs[min(bisect.bisect_left(cum, rng.uniform(0, acc)), len(all_dirs) - 1)]

    files = []
    for _ in range(n["file"]):
        d = pick_dir()
        nm = _name(rng, names[d])
        files.append(f"{d}/{nm}" if d else nm)
    odd = {}
    pool = list(files)
    rng.shuffle(pool)
    for uid, gid, cnt in ODD_OWNERS:
        for _ in range(max(1, round(cnt * scale))):
            if pool:
                odd[pool.pop()] = (uid, gid)

    buf = bytearray(rng.randbytes(1 << 20))

    def data(size):
        # mostly incompressible content, cheap to make: slices of a random buffer
        out = io.BytesIO()
        while size > 0:
            k = min(size, len(buf))
            off = rng.randrange(0, len(buf) - k + 1)
            out.write(buf[off : off + k])
            size -= k
        out.seek(0)
        return out

    mtime = 1700000000
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = artifacts.partial_name(path)
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:

        def add(ti, fobj=None):
            ti.mtime = mtime
            ti.uname = ti.gname = ""
            tf.addfile(ti, fobj)

        root = tarfile.TarInfo("./")
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        add(root)
        for d in ["dev"] + dirs:
            ti = tarfile.TarInfo(f"./{d}/")
            ti.type = tarfile.DIRTYPE
            ti.mode = _weighted(DIR_MODES, rng) if d != "dev" else 0o755
            add(ti)
        names["dev"] = set()
        for nm, ma, mi in DEVICES:
            ti = tarfile.TarInfo(f"./dev/{nm}")
            ti.type, ti.mode, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 0o666, ma, mi
            add(ti)
        for f in files:
            ti = tarfile.TarInfo(f"./{f}")
            ti.size = _draw_size(rng)
            ti.mode = _weighted(FILE_MODES, rng)
            ti.uid, ti.gid = odd.get(f, (0, 0))
            add(ti, data(ti.size))
        for _ in range(n["symlink"]):
            d = pick_dir()
            nm = _name(rng, names[d])
            tgt = rng.choice(files)
            ti = tarfile.TarInfo(f"./{d}/{nm}" if d else f"./{nm}")
            ti.type, ti.mode = tarfile.SYMTYPE, 0o777
            # ~8% absolute targets like minbase, the rest relative
            if rng.random() < 0.08:
                ti.linkname = "/" + tgt
            else:
                up = d.count("/") + 1 if d else 0
                ti.linkname = "../" * up + tgt
            add(ti)
        for i in range(n["hardlink"]):
            d = pick_dir()
            nm = _name(rng, names[d])
            ti = tarfile.TarInfo(f"./{d}/{nm}" if d else f"./{nm}")
            ti.type, ti.linkname = tarfile.LNKTYPE, "./" + files[i]
            add(ti)
    os.replace(tmp, path)


def build_minbase(path: str, timeout: float = 1200) -> None:
    """Build the minbase archive at *path* (atomically, under a ``.partial.tar`` name)."""
    log("building the Debian bookworm minbase archive with mmdebstrap (cached afterwards)")
    try:
        artifacts.build_minbase(path, timeout=timeout)
    except RuntimeError as e:
        raise StepError(str(e)) from e


def stats(path: str) -> dict:
    """Entry counts, bytes, sha256 and the member list (cached in a side file)."""
    side = path + ".stats.json"
    st = os.stat(path)
    key = [st.st_size, st.st_mtime_ns]
    if os.path.exists(side):
        try:
            with open(side) as f:
                d = json.load(f)
            if d.get("key") == key and d.get("version") == 2:
                return d
        except (OSError, ValueError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    counts = {"dir": 0, "file": 0, "symlink": 0, "hardlink": 0, "chardev": 0, "blockdev": 0, "fifo": 0, "other": 0}
    total = 0
    regular = []  # (relpath, size)
    ids: set[int] = set()
    with tarfile.open(path) as tf:
        for m in tf:
            ids.update((m.uid, m.gid))
            rel = os.path.normpath(m.name).lstrip("/")
            if rel == ".":
                continue
            kind = (
                "dir"
                if m.isdir()
                else "file"
                if m.isreg()
                else "symlink"
                if m.issym()
                else "hardlink"
                if m.islnk()
                else "chardev"
                if m.ischr()
                else "blockdev"
                if m.isblk()
                else "fifo"
                if m.isfifo()
                else "other"
            )
            counts[kind] += 1
            if m.isreg():
                total += m.size
                regular.append((rel, m.size))
    d = {
        "version": 2,
        "key": key,
        "sha256": h.hexdigest(),
        "bytes": total,
        "entries": sum(counts.values()),
        "counts": counts,
        "ids": sorted(ids),
        "regular": regular,
    }
    with open(side + ".part", "w") as f:
        json.dump(d, f)
    os.replace(side + ".part", side)
    return d


def obtain(kind: str, scale: float, cache: str = CACHE) -> tuple[str, dict]:
    """Return (archive path, description).  kind: auto | minbase | generated.

    A cached archive that does not read as one (a directory left by an old
    build, a truncated file) is discarded and built again."""
    notes = []
    minbase = os.path.join(cache, MINBASE_NAME)
    if kind in ("auto", "minbase"):
        if artifacts.dpkg_status(minbase) is None:
            if os.path.lexists(minbase):
                notes.append(f"discarded an unreadable cached archive at {minbase}")
                artifacts.discard(minbase)
            try:
                build_minbase(minbase)
            except StepError as e:
                notes.append(f"mmdebstrap failed ({e}); using a generated tree of the same shape")
                if kind == "minbase":
                    raise
        if artifacts.dpkg_status(minbase) is not None:
            return minbase, {
                "kind": "debian-bookworm-minbase",
                "source": "mmdebstrap --variant=minbase bookworm",
                "notes": notes,
            }
    gen = os.path.join(cache, f"generated-minbase-shape-x{scale:g}.tar")
    if not artifacts.readable_tar(gen):
        artifacts.discard(gen)
        log(f"generating a synthetic root filesystem tree (scale {scale:g})")
        generate(gen, scale=scale)
    return gen, {"kind": "generated", "source": f"bench.trees.generate(scale={scale:g}, seed=6)", "notes": notes}


if __name__ == "__main__":  # pragma: no cover - manual helper
    import sys

    p = sys.argv[1] if len(sys.argv) > 1 else os.path.join(CACHE, "generated-test.tar")
    generate(p, scale=float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
    s = stats(p)
    print(json.dumps({k: v for k, v in s.items() if k != "regular"}, indent=1))
