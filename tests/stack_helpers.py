"""What the tests that drive a stack import by name: the API keys, the base model, the Stack
handle, `openrl up` run for a test (`run_stack`) and process checks. Not in conftest.py: with
several conftest.py files collected together, `from conftest import ...` finds whichever was
imported first."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

API_KEY = "tml-test-key-0123456789"
OTHER_KEY = "tml-other-key-9876543210"
BASE_MODEL = "openrl/tiny-qwen3"


@dataclass
class Stack:
    url: str
    api_key: str
    data_dir: Path
    nats_url: str
    proc: subprocess.Popen

    def pid(self, role: str) -> int:
        return int((self.data_dir / "run" / f"{role}.pid").read_text())

    def wait_restarted(self, role: str, old_pid: int, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                pid = self.pid(role)
                if pid != old_pid:
                    return pid
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{role} was not restarted")

    def healthz(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v1/healthz", timeout=5) as r:
            return json.loads(r.read())

    def keys(self, *args: str) -> subprocess.CompletedProcess:
        """`openrl keys ARGS` against this stack's bus."""
        return subprocess.run([sys.executable, "-m", "openrl", "keys", *args, "--nats-url", self.nats_url],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    def new_key(self, prefix: str = "test") -> str:
        """A fresh API key (`openrl keys create`): a tenant that no other test has used."""
        out = self.keys("create", "--name", f"{prefix}-{uuid.uuid4().hex[:8]}")
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip().splitlines()[-1]

    def service_client(self, api_key: str | None = None, base_url: str | None = None):
        import tinker

        return tinker.ServiceClient(base_url=base_url or self.url, api_key=api_key or self.api_key)


def bus_config(url: str, role: str = "operator", **kw):
    """A BusConfig for an in-process client of a test server: `role`'s credentials from the
    session's file (OPENRL_NATS_CREDS, made by the `nats_credentials` fixture)."""
    from openrl.bus import auth
    from openrl.bus.client import BusConfig

    creds = auth.load(Path(os.environ["OPENRL_NATS_CREDS"]), role)
    return BusConfig(url=url, role=role, user=creds.user, password=creds.password, **kw)


def nats_options(role: str = "operator") -> dict:
    """nats.connect keyword arguments for a bare client of a test server, as `role`."""
    from openrl.bus import auth

    return auth.connect_options(role, auth.load(Path(os.environ["OPENRL_NATS_CREDS"]), role))


def free_port() -> int:
    from openrl.bus.server import free_port

    return free_port()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        return open(f"/proc/{pid}/stat").read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def run_stack(
    data_dir: Path, nats_credentials: Path, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None, stop_s: float = 60
):
    """`openrl up ARGS` as a user runs it in `data_dir` (separate processes, supervised, its NATS
    enforcing the session's credentials, copied to where `openrl up` keeps them), with `env`
    added to the environment; yields the Stack, then stops it with SIGTERM and checks that it
    stopped within `stop_s`, every role with it, each having kept to its permissions."""
    shutil.copy(nats_credentials, data_dir / nats_credentials.name)
    port = free_port()
    cmd = [
        sys.executable, "-m", "openrl", "up", "--data-dir", str(data_dir), "--port", str(port),
        "--api-key", API_KEY, "--log-level", "info", "--threads", "1", "--snapshot-every", "4", *args,
    ]
    log = open(data_dir / "up.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OPENRL_API_KEYS": OTHER_KEY, **(env or {})},
                            start_new_session=True)  # fmt: skip
    stack_file = data_dir / "run" / "stack.json"
    deadline = time.monotonic() + 900
    while not stack_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"openrl up failed to start; see {data_dir}/up.log and {data_dir}/logs:\n" + (data_dir / "up.log").read_text()[-4000:])
        time.sleep(0.3)
    facts = json.loads(stack_file.read_text())
    yield Stack(url=facts["base_url"], api_key=API_KEY, data_dir=data_dir, nats_url=facts["nats_url"], proc=proc)
    pids = {path.stem: int(path.read_text()) for path in (data_dir / "run").glob("*.pid")}
    proc.send_signal(signal.SIGTERM)  # what Ctrl-C does
    try:
        code = proc.wait(stop_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"openrl up did not stop within {stop_s} s of SIGTERM") from None
    finally:
        log.close()
    assert code == 0, f"openrl up exited with {code}"
    running = [role for role, pid in pids.items() if alive(pid)]
    assert not running, f"still running after openrl up stopped: {running}"
    # Every role did its work within its permissions: nats-server logs each refusal.
    violations = [line for line in (data_dir / "logs" / "nats.log").read_text().splitlines() if "Violation" in line]
    assert not violations, "NATS refused the stack's own processes (openrl/bus/auth.py):\n" + "\n".join(violations[:20])


def run_alone(fn, *args):
    """`fn(*args)` (a module-level function, a coroutine function or not) in a fresh interpreter
    (multiprocessing's spawn): a process with no thread but its own. For tracemalloc: CPython
    3.11's tracemalloc.start()/stop() can crash (SIGSEGV) while other threads allocate, and
    this test process has many (SDK clients' background threads, torch's). Returns fn's result;
    raises its exception."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_call, (fn, args))


def _call(fn, args):
    import asyncio
    import inspect

    result = fn(*args)
    return asyncio.run(result) if inspect.iscoroutine(result) else result
