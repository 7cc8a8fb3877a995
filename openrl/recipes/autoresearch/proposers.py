"""Proposers: what changes the study before an attempt.

- `OptunaProposer` (`--proposer optuna`, the default, offline): Optuna's TPE over the declared
  parameter space. Every researcher shares one Optuna study in a journal file under the run
  dir (`optuna.journal`, JournalStorage with a file lock: threads and processes alike), and
  asks it for a trial (`study.ask`) and tells it the result (`study.tell`), so a running
  trial is known to the others (TPE's constant liar) and no one repeats a finished point.
  The proposal is written to the worktree's params file.
- `CommandProposer` (`--proposer cmd:'...'`): any command line (a coding agent), run in the
  researcher's worktree with OPENRL_PROGRAM (program.md), OPENRL_LEDGER, OPENRL_EDITABLE
  (the files it may change, space-separated; OPENRL_EDITABLE_JSON as a JSON list), and
  OPENRL_RESEARCHER / OPENRL_ATTEMPT. It edits files; the harness runs and judges. It knows
  nothing of the agent.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from openrl.recipes.autoresearch.study import Param, Study


@dataclass
class Proposal:
    params: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None
    ticket: Any = None  # the proposer's handle (an Optuna trial)


class Proposer(Protocol):
    name: str

    def propose(self, worktree: Path, researcher: int, attempt: int, stop: threading.Event) -> Proposal: ...

    def tell(self, proposal: Proposal, value: float | None, status: str) -> None: ...

    def record_baseline(self, params: dict[str, Any], value: float | None) -> None: ...


def read_params(worktree: Path, study: Study) -> dict[str, Any]:
    try:
        params = json.loads((worktree / study.params_file).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def write_params(worktree: Path, study: Study, params: dict[str, Any]) -> None:
    (worktree / study.params_file).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")


def _distribution(p: Param):
    import optuna

    if p.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(p.choices))
    if p.type == "int":
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return optuna.distributions.FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)


class OptunaProposer:
    name = "optuna"

    def __init__(self, study: Study, run_dir: Path):
        try:
            import optuna
        except ImportError as e:
            from importlib.metadata import packages_distributions

            dist = (packages_distributions().get("openrl") or ["openrl"])[0]
            raise ImportError(f"--proposer optuna needs optuna: pip install '{dist}[autoresearch]' (or pip install optuna)") from e
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        if not study.params:
            raise ValueError("--proposer optuna needs a parameter space: [params.NAME] tables in study.toml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        path = str(run_dir / "optuna.journal")
        storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        self.study_cfg = study
        self.distributions = {p.name: _distribution(p) for p in study.params}
        self.study = optuna.create_study(
            study_name=study.name, storage=storage, load_if_exists=True,
            direction="maximize" if study.metric.goal == "maximize" else "minimize",
            sampler=optuna.samplers.TPESampler(seed=study.seed, constant_liar=True, n_startup_trials=4),
        )  # fmt: skip
        self._lock = threading.Lock()

    def record_baseline(self, params: dict[str, Any], value: float | None) -> None:
        import optuna

        params = {k: v for k, v in params.items() if k in self.distributions}
        if value is None or set(params) != set(self.distributions):
            return
        try:
            trial = optuna.trial.create_trial(params=params, distributions=self.distributions, value=value)
        except ValueError:  # the committed params lie outside the space: the baseline stays out of TPE's model
            return
        with self._lock:
            self.study.add_trial(trial)

    def _seen(self) -> set[str]:
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        return {json.dumps(t.params, sort_keys=True) for t in self.study.get_trials(deepcopy=False, states=states)}

    def propose(self, worktree: Path, researcher: int, attempt: int, stop: threading.Event) -> Proposal:
        import optuna

        with self._lock:
            for _ in range(20):  # a point another researcher runs or ran is asked again
                seen = self._seen()
                trial = self.study.ask(self.distributions)
                if json.dumps(trial.params, sort_keys=True) not in seen:
                    break
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                return Proposal(ok=False, error="the space is exhausted: every point asked was run already")
        params = {**read_params(worktree, self.study_cfg), **trial.params}
        write_params(worktree, self.study_cfg, params)
        return Proposal(params=dict(trial.params), ticket=trial)

    def tell(self, proposal: Proposal, value: float | None, status: str) -> None:
        import optuna

        if proposal.ticket is None:
            return
        with self._lock:
            if value is None:
                self.study.tell(proposal.ticket, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(proposal.ticket, value)


class CommandProposer:
    name = "cmd"

    def __init__(self, command: str, study: Study, ledger: Path, log_dir: Path):
        if not command.strip():
            raise ValueError("--proposer cmd: needs a command line, e.g. cmd:'my-agent --task program.md'")
        self.command, self.study, self.ledger, self.log_dir = command, study, ledger, log_dir

    def record_baseline(self, params: dict[str, Any], value: float | None) -> None:
        pass

    def tell(self, proposal: Proposal, value: float | None, status: str) -> None:
        pass

    def propose(self, worktree: Path, researcher: int, attempt: int, stop: threading.Event) -> Proposal:
        env = {**os.environ, "OPENRL_PROGRAM": str(worktree / "program.md"), "OPENRL_LEDGER": str(self.ledger),
               "OPENRL_EDITABLE": " ".join(shlex.quote(f) for f in self.study.editable),
               "OPENRL_EDITABLE_JSON": json.dumps(list(self.study.editable)), "OPENRL_STUDY_DIR": str(worktree),
               "OPENRL_RESEARCHER": str(researcher), "OPENRL_ATTEMPT": str(attempt)}  # fmt: skip
        for secret in ("TINKER_API_KEY", "OPENRL_API_KEY"):  # the agent edits files; it needs no key to the stack
            env.pop(secret, None)
        rc, seconds = run_group(self.command, worktree, env, self.study.proposer_budget_s, stop, self.log_dir / f"proposer-r{researcher}-{attempt}.log")
        if rc is None:
            return Proposal(ok=False, error="interrupted" if stop.is_set() else f"the proposer ran past {self.study.proposer_budget_s:g} s")
        if rc != 0:
            return Proposal(ok=False, error=f"the proposer exited {rc}")
        return Proposal(params=read_params(worktree, self.study))


def run_group(command: str, cwd: Path, env: dict, budget_s: float, stop: threading.Event, log_path: Path) -> tuple[int | None, float]:
    """Run `command` (a shell line) in its own process group, output to `log_path`; kill the
    group past `budget_s` or when `stop` is set. Returns (exit code or None if killed, seconds)."""
    started = time.monotonic()
    log_path = log_path.resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.2)
                    return rc, time.monotonic() - started
                except subprocess.TimeoutExpired:
                    pass
                if stop.is_set() or time.monotonic() - started > budget_s:
                    kill_group(proc)
                    return None, time.monotonic() - started
        finally:
            if proc.poll() is None:  # an exception in this thread: leave nothing behind
                kill_group(proc)


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; its group may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
