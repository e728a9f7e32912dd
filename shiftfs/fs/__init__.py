"""The FUSE daemon: mounting, options, and how the daemon keeps itself apart from what it serves."""
