"""Offline tree tools: export, cpio, import, inspect, absorb/materialize, the walk and device tables."""
