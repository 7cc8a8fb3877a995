"""What a user-supplied checkpoint name or id may look like, checked before it is used anywhere.

Names end up in KV keys and object names today and could end up in a file name tomorrow (an
export folder), so they are held to a small alphabet rather than escaped: no '/', no '..',
no '%', no NUL, no leading dot, at most 128 characters. Ids (sessions, training runs,
samplers) are the gateway's own (`s-<hex>`, `<session>:train:<n>`, `<session>:sample:<n>`)
and follow the same rule with ':' allowed and no dot at all.
"""

from __future__ import annotations

import re

from openrl.bus.errors import InvalidRequest

MAX_NAME = 128
MAX_ID = 256

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_:\-]*")


def check_name(name: object) -> str:
    """A checkpoint name: letters, digits, '_', '-', '.', not starting with '.', 1-128 characters."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not _NAME.fullmatch(name) or ".." in name:
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "..."
        raise InvalidRequest(
            f"checkpoint name must be 1-{MAX_NAME} characters of letters, digits, '_', '-' and '.', "
            f"not starting with '.' and without '..', got {shown!r}"
        )
    return name


def check_id(value: object, what: str = "id") -> str:
    """A session, training run or sampler id: letters, digits, '_', '-', ':', 1-256 characters."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID or not _ID.fullmatch(value):
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:80] + "..."
        raise InvalidRequest(f"malformed {what} {shown!r}")
    return value
