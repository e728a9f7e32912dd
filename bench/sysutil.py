"""Small system helpers: commands, mounts, caches, daemon accounting, cleanup."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field


class StepError(RuntimeError):
    """A workload or mount step failed; the message is shown in the report."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, *, timeout=None, check=True, quiet=True, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure raise StepError with the tail of stderr."""
    if quiet:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)
    try:
        cp = subprocess.run(cmd, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise StepError(f"timeout after {timeout}s: {' '.join(map(str, cmd))[:200]}") from e
    except FileNotFoundError as e:
        raise StepError(f"not found: {cmd[0]}") from e
    if check and cp.returncode != 0:
        err = cp.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        tail = (err or "").strip().splitlines()[-3:]
        raise StepError(f"{os.path.basename(str(cmd[0]))} exited {cp.returncode}: " + " | ".join(tail)[:400])
    return cp


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s[i + 1 : i + 4]) == 3 and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[dict]:
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a = left.split()
            b = right.split()
            rows.append(
                {
                    "id": a[0],
                    "mountpoint": _unescape(a[4]),
                    "options": a[5],
                    "fstype": b[0] if b else "",
                    "source": _unescape(b[1]) if len(b) > 1 else "",
                    "super_options": b[2] if len(b) > 2 else "",
                    "optional": " ".join(a[6:]),
                }
            )
    return rows


def mount_entry(path: str) -> dict | None:
    """The topmost mount whose mount point is exactly `path`, or None."""
    path = os.path.realpath(path)
    found = None
    for row in mountinfo():
        if row["mountpoint"] == path:
            found = row
    return found


def mounts_under(path: str) -> list[str]:
    path = os.path.realpath(path).rstrip("/") + "/"
    return [r["mountpoint"] for r in mountinfo() if (r["mountpoint"] + "/").startswith(path)]


def fs_of(path: str) -> dict:
    """Mount entry (fstype, options) of the filesystem holding `path`."""
    path = os.path.realpath(path)
    best = None
    for row in mountinfo():
        mp = row["mountpoint"].rstrip("/") + "/"
        if (path.rstrip("/") + "/").startswith(mp):
            if best is None or len(row["mountpoint"]) >= len(best["mountpoint"]):
                best = row
    return best or {}


def wait_mounted(path: str, proc: subprocess.Popen | None, timeout: float, fstype_prefix="fuse") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = mount_entry(path)
        if e and e["fstype"].startswith(fstype_prefix):
            return
        if proc is not None and proc.poll() is not None:
            raise StepError(f"daemon exited with {proc.returncode} before the mount appeared")
        time.sleep(0.02)
    raise StepError(f"mount did not appear within {timeout}s")


def umount(path: str, timeout: float = 30) -> None:
    """Unmount; fall back to a lazy unmount. Never raises for 'not mounted'."""
    if mount_entry(path) is None:
        return
    try:
        run(["umount", path], timeout=timeout)
    except StepError:
        subprocess.run(["umount", "-l", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_process(proc: subprocess.Popen | None, grace: float = 10) -> None:
    """Wait for a daemon we started to exit; TERM then KILL it (by its pid only)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---- daemon accounting -------------------------------------------------------


def reset_hwm(pid: int | None) -> None:
    if not pid:
        return
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")  # reset VmHWM to the current RSS
    except OSError:
        pass


def status_kib(pid: int | None, key: str) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _TICK


# ---- cleanup registry -------------------------------------------------------


@dataclass
class Cleanup:
    """Everything this run created, undone in reverse order."""

    mounts: list = field(default_factory=list)  # mount points
    procs: list = field(default_factory=list)  # Popen objects we started
    dirs: list = field(default_factory=list)  # temp dirs to remove
    fds: list = field(default_factory=list)

    def add_mount(self, p):
        self.mounts.append(p)

    def drop_mount(self, p):
        if p in self.mounts:
            self.mounts.remove(p)

    def run(self) -> list[str]:
        problems = []
        for p in reversed(self.mounts):
            try:
                umount(p)
            except Exception as e:  # noqa: BLE001
                problems.append(f"umount {p}: {e}")
        self.mounts.clear()
        for proc in self.procs:
            try:
                stop_process(proc, grace=5)
            except Exception as e:  # noqa: BLE001
                problems.append(f"stop pid {proc.pid}: {e}")
        self.procs.clear()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        for d in reversed(self.dirs):
            left = mounts_under(d)
            for m in sorted(left, key=len, reverse=True):
                subprocess.run(["umount", "-l", m], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if mounts_under(d):
                problems.append(f"not removing {d}: mounts remain under it")
                continue
            shutil.rmtree(d, ignore_errors=True)
            if os.path.exists(d):
                subprocess.run(["rm", "-rf", "--one-file-system", d])
        self.dirs.clear()
        return problems
