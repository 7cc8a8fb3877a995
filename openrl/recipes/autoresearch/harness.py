"""The researchers: each in its own git worktree of the study, looping propose -> run within
the budget -> read the metric -> keep (commit) or discard (reset), all against one stack.

Layout of a study's run dir (`<study>/run/`, git-excluded):

    ledger.jsonl          every attempt (openrl.recipes.autoresearch.ledger)
    optuna.journal        the shared Optuna study (--proposer optuna)
    worktrees/r0, r1...   a worktree per researcher, on branch autoresearch/r<i>
    attempts/r0-0001/     an attempt's OPENRL_ATTEMPT_DIR: metrics.jsonl, command.log
    logs/                 the cmd proposer's output per attempt
    results.md, progress.png, best.json, best.diff   (openrl.recipes.autoresearch.report)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from openrl.recipes.autoresearch.ledger import Ledger
from openrl.recipes.autoresearch.proposers import Proposal, Proposer, read_params, run_group
from openrl.recipes.autoresearch.study import Study, read_metric

DIFF_LIMIT = 64_000  # characters of an attempt's diff kept in the ledger (best.diff has it whole)
IDENTITY = {"GIT_AUTHOR_NAME": "openrl autoresearch", "GIT_AUTHOR_EMAIL": "autoresearch@openrl.invalid",
            "GIT_COMMITTER_NAME": "openrl autoresearch", "GIT_COMMITTER_EMAIL": "autoresearch@openrl.invalid"}  # fmt: skip


class GitError(RuntimeError):
    pass


def git(cwd: Path, *args: str, check: bool = True) -> str:
    env = {**os.environ, **IDENTITY, "GIT_TERMINAL_PROMPT": "0"}
    r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise GitError(f"git {' '.join(args)} in {cwd}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


@dataclass(frozen=True)
class Stack:
    base_url: str
    api_key: str | None


def prepare_repo(study: Study, run_dir: Path, say=print) -> str:
    """Make the study folder a git repo if it is not one (its own, not a parent's), commit what
    is there, keep the run dir out of git; returns the commit the researchers start from."""
    if not (study.dir / ".git").exists():
        git(study.dir, "init", "-q", "-b", "main")
        say(f"{study.dir} was not a git repository: initialised one (the researchers' worktrees branch from it)")
    exclude = study.dir / ".git" / "info" / "exclude"
    rel = run_dir.relative_to(study.dir).as_posix() if run_dir.is_relative_to(study.dir) else None
    if rel is not None:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        lines = exclude.read_text().splitlines() if exclude.exists() else []
        if f"/{rel}/" not in lines:
            exclude.write_text("\n".join([*lines, f"/{rel}/"]) + "\n")
    if git(study.dir, "status", "--porcelain", "--untracked-files=all").strip():
        git(study.dir, "add", "-A")
        git(study.dir, "commit", "-q", "-m", "autoresearch: the study as it stands")
        say(f"committed the study's uncommitted changes in {study.dir} (the researchers start from a commit)")
    return git(study.dir, "rev-parse", "HEAD").strip()


def worktree(study: Study, run_dir: Path, i: int, base: str) -> Path:
    """Researcher i's worktree (reused, cleaned, when the run dir has it from an earlier run)."""
    path = run_dir / "worktrees" / f"r{i}"
    if path.exists() and (path / ".git").exists():
        reset(path)
        return path
    git(study.dir, "worktree", "prune")
    path.parent.mkdir(parents=True, exist_ok=True)
    git(study.dir, "worktree", "add", "-q", "-B", f"autoresearch/r{i}", str(path), base)
    return path


def reset(tree: Path) -> None:
    """Back to the last commit: no edit, no new file, nothing an attempt wrote."""
    git(tree, "reset", "-q", "--hard", "HEAD")
    git(tree, "clean", "-q", "-fdx")


def staged_changes(tree: Path) -> tuple[list[str], str]:
    """Stage every change in the worktree; the changed paths and the diff."""
    git(tree, "add", "-A")
    names = [n for n in git(tree, "diff", "--cached", "--name-only", "--no-renames", "-z").split("\0") if n]
    return names, git(tree, "diff", "--cached", "--no-renames")


class Researcher:
    def __init__(self, i: int, study: Study, run_dir: Path, tree: Path, proposer: Proposer, ledger: Ledger, stack: Stack,
                 stop: threading.Event, say=print, baseline_done: threading.Event | None = None):  # fmt: skip
        self.i, self.study, self.run_dir, self.tree = i, study, run_dir, tree
        self.proposer, self.ledger, self.stack, self.stop, self.say = proposer, ledger, stack, stop, say
        # Set once researcher 0's baseline is in the ledger (or researcher 0 has ended): the bar
        # every other attempt is judged against, so none is judged before it.
        self.baseline_done = baseline_done if baseline_done is not None else threading.Event()
        allowed = set(study.editable) | ({study.params_file} if proposer.name == "optuna" else set())
        self.allowed = {Path(f).as_posix() for f in allowed}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            done = sum(1 for e in self.ledger.entries() if e.get("researcher") == self.i)  # a resumed study goes on counting
            if self.i == 0 and done:
                self.baseline_done.set()
            for n in range(done, self.study.attempts):
                if self.stop.is_set():
                    break
                self.attempt(n)
                if self.i == 0:
                    self.baseline_done.set()
        except BaseException as e:  # reported by run_study; the others go on
            self.error = e
        finally:
            if self.i == 0:
                self.baseline_done.set()  # whatever became of it: the others must not wait forever
            try:
                reset(self.tree)
            except GitError as e:
                self.say(f"researcher {self.i}: could not clean {self.tree}: {e}")

    def attempt(self, n: int) -> None:
        baseline = self.i == 0 and n == 0
        entry = {"researcher": self.i, "attempt": n, "proposer": "baseline" if baseline else self.proposer.name, "started": time.time(),
                 "params": {}, "diff": "", "metric": None, "commit": None, "error": None}  # fmt: skip
        proposal = Proposal()
        t0 = time.monotonic()
        if not baseline:
            proposal = self.proposer.propose(self.tree, self.i, n, self.stop)
            if not proposal.ok:
                entry.update(status="interrupted" if self.stop.is_set() else "proposer-failed", error=proposal.error)
                return self.finish(entry, proposal, t0)
        changed, diff = staged_changes(self.tree)
        entry.update(params=read_params(self.tree, self.study) or proposal.params, diff=diff[:DIFF_LIMIT], changed=changed)
        forbidden = [f for f in changed if f not in self.allowed]
        if forbidden:
            entry.update(status="forbidden", error=f"changed files outside the editable list {sorted(self.allowed)}: {forbidden}")
            return self.finish(entry, proposal, t0)
        attempt_dir = self.run_dir / "attempts" / f"r{self.i}-{n:04d}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        (attempt_dir / "metrics.jsonl").unlink(missing_ok=True)
        entry["attempt_dir"] = str(attempt_dir)
        env = self.attempt_env(attempt_dir, entry["params"], n)
        rc, _ = run_group(self.study.command, self.tree, env, self.study.budget_s, self.stop, attempt_dir / "command.log")
        if rc is None:
            entry.update(status="interrupted" if self.stop.is_set() else "overrun",
                         error=None if self.stop.is_set() else f"ran past the budget of {self.study.budget_s:g} s: process group killed")
            return self.finish(entry, proposal, t0)
        if rc != 0:
            entry.update(status="failed", error=f"the command exited {rc} (see {attempt_dir / 'command.log'})")
            return self.finish(entry, proposal, t0)
        try:
            entry["metric"] = read_metric(attempt_dir / "metrics.jsonl", self.study.metric)
        except ValueError as e:
            entry.update(status="failed", error=str(e))
            return self.finish(entry, proposal, t0)
        return self.finish(entry, proposal, t0, judge=not baseline, baseline=baseline)

    def attempt_env(self, attempt_dir: Path, params: dict, n: int) -> dict[str, str]:
        env = {**os.environ, "OPENRL_ATTEMPT_DIR": str(attempt_dir), "OPENRL_PARAMS": json.dumps(params),
               "OPENRL_RESEARCHER": str(self.i), "OPENRL_ATTEMPT": str(n), "TINKER_BASE_URL": self.stack.base_url,
               "OPENRL_PYTHON": sys.executable, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # fmt: skip
        env.setdefault("HF_HUB_OFFLINE", "1")
        if self.stack.api_key:
            env["TINKER_API_KEY"] = self.stack.api_key
        return env

    def finish(self, entry: dict, proposal: Proposal, t0: float, *, judge: bool = False, baseline: bool = False) -> None:
        entry["duration_s"] = round(time.monotonic() - t0, 3)
        metric = self.study.metric

        def decide(e: dict, best: float | None) -> dict:
            if baseline:
                e["status"] = "baseline"
                e["commit"] = git(self.tree, "rev-parse", "HEAD").strip()
            elif judge:
                e["best_before"] = best
                if metric.better(e["metric"], best):
                    label = ", ".join(f"{k}={v}" for k, v in sorted(e["params"].items()))[:200]
                    if e["diff"]:
                        git(self.tree, "commit", "-q", "-m", f"autoresearch r{self.i} attempt {e['attempt']}: {metric.key} {e['metric']:.6g}\n\n{label}")
                    e.update(status="kept", commit=git(self.tree, "rev-parse", "HEAD").strip())
                else:
                    e["status"] = "discarded"
            return e

        while judge and not (self.baseline_done.is_set() or self.stop.is_set()):  # attempts run beside the baseline; judged after it
            self.baseline_done.wait(0.2)
        entry = self.ledger.judge_and_append(entry, metric.better, decide)
        reset(self.tree)
        if baseline:
            self.proposer.record_baseline(entry["params"], entry["metric"])
        else:
            self.proposer.tell(proposal, entry["metric"], entry["status"])
        shown = f"{entry['metric']:.4f}" if entry["metric"] is not None else "-"
        self.say(f"r{self.i} attempt {entry['attempt']}: {entry['status']} {metric.key}={shown} "
                 f"({entry['duration_s']:.0f} s){'  ' + entry['error'] if entry.get('error') else ''}")  # fmt: skip


def run_study(study: Study, proposer: Proposer, stack: Stack, run_dir: Path, stop: threading.Event, say=print,
              researchers: int | None = None) -> list[BaseException]:  # fmt: skip
    """Run the researchers until each has made its attempts or `stop` is set; returns the
    errors that ended a researcher early (none when all went well)."""
    base = prepare_repo(study, run_dir, say)
    ledger = Ledger(run_dir / "ledger.jsonl")
    n = researchers or study.researchers
    baseline_done = threading.Event()
    team = [Researcher(i, study, run_dir, worktree(study, run_dir, i, base), proposer, ledger, stack, stop, say, baseline_done)
            for i in range(n)]  # fmt: skip
    (run_dir / "base_commit").write_text(base + "\n")
    threads = [threading.Thread(target=r.run, name=f"researcher-{r.i}", daemon=True) for r in team]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):  # the main thread stays free for signals
        for t in threads:
            t.join(timeout=0.2)
    return [r.error for r in team if r.error is not None]
