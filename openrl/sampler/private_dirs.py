"""Private directories a sampler makes in a shared place (the system temp dir): vLLM's IPC
sockets and its adapters' folders. A sampler removes its own when it closes; one killed with
SIGKILL cannot, so each directory holds a lock file its process keeps locked (`flock`) for as
long as it lives, and the next sampler to start removes every directory of the kind whose lock
it can take: the kernel drops a process's locks when it dies, however it died. That works
across PID namespaces (containers sharing a temp dir), where a PID in the name would not.

    path, lock = make("openrl-vllm-adapters-", parent)   # mode 700, locked by this process
    ...
    release(path, lock)                                  # removed, lock closed
    sweep("openrl-vllm-adapters-", parent)               # at start: the dead ones' directories

A directory without the lock file is left alone (made by an older version, or still being
made: the lock file appears already locked, renamed into place).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import structlog

log = structlog.get_logger()

LOCK = ".owner.lock"


def make(prefix: str, parent: str | os.PathLike | None = None) -> tuple[Path, int]:
    """A new directory `<parent>/<prefix>XXXXXXXX` (mode 700) and the descriptor of its lock
    file, locked by this process until `release` or its death."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    pending = path / f"{LOCK}.{os.getpid()}"
    fd = os.open(pending, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(pending, path / LOCK)  # visible to `sweep` only once locked
    except BaseException:
        os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path, fd


def release(path: Path, fd: int) -> None:
    """Remove a directory `make` returned, then let its lock go."""
    shutil.rmtree(path, ignore_errors=True)
    os.close(fd)


def sweep(prefix: str, parent: str | os.PathLike | None = None) -> list[Path]:
    """Remove this user's `<parent>/<prefix>*` directories whose owner is gone (their lock is
    free); the ones removed."""
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
            fd = os.open(path / LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock file (an older version's, or being made), or gone meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner lives
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        removed.append(path)
    if removed:
        log.info("stale_dirs_removed", prefix=prefix, dirs=[str(p) for p in removed])
    return removed
