"""
Processes of a container: signal relaying, waiting, exit statuses, and the
body every forked child runs, so that a child never unwinds into its
parent's stack and every setup failure ends as one line and status 125.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable

from ..errors import SetupError

#: Exit statuses of the launcher itself, as docker/podman use them.
EXIT_SETUP = 125  # the container could not be set up
EXIT_CANNOT_EXEC = 126  # COMMAND exists but cannot be executed
EXIT_NOT_FOUND = 127  # COMMAND not found

SI_KERNEL = 0x80  # si_code of signals the kernel sends itself (tty ^C, ^\)

#: Signals a supervisor passes on to its child. Those the kernel generates for
#: the terminal's foreground process group (^C, ^\, window size) reach the
#: command directly, so supervisors drop those copies (si_code SI_KERNEL).
RELAYED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
_WAITED = set(RELAYED) | {signal.SIGCHLD}


def _noop(signo: int, frame: object) -> None:
    pass


def block_signals() -> set[int]:
    """Install handlers (so that a namespace's pid 1 is not immune to them)
    and block the relayed signals and SIGCHLD; :func:`supervise` collects
    them. Returns the previous mask. Call before forking the child."""
    for sig in RELAYED:
        signal.signal(sig, _noop)
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED))


def reset_signals(mask: Iterable[int] = ()) -> None:
    """In a child about to exec: default dispositions and an open mask."""
    for sig in (*RELAYED, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def supervise(pid: int, reap_any: bool = False) -> int:
    """Wait for child ``pid`` while relaying signals to it; return its wait
    status. With ``reap_any`` (a namespace's pid 1) every other exiting
    child is reaped too. Signals must be blocked with :func:`block_signals`."""
    while True:
        info = signal.sigwaitinfo(_WAITED)
        if info.si_signo != signal.SIGCHLD:
            if info.si_code != SI_KERNEL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, info.si_signo)
            continue
        while True:
            try:
                wpid, status = os.waitpid(-1 if reap_any else pid, os.WNOHANG)
            except ChildProcessError:
                return 255 << 8
            if wpid == 0:
                break
            if wpid == pid:
                return status


def reap_all(timeout: float) -> list[int]:
    """As a namespace's pid 1: reap children until none is left or
    ``timeout`` seconds pass. Returns the wait statuses collected."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            wpid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return statuses
        if wpid:
            statuses.append(status)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return statuses
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.5))


def exit_code(status: int) -> int:
    """A shell-style exit code for a wait status (128+N for signal N)."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def wait_pid(pid: int, timeout: float) -> int | None:
    """Wait status of child ``pid``, or None after ``timeout`` seconds
    (SIGCHLD must be blocked)."""
    deadline = time.monotonic() + timeout
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.2))


# --- forked children -------------------------------------------------------------


def oserror_text(e: OSError) -> str:
    """An OSError as one line: its reason and, if missing from it, the path."""
    text = e.strerror or str(e)
    if e.filename and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


def fail(prog: str, msg: str, code: int = EXIT_SETUP) -> None:
    """Report a setup error from inside a child process and exit it."""
    try:
        print(f"{prog}: {msg}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def child(prog: str, func: Callable[..., int], *args: object) -> None:
    """Body of a forked child: run ``func(*args)`` and exit with its status;
    never returns into the caller's stack."""
    code = EXIT_SETUP
    try:
        code = func(*args)
    except SetupError as e:
        fail(prog, str(e))
    except OSError as e:
        fail(prog, oserror_text(e))
    except BaseException as e:  # noqa: BLE001 - a child must never unwind
        fail(prog, f"internal error: {type(e).__name__}: {e}")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def fork_and_supervise(prog: str, func: Callable[..., int], *args: object, reap_any: bool = True) -> int:
    """Run ``func(*args)`` in a forked child and return its exit code once
    it is gone, relaying signals meanwhile (as a namespace's pid 1 with
    ``reap_any``, reaping every orphan too)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(prog, func, *args)
    return exit_code(supervise(pid, reap_any=reap_any))


def exec_command(prog: str, command: list[str], env: dict[str, str], where: str = "") -> int:
    """The last step of every container: exec COMMAND with open signals.
    Exits 127 if it is not found, 126 if it cannot be executed."""
    reset_signals()
    from ..sys.mounts import close_fds_except

    close_fds_except()  # COMMAND gets stdio and nothing else of ours
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        fail(prog, f"{command[0]}: command not found{where}", EXIT_NOT_FOUND)
    except OSError as e:
        fail(prog, f"{command[0]}: {e.strerror}", EXIT_CANNOT_EXEC)
    return EXIT_CANNOT_EXEC
