"""Hematovision: white-blood-cell differential counting, shared core."""

__version__ = "0.1.0"
