"""pyproxy: a userspace L7 sidecar proxy that measures itself."""

__version__ = "0.1.0"
