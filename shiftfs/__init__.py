"""shiftfs: a FUSE filesystem that shifts ownership."""

__version__ = "0.1.0"
