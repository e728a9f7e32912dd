"""fsstress for the reliability tests: a random metadata and data mix through a mount.

:func:`fsstress` runs several processes; each has a private directory whose
exact state it models (and checks through the mount as it goes and at the
end) and a shared area where they race each other, where only the errnos are
checked. :func:`check_models` checks the private directories again later
(after a remount).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import stat
import time

from fsutil import MAP_COUNT
from rel_util import TMP_PREFIX, user_xattrs
from sysx import lchown_raw

MAX_ID = 2**32 - 2

# -- fsstress: a random metadata + data mix -------------------------------------------------
# errnos the shared (racy) area may see; anything else is a failure
_SHARED_OK = {
    errno.ENOENT,
    errno.EEXIST,
    errno.ENOTEMPTY,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EINVAL,
    errno.ELOOP,
    errno.EOVERFLOW,
    errno.ENODATA,
    errno.EPERM,
    errno.EMLINK,
    errno.ENXIO,
    errno.EAGAIN,
    errno.ESPIPE,
}


#: What a worker does in its private directory (repeats weight the draw).
_PRIVATE_OPS = (
    "create create write write truncate rename link unlink mkdir rmdir symlink chmod chown chown "
    "setxattr removexattr mkfifo check check"
).split()
#: What workers do in the shared area, racing each other.
_SHARED_OPS = (
    "create write truncate rename rename link unlink mkdir rmdir symlink chmod chown setxattr listdir stat read mkfifo"
).split()


class _Ino:
    __slots__ = ("type", "data", "mode", "uid", "gid", "xattrs", "target")

    def __init__(self, type_, mode, uid=0, gid=0, target=None):
        self.type = type_
        self.data = bytearray()
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.xattrs: dict[str, bytes] = {}
        self.target = target


def _rand_id(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.45:
        return rng.randrange(0, MAP_COUNT)
    if r < 0.6:
        return rng.choice([0, 65534, 65535, 65536, 99999, 100000, MAX_ID, MAX_ID - 1, 2**31, 2**31 - 1, 2**16])
    return rng.randrange(0, MAX_ID + 1)


class _Worker:
    def __init__(self, root: str, idx: int, seed: int, mode: str):
        self.root = root
        self.idx = idx
        self.rng = random.Random(seed * 1000 + idx)
        self.mode = mode
        self.private = os.path.join(root, f"p{idx}")
        self.model: dict[str, _Ino] = {}
        self.failures: list[str] = []
        self.ops = 0
        self.counts: dict[str, int] = {}

    # expected outcome of a chown to (uid, gid) in this mode
    def _mappable(self, i: int) -> bool:
        return i == -1 or self.mode == "xattr" or 0 <= i < MAP_COUNT

    def fail(self, msg: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(f"worker {self.idx} op {self.ops}: {msg}")

    # -- private area: exact model ------------------------------------------------
    def _pname(self) -> str:
        return f"n{self.rng.randrange(12)}"

    def _p(self, name: str) -> str:
        return os.path.join(self.private, name)

    def _expect(self, what: str, fn, want_errno: int | None):
        try:
            res = fn()
        except OSError as e:
            if e.errno != want_errno:
                self.fail(
                    f"{what}: got {errno.errorcode.get(e.errno, e.errno)}, expected "
                    f"{'success' if want_errno is None else errno.errorcode[want_errno]}"
                )
            return None, e.errno
        if want_errno is not None:
            self.fail(f"{what}: succeeded, expected {errno.errorcode[want_errno]}")
        return res, None

    def _refresh_special(self, ino: _Ino, name: str) -> None:
        """The kernel may clear setuid/setgid on chown/write: accept a subset."""
        try:
            st = os.lstat(self._p(name))
        except OSError:
            return
        special = stat.S_IMODE(st.st_mode) & 0o6000
        if special & ~ino.mode & 0o6000:
            self.fail(f"{name}: special bits {oct(special)} appeared (model {oct(ino.mode)})")
        ino.mode = (ino.mode & ~0o6000) | special

    def private_op(self) -> None:
        rng = self.rng
        m = self.model
        name = self._pname()
        cur = m.get(name)
        op = rng.choice(_PRIVATE_OPS)
        self.counts[op] = self.counts.get(op, 0) + 1
        path = self._p(name)
        if op == "create":
            perm = rng.choice([0o644, 0o600, 0o755, 0o640, 0o4755, 0o2755, 0o444])
            if cur is not None:
                self._expect(
                    f"create {name}",
                    lambda: os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, perm)),
                    errno.EEXIST,
                )
                return
            data = rng.randbytes(rng.randrange(0, 9000))

            def create():
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, perm)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)

            _, err = self._expect(f"create {name}", create, None)
            if err is None:
                ino = _Ino("f", perm)
                ino.data = bytearray(data)
                m[name] = ino
                self._refresh_special(ino, name)
        elif op == "write" and cur is not None and cur.type == "f":
            off = rng.randrange(0, len(cur.data) + 2000)
            data = rng.randbytes(rng.randrange(1, 6000))

            def write():
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.pwrite(fd, data, off)
                finally:
                    os.close(fd)

            _, err = self._expect(f"write {name}", write, None)
            if err is None:
                if off > len(cur.data):
                    cur.data.extend(b"\0" * (off - len(cur.data)))
                cur.data[off : off + len(data)] = data
                self._refresh_special(cur, name)
        elif op == "truncate" and cur is not None and cur.type == "f":
            n = rng.randrange(0, len(cur.data) + 3000)
            _, err = self._expect(f"truncate {name}", lambda: os.truncate(path, n), None)
            if err is None:
                del cur.data[n:]
                cur.data.extend(b"\0" * (n - len(cur.data)))
                self._refresh_special(cur, name)
        elif op == "rename":
            new = self._pname()
            dst = m.get(new)
            if cur is None:
                want = errno.ENOENT
            elif dst is None or dst is cur:
                want = None
            elif cur.type == "d" and dst.type != "d":
                want = errno.ENOTDIR
            elif cur.type != "d" and dst.type == "d":
                want = errno.EISDIR
            else:
                want = None
            _, err = self._expect(f"rename {name} {new}", lambda: os.rename(path, self._p(new)), want)
            if err is None and want is None and dst is not cur:
                m[new] = m.pop(name)
        elif op == "link":
            new = self._pname()
            if cur is None:
                want = errno.ENOENT
            elif new in m:
                want = errno.EEXIST
            elif cur.type == "d":
                want = errno.EPERM
            else:
                want = None
            _, err = self._expect(
                f"link {name} {new}", lambda: os.link(path, self._p(new), follow_symlinks=False), want
            )
            if err is None and want is None:
                m[new] = cur
        elif op == "unlink":
            want = errno.ENOENT if cur is None else errno.EISDIR if cur.type == "d" else None
            _, err = self._expect(f"unlink {name}", lambda: os.unlink(path), want)
            if err is None and want is None:
                del m[name]
        elif op == "mkdir":
            perm = rng.choice([0o755, 0o700, 0o2775, 0o1777])
            want = errno.EEXIST if cur is not None else None
            _, err = self._expect(f"mkdir {name}", lambda: os.mkdir(path, perm), want)
            if err is None and want is None:
                m[name] = _Ino("d", perm & 0o1777)  # mkdir(2) ignores setuid/setgid
        elif op == "rmdir":
            want = errno.ENOENT if cur is None else errno.ENOTDIR if cur.type != "d" else None
            _, err = self._expect(f"rmdir {name}", lambda: os.rmdir(path), want)
            if err is None and want is None:
                del m[name]
        elif op == "symlink":
            target = rng.choice(["n1", "../p0/n2", "/etc/passwd", "x" * rng.randrange(1, 300), "..", "n3/../../.."])
            want = errno.EEXIST if cur is not None else None
            _, err = self._expect(f"symlink {name}", lambda: os.symlink(target, path), want)
            if err is None and want is None:
                m[name] = _Ino("l", 0o777, target=target)
        elif op == "mkfifo":
            perm = rng.choice([0o644, 0o600, 0o620])
            want = errno.EEXIST if cur is not None else None
            _, err = self._expect(f"mkfifo {name}", lambda: os.mkfifo(path, perm), want)
            if err is None and want is None:
                m[name] = _Ino("p", perm)
        elif op == "chmod" and cur is not None and cur.type in ("f", "d", "p"):
            perm = rng.randrange(0, 0o10000)
            _, err = self._expect(f"chmod {name} {oct(perm)}", lambda: os.chmod(path, perm), None)
            if err is None:
                cur.mode = perm
        elif op == "chown" and cur is not None:
            uid = -1 if rng.random() < 0.1 else _rand_id(rng)
            gid = -1 if rng.random() < 0.1 else _rand_id(rng)
            ok = self._mappable(uid) and self._mappable(gid)
            u32 = uid & 0xFFFFFFFF
            g32 = gid & 0xFFFFFFFF
            res = lchown_raw(path, u32, g32)
            want = 0 if ok else errno.EOVERFLOW
            if res != want:
                self.fail(
                    f"lchown {name} {uid}:{gid}: got {errno.errorcode.get(res, res)}, expected "
                    f"{errno.errorcode.get(want, want)}"
                )
            if res == 0:
                if uid != -1:
                    cur.uid = uid
                if gid != -1:
                    cur.gid = gid
                if cur.type != "l":
                    self._refresh_special(cur, name)
        elif op == "setxattr" and cur is not None and cur.type in ("f", "d"):
            k = f"user.k{rng.randrange(4)}"
            v = rng.randbytes(rng.randrange(0, 200))
            _, err = self._expect(f"setxattr {name} {k}", lambda: os.setxattr(path, k, v), None)
            if err is None:
                cur.xattrs[k] = v
        elif op == "removexattr" and cur is not None and cur.type in ("f", "d"):
            k = f"user.k{rng.randrange(4)}"
            want = None if k in cur.xattrs else errno.ENODATA
            _, err = self._expect(f"removexattr {name} {k}", lambda: os.removexattr(path, k), want)
            if err is None and want is None:
                del cur.xattrs[k]
        elif op == "check" and cur is not None:
            for p in self.check_one(name, cur):
                self.fail(p)

    def check_one(self, name: str, ino: _Ino, root: str | None = None) -> list[str]:
        path = os.path.join(root or self.private, name)
        out = []
        try:
            st = os.lstat(path)
        except OSError as e:
            return [f"{name}: lstat: {e}"]
        ftype = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "p": stat.S_IFIFO}[ino.type]
        if stat.S_IFMT(st.st_mode) != ftype:
            out.append(f"{name}: type {oct(stat.S_IFMT(st.st_mode))}, model {oct(ftype)}")
            return out
        if ino.type != "l" and stat.S_IMODE(st.st_mode) != ino.mode:
            out.append(f"{name}: mode {oct(stat.S_IMODE(st.st_mode))}, model {oct(ino.mode)}")
        if (st.st_uid, st.st_gid) != (ino.uid, ino.gid):
            out.append(f"{name}: owner {st.st_uid}:{st.st_gid}, model {ino.uid}:{ino.gid}")
        if ino.type == "f":
            with open(path, "rb") as f:
                data = f.read()
            if data != bytes(ino.data):
                out.append(f"{name}: content differs ({len(data)} bytes, model {len(ino.data)})")
        if ino.type == "l" and os.readlink(path) != ino.target:
            out.append(f"{name}: link target {os.readlink(path)!r}, model {ino.target!r}")
        if ino.type in ("f", "d"):
            got = user_xattrs(path)
            if got != ino.xattrs:
                out.append(f"{name}: xattrs {sorted(got)}, model {sorted(ino.xattrs)}")
        return out

    # -- shared area: races, only the errnos are checked ----------------------------------
    _DIRS = ["s", "s/a", "s/b", "s/a/c"]

    def _spath(self) -> str:
        return os.path.join(self.root, self.rng.choice(self._DIRS), f"x{self.rng.randrange(10)}")

    def shared_op(self) -> None:
        rng = self.rng
        p = self._spath()
        op = rng.choice(_SHARED_OPS)
        self.counts["s-" + op] = self.counts.get("s-" + op, 0) + 1
        if rng.random() < 0.03:  # renames may have moved a shared dir away
            for d in self._DIRS:
                try:
                    os.mkdir(os.path.join(self.root, d), 0o777)
                except OSError:
                    pass
        try:
            if op == "create" or op == "write":
                fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
                try:
                    os.pwrite(fd, rng.randbytes(rng.randrange(1, 5000)), rng.randrange(0, 5000))
                finally:
                    os.close(fd)
            elif op == "truncate":
                fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    os.ftruncate(fd, rng.randrange(0, 8000))
                finally:
                    os.close(fd)
            elif op == "rename":
                flags_noreplace = rng.random() < 0.2
                q = self._spath() if rng.random() < 0.8 else os.path.join(self.root, rng.choice(self._DIRS))
                if flags_noreplace and os.path.lexists(q):
                    return
                os.rename(p, q)
            elif op == "link":
                os.link(p, self._spath(), follow_symlinks=False)
            elif op == "unlink":
                os.unlink(p)
            elif op == "mkdir":
                os.mkdir(p, 0o755)
            elif op == "rmdir":
                os.rmdir(p)
            elif op == "symlink":
                # targets stay inside the shared area: racing ops below may follow them
                os.symlink(rng.choice(["x1", "../x2", "a", "c/x3", "x4/x5"]), p)
            elif op == "mkfifo":
                os.mkfifo(p, 0o600)
            elif op == "chmod":
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    os.fchmod(fd, rng.randrange(0, 0o10000))
                finally:
                    os.close(fd)
            elif op == "chown":
                uid, gid = _rand_id(rng), _rand_id(rng)
                res = lchown_raw(p, uid, gid)
                ok = self._mappable(uid) and self._mappable(gid)
                if res == 0 and not ok:
                    self.fail(f"shared lchown {p} {uid}:{gid} succeeded, expected EOVERFLOW")
                elif res not in (0, errno.ENOENT, errno.EOVERFLOW) or (res == errno.EOVERFLOW and ok):
                    self.fail(f"shared lchown {p} {uid}:{gid}: {errno.errorcode.get(res, res)}")
            elif op == "setxattr":
                os.setxattr(p, f"user.k{rng.randrange(4)}", rng.randbytes(rng.randrange(0, 100)), follow_symlinks=False)
            elif op == "listdir":
                names = os.listdir(os.path.dirname(p))
                if len(names) != len(set(names)):
                    self.fail(f"duplicate names listing {os.path.dirname(p)}: {sorted(names)}")
                if any(n.startswith(TMP_PREFIX) or n == ".shiftfs" for n in names):
                    self.fail(f"hidden name listed in {os.path.dirname(p)}: {sorted(names)}")
            elif op == "stat":
                os.lstat(p)
            elif op == "read":
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    os.read(fd, 100000)
                finally:
                    os.close(fd)
        except OSError as e:
            if e.errno not in _SHARED_OK:
                self.fail(f"shared {op} {p}: {e!r}")

    def run(self, nops: int, deadline: float) -> dict:
        os.umask(0)
        os.mkdir(self.private, 0o755)
        while self.ops < nops and time.monotonic() < deadline:
            self.ops += 1
            try:
                if self.rng.random() < 0.6:
                    self.private_op()
                else:
                    self.shared_op()
            except Exception as e:  # a bug in the driver or an errno we did not model
                self.fail(f"exception {e!r}")
        # final check of the private area against the model, through the mount
        names = sorted(os.listdir(self.private))
        if names != sorted(self.model):
            self.fail(f"private names {names} != model {sorted(self.model)}")
        for n, ino in self.model.items():
            for p in self.check_one(n, ino):
                self.fail("final: " + p)
        return {
            "ops": self.ops,
            "failures": self.failures,
            "counts": self.counts,
            "model": {n: _dump_ino(i) for n, i in self.model.items()},
        }


def _dump_ino(i: _Ino) -> dict:
    return {
        "type": i.type,
        "data": bytes(i.data).hex(),
        "mode": i.mode,
        "uid": i.uid,
        "gid": i.gid,
        "xattrs": {k: v.hex() for k, v in i.xattrs.items()},
        "target": i.target,
    }


def _load_ino(d: dict) -> _Ino:
    i = _Ino(d["type"], d["mode"], d["uid"], d["gid"], d["target"])
    i.data = bytearray(bytes.fromhex(d["data"]))
    i.xattrs = {k: bytes.fromhex(v) for k, v in d["xattrs"].items()}
    return i


def _worker_main(root, idx, seed, mode, nops, deadline, wfd):
    try:
        res = _Worker(root, idx, seed, mode).run(nops, deadline)
    except BaseException as e:
        res = {"ops": 0, "failures": [f"worker {idx} crashed: {e!r}"], "counts": {}, "model": {}}
    with os.fdopen(wfd, "w") as f:
        json.dump(res, f)


def fsstress(root, mode: str, nproc=4, nops=2000, seconds=15.0, seed=None) -> dict:
    """Run ``nproc`` workers in ``root`` (a dir in the mount) for ``nops`` ops each or ``seconds``.

    Returns ``{"failures": [...], "ops": total, "models": [...], "seed": seed}``.
    """
    root = str(root)
    seed = random.randrange(1 << 30) if seed is None else seed
    for d in _Worker._DIRS:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    deadline = time.monotonic() + seconds
    procs = []
    ctx = multiprocessing.get_context("fork")
    for i in range(nproc):
        r, w = os.pipe()
        p = ctx.Process(target=_worker_main, args=(root, i, seed, mode, nops, deadline, w))
        p.start()
        os.close(w)
        procs.append((p, r))
    results = []
    for p, r in procs:
        with os.fdopen(r) as f:
            data = f.read()
        p.join(seconds + 120)
        results.append(json.loads(data) if data else {"ops": 0, "failures": ["worker died"], "counts": {}, "model": {}})
    counts: dict[str, int] = {}
    for res in results:
        for k, v in res["counts"].items():
            counts[k] = counts.get(k, 0) + v
    return {
        "seed": seed,
        "ops": sum(r["ops"] for r in results),
        "failures": [f for r in results for f in r["failures"]],
        "models": [r["model"] for r in results],
        "counts": counts,
    }


def check_models(root, models: list[dict], mode: str) -> list[str]:
    """Check the private dirs of an earlier :func:`fsstress` run (e.g. after a remount)."""
    out = []
    for idx, model in enumerate(models):
        w = _Worker(str(root), idx, 0, mode)
        priv = os.path.join(str(root), f"p{idx}")
        names = sorted(os.listdir(priv))
        if names != sorted(model):
            out.append(f"p{idx}: names {names} != model {sorted(model)}")
        for n, d in model.items():
            out += w.check_one(n, _load_ino(d), priv)
    return out
