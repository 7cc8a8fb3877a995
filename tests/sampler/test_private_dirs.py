"""A sampler's private directories in a shared temp dir (openrl/sampler/private_dirs.py): the
next sampler removes those of a sampler killed with SIGKILL, and never a live one's. The
owners here are real processes, killed for real; on the real vLLM engine, vllm_cases.py."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys

import pytest

from openrl.sampler import private_dirs

OWNER = """
import sys, time
from openrl.sampler import private_dirs
path, lock = private_dirs.make(sys.argv[1], sys.argv[2])
(path / "lora-1").mkdir()
print(path, flush=True)
time.sleep(600)
"""


@pytest.fixture
def owner(tmp_path):
    """Start a process that makes a directory and holds it; yields (process, its directory)."""
    procs = []

    def start(prefix: str = "openrl-vllm-adapters-"):
        proc = subprocess.Popen([sys.executable, "-c", OWNER, prefix, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline().strip()
        assert line, "the owner process made no directory"
        return proc, tmp_path / os.path.basename(line)

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_killed_owners_directory_goes_and_a_live_ones_stays(tmp_path, owner):
    live, live_dir = owner()
    dead, dead_dir = owner()
    other_kind, other_dir = owner("openrl-vllm-rpc-")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert private_dirs.sweep("openrl-vllm-adapters-", tmp_path) == [dead_dir]
    assert not dead_dir.exists()
    assert (live_dir / "lora-1").is_dir() and other_dir.is_dir()  # alive; another kind
    live.send_signal(signal.SIGKILL)
    live.wait()
    assert private_dirs.sweep("openrl-vllm-adapters-", tmp_path) == [live_dir]
    assert other_dir.is_dir()


def test_what_is_not_a_locked_directory_of_ours_is_left_alone(tmp_path):
    (tmp_path / "openrl-vllm-adapters-old").mkdir()  # no lock file: an older version's, or being made
    (tmp_path / "openrl-vllm-adapters-file").write_text("x")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / private_dirs.LOCK).write_text("")
    (tmp_path / "openrl-vllm-adapters-link").symlink_to(target)
    assert private_dirs.sweep("openrl-vllm-adapters-", tmp_path) == []
    assert (tmp_path / "openrl-vllm-adapters-old").is_dir() and (target / private_dirs.LOCK).exists()


def test_make_is_private_and_locked_until_release(tmp_path):
    path, lock = private_dirs.make("openrl-vllm-rpc-", tmp_path)
    assert path.parent == tmp_path and path.name.startswith("openrl-vllm-rpc-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert [p.name for p in path.iterdir()] == [private_dirs.LOCK]
    fd = os.open(path / private_dirs.LOCK, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held, as another process would find it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert private_dirs.sweep("openrl-vllm-rpc-", tmp_path) == []
    private_dirs.release(path, lock)
    assert not path.exists()
    with pytest.raises(OSError):
        os.fstat(lock)  # closed
