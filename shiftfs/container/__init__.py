"""Containers on shiftfs views: ``shiftfs run`` and ``shiftfs exec``.

- :mod:`.launcher`: the launch both commands share (user namespace, daemons,
  staging, supervision); a command gives a ``Layout``.
- :mod:`.preflight`: checks and view options, before anything is forked.
- :mod:`.daemons`: starting each view's daemon on a /dev/fuse descriptor.
- :mod:`.inner`: the process that makes the container's namespaces and mounts
  the views from inside them (where each descriptor ends is in its design note).
- :mod:`.run_args` and :mod:`.run`: run's options, and its layout (a root
  filesystem, pivot_root, /dev, binds); :mod:`.rootfs`: building that root.
- :mod:`.exec`: exec's layout (the host's filesystem with directories shifted).
- :mod:`.join`: a second ``shiftfs run`` of one ROOT joins the running container.
- :mod:`.userns`: id maps of the user namespace and writing them.
- :mod:`.supervise`: signal relaying, waiting, exit statuses, forked children.
- :mod:`.seccomp_notify`, :mod:`.notify_target`, :mod:`.notify_mount`: the
  single-id supervisor of chown/mknod/ACL calls.

The system calls themselves live in :mod:`shiftfs.sys`.
"""
