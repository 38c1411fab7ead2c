"""DAARION gateway: the one public entry of a DAARION node."""

__version__ = "0.1.0"
