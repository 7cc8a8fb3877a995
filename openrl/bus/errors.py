"""Errors classified by what the caller should do (STYLE.md).

Each one also inherits the stdlib error it replaces, so `except ValueError` still works.
Translate them only at the edges: the gateway's error middleware and the bus's `_deliver`.
"""


class OpenRLError(Exception):
    """Base of every error OpenRL raises on purpose."""


class InvalidRequest(OpenRLError, ValueError):
    """The request is wrong: never retry. Becomes a 4xx or a failed future with category "user"."""


class NotFound(InvalidRequest, LookupError):
    """The addressed thing does not exist, or belongs to another API key (404)."""


class Unauthorized(InvalidRequest, PermissionError):
    """Missing or unknown API key (401)."""


class Unavailable(OpenRLError, RuntimeError):
    """A transient condition (no worker yet, bus reconnecting): retry later."""
