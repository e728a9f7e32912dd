"""Containers on shiftfs views: ``shiftfs run`` and ``shiftfs exec``.

- :mod:`.launcher`: the launch both commands share (options, checks, user
  namespace, daemons, staging, supervision); a command gives a ``Layout``.
- :mod:`.run`: run's layout (a root filesystem, pivot_root, /dev, binds).
- :mod:`.exec`: exec's layout (the host's filesystem with directories shifted).
- :mod:`.userns`: id maps of the user namespace and writing them.
- :mod:`.supervise`: signal relaying, waiting, exit statuses, forked children.
- :mod:`.kernel`: the system calls (unshare, mount, pivot_root, open_tree).
"""
