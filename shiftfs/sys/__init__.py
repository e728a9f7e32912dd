"""The one system-call layer: every ctypes call into libc lives in this package.

Python 3.11 lacks the \\*at() calls with the flags shiftfs needs, ``unshare``,
``setns`` and the new mount API, so they go through libc with ctypes. One
libc handle and one error rule (:mod:`.libc`) serve them all:

* :mod:`.files` — calls on backing inodes by descriptor (renameat2, utimensat,
  fchownat/linkat with AT_EMPTY_PATH, statx), ``proc_fd``, ``O_PATH_NOFOLLOW``;
* :mod:`.mounts` — namespaces and mounts (unshare, setns, mount, umount2,
  open_tree, move_mount, mount_setattr, pivot_root, prctl, /proc/self/mountinfo);
* :mod:`.walk` — the one tree walk (openat/fstat/getdents by descriptor, no
  recursion, bounded descriptors) and ``remove_tree``, below both
  ``ownership/`` and ``offline/``, which walk trees.

Nothing here knows about shiftfs's ownership rules; callers turn an
:class:`OSError` into their own one-line message.
"""
