"""The mount: FUSE operations, inode table, request log, mount options and the daemon loop."""
