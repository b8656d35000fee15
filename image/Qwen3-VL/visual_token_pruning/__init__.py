"""Placeholder package: this fork's VTR code arrives with its own issue (see README, "Layout")."""

__version__ = "0.1.0"
