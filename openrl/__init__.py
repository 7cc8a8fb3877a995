"""OpenRL: a self-hosted implementation of the Tinker post-training API."""

__version__ = "0.1.0"
