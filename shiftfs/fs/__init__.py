"""The mounted filesystem: option parsing, the FUSE daemon and the kernel backend."""
