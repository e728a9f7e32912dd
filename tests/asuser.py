"""Acting as other users: the one ``run_as`` and the one ``py_as`` of the tests (and ``sh``).

Every command runs through ``setpriv`` with the ids given and, for a non-root
uid, no capabilities at all; no supplementary groups unless given. What
callers need differently is a parameter: ``env`` (a plain environment, or
ours), ``umask``, ``groups``; for ``py_as`` whether the code is a function
body whose JSON result comes back, or a whole program whose output is the
caller's (``script=True``).
"""

from __future__ import annotations

import json
import subprocess
import sys

#: Environment for commands run as other users (no HOME of root, sane PATH).
USER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/"}

#: The Python that runs snippets as other users: Debian's, reachable by every user.
PYTHON = "/usr/bin/python3"


def run_as(
    uid: int,
    gid: int,
    cmd,
    *,
    groups=(),
    check: bool = False,
    input=None,
    cwd=None,
    umask: int | None = None,
    timeout: float | None = 120,
    env: dict[str, str] | None = USER_ENV,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (argv list, or a string for ``sh -c``) as ``uid:gid``: the one ``run_as``.

    Uses ``setpriv --reuid U --regid G --clear-groups`` (or ``--groups`` when
    given); a non-root uid also gets no capabilities, not even inheritable
    ones. ``env`` is the command's environment: :data:`USER_ENV` (a plain
    PATH, ``HOME=/``) unless given (``None``: ours). ``umask`` is set before
    ``cmd`` runs. Output is captured, as text unless ``text=False``;
    ``check`` raises with stderr on a non-zero exit.
    """
    if isinstance(cmd, str):
        cmd = ["sh", "-c", cmd]
    pre = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    pre += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    if uid != 0:
        pre.append("--inh-caps=-all")
    pre.append("--")
    argv = pre + [str(c) for c in cmd]
    if umask is not None:
        argv = pre + ["sh", "-c", f'umask {umask:03o}; exec "$@"', "sh"] + [str(c) for c in cmd]
    errors = "replace" if text else None
    r = subprocess.run(
        argv, capture_output=True, text=text, errors=errors, input=input, cwd=cwd, timeout=timeout, env=env
    )
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} as {uid}:{gid} failed ({r.returncode}): {r.stderr.strip()}")
    return r


_PY_PRELUDE = """\
import errno, json, os, stat, sys
def _run():
{body}
try:
    _res = _run()
    print(json.dumps({{"ok": _res}}))
except OSError as e:
    print(json.dumps({{"errno": e.errno, "err": errno.errorcode.get(e.errno, str(e.errno)), "msg": str(e)}}))
"""


def py_as(
    uid: int, gid: int, code: str, *args, groups=(), umask: int | None = None, timeout: float = 120, script=False
):
    """Run Python as ``uid:gid`` (through :func:`run_as`): the one ``py_as``.

    By default ``code`` is a function body and its JSON-able result comes
    back: ``{"ok": result}``, or for an ``OSError`` ``{"errno": N, "err":
    "ENAME", "msg": ...}``. Example::

        py_as(5, 5, "return os.stat('/m/f').st_uid")  -> {"ok": 5}

    With ``script=True`` ``code`` is a whole program, ``args`` its
    ``sys.argv[1:]``, and the :class:`subprocess.CompletedProcess` comes back
    (its output and exit status are the caller's to read).
    """
    if script:
        return run_as(uid, gid, [PYTHON, "-c", code, *map(str, args)], groups=groups, umask=umask, timeout=timeout)
    body = "\n".join("    " + line for line in code.strip("\n").splitlines())
    src = _PY_PRELUDE.format(body=body)
    if umask is not None:
        src = f"import os\nos.umask({umask})\n" + src
    r = run_as(uid, gid, [PYTHON, "-c", src], groups=groups, timeout=timeout)
    if r.returncode != 0 or not r.stdout.strip():
        raise AssertionError(f"python as {uid}:{gid} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_py(code: str, *args) -> subprocess.Popen:
    """Our Python running ``code`` with ``args`` in the background, as we are; output piped, as text."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def sh(cmd: str, check=True, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``sh -c CMD`` as we are; ``check`` fails the test with its output on a non-zero exit."""
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, errors="replace", cwd=cwd, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r
