"""A leaner trio for pyfuse3's request loop, through pyfuse3's own hook.

pyfuse3 reaches its event loop only through the module attribute
``pyfuse3.trio`` (``pyfuse3.asyncio.enable()`` swaps it for an asyncio shim
the same way). Its loop does, per request: take a ``trio.Lock`` (one trip
through trio's scheduler, even uncontended), ``wait_readable`` on /dev/fuse
(a second trip: ``epoll_ctl`` plus ``epoll_wait``), read, dispatch, reply.
Profiling an untar put about a third of the daemon's user CPU in those two
trips, more than in all shiftfs handlers together.

Our handlers never yield and we run one reader task (``max_tasks=1``), so:

* the lock guards nothing: :class:`_FreeLock` does not yield;
* when /dev/fuse holds the next request, or gets one while we wait for it
  in ``poll`` (``-o spin=US`` microseconds of ``poll(0)``, then one blocking
  ``poll`` of :data:`LINGER_MS`), ``wait_readable`` returns without parking
  the task in trio. Most requests come from one process making one call
  after another (tar, rm, find), so the next one arrives tens of
  microseconds after our reply. A trip through trio's scheduler cost
  ``epoll_ctl``, ``epoll_wait`` and about a third of the daemon's Python time
  (py-spy ``--gil``, untar); and on this kind of VM a sleep and a wake-up
  per request were the largest cost left after that: polling for 100 µs
  halved the time of an open/close/statfs loop and lowered the daemon's
  CPU per request too. The loop still goes through trio at least every
  :data:`BURST` requests, so signals (SIGTERM, SIGUSR1), the control socket
  and any other task get their turn, and whenever /dev/fuse stays empty for
  :data:`LINGER_MS`, which is where an idle daemon waits (it never spins
  when idle).

Everything else is trio's own. Nothing here changes pyfuse3's code.
"""

from __future__ import annotations

import select
import time
import types

import pyfuse3
import trio

__all__ = ["install", "lean_trio", "BURST"]

#: most requests served back to back without a trip through trio's scheduler
BURST = 64
#: how long to wait for the next request in ``poll`` before parking in trio
LINGER_MS = 2


class _FreeLock:
    """pyfuse3's read lock for a loop with a single reader task: never contended, never yields."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def lean_trio(spin_us: int = 0) -> types.SimpleNamespace:
    """What pyfuse3 uses of trio, with the shortcuts above."""
    pollers: dict[int, select.poll] = {}  # pyfuse3 waits on one fd: its session's
    served = 0
    spin_ns = spin_us * 1000
    now = time.monotonic_ns

    async def wait_readable(fd: int) -> None:
        nonlocal served
        poller = pollers.get(fd)
        if poller is None:
            poller = pollers[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        if served < BURST:
            if spin_ns:
                end = now() + spin_ns
                while not poller.poll(0):
                    if now() > end:
                        break
                else:
                    served += 1
                    return
            if poller.poll(LINGER_MS):
                served += 1
                return
        served = 0
        await trio.lowlevel.wait_readable(fd)

    lowlevel = types.SimpleNamespace(
        wait_readable=wait_readable,
        current_task=trio.lowlevel.current_task,
        current_trio_token=trio.lowlevel.current_trio_token,
        notify_closing=trio.lowlevel.notify_closing,
    )
    return types.SimpleNamespace(
        Lock=_FreeLock,
        lowlevel=lowlevel,
        ClosedResourceError=trio.ClosedResourceError,
        open_nursery=trio.open_nursery,
        from_thread=trio.from_thread,
    )


def install(spin_us: int = 0) -> None:
    """Point pyfuse3 at the lean loop (polling ``spin_us`` before it sleeps, see :data:`SPIN_US`).

    Valid only with ``pyfuse3.main(max_tasks=1)`` and handlers that never yield.
    """
    pyfuse3.trio = lean_trio(spin_us)  # type: ignore[attr-defined]
