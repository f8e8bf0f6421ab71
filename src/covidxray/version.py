"""The package version, for everything that records it (a leaf: imports nothing)."""

__version__ = "0.1.0"
