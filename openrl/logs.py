"""structlog, configured once per process by the CLI (never at import)."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import structlog


def configure(level: str = "info", fmt: str = "auto") -> None:
    """`fmt`: "json" (one object per line, for files and log shippers), "console", or
    "auto" (console on a terminal, JSON otherwise)."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that use stdlib logging (nats, aiohttp, transformers) go to stderr too.
    logging.basicConfig(level=max(logging.getLevelName(level.upper()), logging.INFO), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("aiohttp.access", "httpx", "tinker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_process_name(role: str) -> None:
    """Show the role in `ps -o comm`/top (the command line already reads `openrl <role>`)."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, f"openrl-{role}"[:15].encode(), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux
        pass


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask on Linux, the CPU count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
