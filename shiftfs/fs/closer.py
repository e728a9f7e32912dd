"""Closing descriptors of removed inodes off the request loop.

The last ``close`` of a descriptor of an inode whose last name is gone is
where the backing filesystem frees the inode: ext4 truncates its blocks and
releases the inode in that ``close``, under its journal. Profiling ``rm -rf``
through the mount put 73 % of the daemon's busy time in that one call, made
inside FORGET; every request queued behind it waited. :class:`Closer` makes
those closes in one worker thread instead (``close`` releases the GIL, so the
worker's eviction overlaps the loop's next request).

Ownership, so no descriptor number is ever closed twice or closed while
something else uses it:

* only the loop thread hands descriptors over (:meth:`Closer.close`), and it
  hands over one only after the inode table has forgotten it (the inode left
  the table and its ``_fd`` is ``-1``): from then on the worker owns it;
* the worker closes exactly the descriptors in its queue, each once. A
  handed-over descriptor stays open until the worker closes it, so its number
  cannot be given to a new ``open`` before that; after the close the worker
  never touches the number again. The worker never reads or writes the
  inode table.

Queued descriptors are still open and count against RLIMIT_NOFILE: the
table closes on the loop instead while :data:`MAX_PENDING` are queued, so a
worker that falls behind (a slow disk) never starves the loop of descriptors.

The thread starts on the first hand-over (after the daemon has isolated
itself) and :meth:`Closer.drain` closes everything still queued before the
daemon exits.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

__all__ = ["Closer", "MAX_PENDING"]

#: most descriptors queued for the worker; beyond that the loop closes them itself
MAX_PENDING = 256

log = logging.getLogger(__name__)


class Closer:
    """One worker thread that closes the descriptors it is handed, in order."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: descriptors handed over (written by the loop thread only)
        self.handed = 0
        #: descriptors closed (written by the worker only)
        self.closed = 0

    @property
    def pending(self) -> int:
        """Descriptors handed over and not closed yet (they still count against RLIMIT_NOFILE)."""
        return self.handed - self.closed

    def close(self, fd: int) -> None:
        """Close ``fd`` in the worker; the caller must not use or close it again."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shiftfs-closer", daemon=True)
            self._thread.start()
        self.handed += 1
        self._queue.put(fd)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            fd = get()
            if fd is None:
                return
            try:
                os.close(fd)
            except OSError as e:  # EIO from the backing filesystem: nothing else to do
                log.warning("closing a removed inode's descriptor: %s", e)
            self.closed += 1

    def drain(self) -> None:
        """Close everything handed over so far and stop the worker (it restarts if handed more)."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join()
        self._thread = None
