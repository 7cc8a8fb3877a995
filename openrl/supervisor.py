"""`openrl up`: nats-server, gateway and trainer as separate OS processes, supervised.

A child that dies is restarted with back-off; one that dies soon after starting has the end
of its log shown on the console, and one that does so `crash_loop` times in a row with the
same last log line stops the stack (CrashLoop) instead of looping. Ctrl-C or SIGTERM stops
the workers first (SIGTERM, then SIGKILL after the grace period) and nats-server last. Every child's
output goes to `<data-dir>/logs/<role>.log`; pids are in `<data-dir>/run/<role>.pid` and
the connection facts in `<data-dir>/run/stack.json` (0600: it holds the API key).

A child inherits this process's environment without its secrets (`SECRET_ENV`: API keys and
NATS credentials), and gets only what its `Child.env` gives it: its own role's credentials.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from openrl.bus.auth import write_private

log = structlog.get_logger(__name__)


# What no child inherits: each gets its own role's credentials (and the gateway the API keys)
# through `Child.env`, or nothing.
SECRET_ENV = ("OPENRL_NATS_USER", "OPENRL_NATS_PASSWORD", "OPENRL_NATS_CREDS", "OPENRL_API_KEYS", "OPENRL_API_KEY", "TINKER_API_KEY")


@dataclass
class Child:
    role: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    grace_s: float = 10.0
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    log_offset: int = 0  # where this run's output starts in its log
    last_error: str = ""  # the last line of its previous early death's output, normalized
    same_errors: int = 0  # early deaths in a row that ended with that line


class CrashLoop(Exception):
    """A child died soon after starting, with the same last log line, `crash_loop` times in a
    row: restarting it again would only repeat the error."""

    def __init__(self, role: str, deaths: int, tail: list[str], log_path: Path):
        self.role, self.deaths, self.tail, self.log_path = role, deaths, tail, log_path
        super().__init__(f"{role} exited {deaths} times in a row with the same error")


def _signature(line: str) -> str:
    """A log line without what changes from one run to the next (a JSON line's time and pid)."""
    try:
        fields = json.loads(line)
    except ValueError:
        return line.strip()
    if not isinstance(fields, dict):
        return line.strip()
    return json.dumps({k: v for k, v in fields.items() if k not in ("timestamp", "time", "pid")}, sort_keys=True)


class Supervisor:
    """`crash_loop`: early deaths in a row with the same last log line that stop the stack
    (CrashLoop from poll); a death counts as early within `early_s` of its start (loading a
    large model may take minutes before it fails). `console`: where a child's last log lines
    go when it dies early, so the reason is seen without opening its log."""

    def __init__(self, data_dir: Path, children: list[Child], *, crash_loop: int = 3, early_s: float = 600.0,
                 console=None):
        self.data_dir = data_dir
        self.children = children
        self.crash_loop = crash_loop
        self.early_s = early_s
        self.console = console if console is not None else sys.stderr
        self.logs = data_dir / "logs"
        self.run_dir = data_dir / "run"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stopping = False

    def start(self, child: Child) -> None:
        out = open(self.logs / f"{child.role}.log", "ab")
        child.log_offset = out.seek(0, os.SEEK_END)
        env = {**{k: v for k, v in os.environ.items() if k not in SECRET_ENV}, **child.env}
        child.proc = subprocess.Popen(child.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out.close()
        child.started_at = time.monotonic()
        (self.run_dir / f"{child.role}.pid").write_text(f"{child.proc.pid}\n")
        log.info("process_started", role=child.role, pid=child.proc.pid, log=str(self.logs / f"{child.role}.log"))

    def start_all(self) -> None:
        for child in self.children:
            self.start(child)

    def poll(self) -> None:
        """Restart whatever died (not while stopping)."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                if now >= child.next_start:
                    self.start(child)
                continue
            code = child.proc.poll()
            if code is None or self.stopping:
                continue
            # What it started may outlive it (vLLM's engine-core processes, a pool's workers) and
            # hold memory the restarted child needs: its process group goes with it.
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)  # start_new_session: the group is the child's pid
            except (ProcessLookupError, PermissionError):
                pass
            # Back off on crash loops; a child that ran a while restarts at once.
            backoff = 0.5 if now - child.started_at > 30 else min(10.0, 0.5 * 2**child.restarts)
            child.restarts += 1
            child.proc = None
            child.next_start = now + backoff
            log.warning("process_died", role=child.role, code=code, restart_in_s=backoff, restarts=child.restarts)
            if now - child.started_at <= self.early_s:
                self._early_death(child)
            else:
                child.last_error, child.same_errors = "", 0

    def tail(self, child: Child, lines: int = 12) -> list[str]:
        """The last lines its current (or last) run wrote to its log."""
        with open(self.logs / f"{child.role}.log", "rb") as f:
            f.seek(max(child.log_offset, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def _early_death(self, child: Child) -> None:
        """Show why it died (once per distinct error); stop the stack when the error repeats."""
        tail = self.tail(child)
        error = _signature(tail[-1]) if tail else ""
        if error and error == child.last_error:
            child.same_errors += 1
        else:
            child.last_error, child.same_errors = error, 1
            shown = "\n".join(f"  | {line}" for line in tail) or "  | (nothing)"
            print(f"{child.role} exited soon after starting; the end of {self.logs / (child.role + '.log')}:\n{shown}",
                  file=self.console, flush=True)
        if self.crash_loop and child.same_errors >= self.crash_loop:
            raise CrashLoop(child.role, child.same_errors, tail, self.logs / f"{child.role}.log")

    def stop_all(self) -> None:
        self.stopping = True
        for child in reversed(self.children):  # workers first, the broker last
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(child.grace_s)
            except subprocess.TimeoutExpired:
                log.warning("process_killed", role=child.role, after_s=child.grace_s)
                proc.kill()
                proc.wait()
            log.info("process_stopped", role=child.role, code=proc.returncode)
            (self.run_dir / f"{child.role}.pid").unlink(missing_ok=True)

    def write_stack(self, facts: dict) -> None:
        write_private(self.run_dir / "stack.json", json.dumps(facts, indent=2) + "\n")


def openrl_argv(*args: str) -> list[str]:
    """How a child is launched: `python -m openrl <role> ...`, so `ps` shows the role."""
    return [sys.executable, "-m", "openrl", *args]
