"""`openrl autoresearch STUDY_DIR`: researchers run a study's attempts at once against one
stack, proposed by Optuna or by any agent command, judged by a metric (docs/autoresearch.md).

    openrl autoresearch examples-copy/async-grpo                     # Optuna TPE, study.toml's researchers
    openrl autoresearch my-study --proposer cmd:'my-agent --prompt-file "$OPENRL_PROGRAM"' --researchers 2

The stack: TINKER_BASE_URL and TINKER_API_KEY from the environment, else the local
`openrl up`'s run/stack.json under --data-dir. The key never goes on a command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from openrl.recipes.autoresearch.study import StudyError, load_study


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", type=Path, help="the study folder: study.toml, program.md (a git repo; one is initialised if not)")
    p.add_argument("--proposer", default="optuna", help="optuna (default: TPE over study.toml's [params]) or cmd:'COMMAND LINE' (an agent)")
    p.add_argument("--researchers", type=int, help="how many at once (default: study.toml's study.researchers)")
    p.add_argument("--attempts", type=int, help="per researcher, the baseline included (default: study.toml's study.attempts)")
    p.add_argument("--run-dir", type=Path, help="ledger, worktrees, attempts and results (default: STUDY_DIR/run)")
    p.add_argument("--base-url", default=None, help="the stack's URL [TINKER_BASE_URL, else run/stack.json]")
    p.add_argument("--data-dir", default=os.environ.get("OPENRL_DATA_DIR", "~/.openrl"), help="where the local openrl up keeps run/stack.json [OPENRL_DATA_DIR]")


def stack_of(args: argparse.Namespace):
    from openrl.recipes.autoresearch.harness import Stack

    url, key = args.base_url or os.environ.get("TINKER_BASE_URL"), os.environ.get("TINKER_API_KEY")
    stack_file = Path(args.data_dir).expanduser() / "run" / "stack.json"
    if (not url or not key) and stack_file.exists():
        facts = json.loads(stack_file.read_text())
        url, key = url or facts.get("base_url"), key or facts.get("api_key")
    if not url:
        raise StudyError(f"no stack: set TINKER_BASE_URL (and TINKER_API_KEY), or start `openrl up` (no {stack_file})")
    return Stack(base_url=url, api_key=key)


def proposer_of(spec: str, study, run_dir: Path):
    from openrl.recipes.autoresearch.proposers import CommandProposer, OptunaProposer

    if spec == "optuna":
        return OptunaProposer(study, run_dir)
    if spec.startswith("cmd:"):
        return CommandProposer(spec[4:], study, run_dir / "ledger.jsonl", run_dir / "logs")
    raise StudyError(f"--proposer must be optuna or cmd:'COMMAND', got {spec!r}")


def run(args: argparse.Namespace) -> int:
    """Check everything, run the study, write the results; the exit code (130 after Ctrl-C)."""
    from dataclasses import replace

    from openrl.recipes.autoresearch import report
    from openrl.recipes.autoresearch.harness import GitError, run_study

    try:
        study = load_study(args.study_dir)
        for name in ("researchers", "attempts"):
            value = getattr(args, name)
            if value is not None:
                if value < 1:
                    raise StudyError(f"--{name} must be >= 1, got {value}")
                study = replace(study, **{name: value})
        stack = stack_of(args)
        run_dir = (args.run_dir or study.dir / "run").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        proposer = proposer_of(args.proposer, study, run_dir)
    except (StudyError, ImportError, ValueError) as e:
        print(f"openrl autoresearch: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum, frame):
        if not stop.is_set():
            print(f"\n{signal.Signals(signum).name}: stopping the researchers (their attempts are killed, the worktrees reset)", flush=True)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    say(f"study {study.name}: {study.researchers} researcher(s) x {study.attempts} attempts, proposer {proposer.name}, "
        f"budget {study.budget_s:g} s, stack {stack.base_url}; ledger {run_dir / 'ledger.jsonl'}")  # fmt: skip
    try:
        errors = run_study(study, proposer, stack, run_dir, stop, say)
    except GitError as e:
        print(f"openrl autoresearch: {e}", file=sys.stderr)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    best = report.write(study, run_dir, say)
    say(f"results {run_dir / 'results.md'}" + (f"; best {study.metric.key} {best['metric']:.4f}: {run_dir / 'best.json'}, {run_dir / 'best.diff'}" if best else ""))
    for e in errors:
        print(f"openrl autoresearch: a researcher stopped early: {type(e).__name__}: {e}", file=sys.stderr)
    if stop.is_set():
        return 130
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrl.recipes.autoresearch", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    sys.exit(run(p.parse_args(argv)))
