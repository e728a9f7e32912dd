"""shiftfs benchmark suite: native vs kernel idmapped mount vs shiftfs vs FUSE peers.

Run as root: ``python -m bench --quick`` or ``python -m bench --full``.
See bench/README.md for the method.
"""
