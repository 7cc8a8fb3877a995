"""Attempts per hour with 1, 2 and 4 researchers on one stack (default model, CPU), with the
trainer's and sampler's busy fraction: the evidence that shared workers carry parallel research.

    python bench/autoresearch.py --researchers 1 2 4 --attempts 2 --steps 4 --out bench/results/autoresearch.json

One `openrl up` (one trainer, `--samplers` samplers); for each researcher count a fresh copy of
examples/autoresearch/async-grpo (its space cut to learning rate and loss, which do not change
an attempt's cost; max_staleness is fixed) runs through the harness in-process with the Optuna
proposer, each researcher making `--attempts` attempts. Per count: wall seconds, attempts,
attempts per hour, the mean attempt duration, and each worker's busy fraction: CPU seconds
(utime + stime from /proc/<pid>/stat) over the wall time, in cores (a worker on `--threads`
torch threads can reach that many). The ratios against 1 researcher are in `speedup`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import API_KEY, cpu_seconds, finish_results, machine, start_stack, stop_stack  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def worker_pids(data_dir: Path) -> dict[str, int]:
    return {f.stem: int(f.read_text()) for f in (data_dir / "run").glob("*.pid") if f.stem.startswith(("trainer", "sampler"))}


def bench_study(dst: Path, steps: int, tasks: int, samples: int) -> Path:
    shutil.copytree(ROOT / "examples" / "autoresearch" / "async-grpo", dst)
    toml = (dst / "study.toml").read_text()
    toml = re.sub(r"\n\[params\.max_staleness\][^\[]*", "\n", toml)  # a fixed cost per attempt
    (dst / "study.toml").write_text(toml)
    params = json.loads((dst / "params.json").read_text())
    (dst / "params.json").write_text(json.dumps({**params, "steps": steps, "tasks": tasks, "measure_samples": samples}, indent=1) + "\n")
    return dst


def run_count(n: int, args, url: str, data_dir: Path, work: Path) -> dict:
    from openrl.recipes.autoresearch.harness import Stack, run_study
    from openrl.recipes.autoresearch.ledger import read
    from openrl.recipes.autoresearch.proposers import OptunaProposer
    from openrl.recipes.autoresearch.study import load_study
    from dataclasses import replace

    study = replace(load_study(bench_study(work / f"study-{n}", args.steps, args.tasks, args.measure_samples)),
                    researchers=n, attempts=args.attempts)  # fmt: skip
    run_dir = study.dir / "run"
    run_dir.mkdir()
    pids = worker_pids(data_dir)
    cpu0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
    t0 = time.monotonic()
    errors = run_study(study, OptunaProposer(study, run_dir), Stack(url, API_KEY), run_dir, threading.Event(), say=lambda m: print(f"  [{n}] {m}", flush=True))
    wall = time.monotonic() - t0
    busy = {role: round((cpu_seconds(pid) - cpu0[role]) / wall, 3) for role, pid in pids.items()}
    entries = read(run_dir / "ledger.jsonl")
    ok = [e for e in entries if e["metric"] is not None]
    return {
        "researchers": n, "attempts": len(entries), "ok": len(ok), "wall_s": round(wall, 1),
        "attempts_per_hour": round(len(ok) / wall * 3600, 1),
        "attempt_s_mean": round(sum(e["duration_s"] for e in entries) / len(entries), 1),
        "busy_cores": busy, "errors": [repr(e) for e in errors],
        "statuses": sorted(e["status"] for e in entries),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--researchers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--attempts", type=int, default=2, help="per researcher")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--measure-samples", type=int, default=16)
    p.add_argument("--samplers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "autoresearch.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    results: dict = {"machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-autoresearch-") as tmp:
        work = Path(tmp)
        proc, url = start_stack(work / "stack", "--samplers", str(args.samplers), "--threads", str(args.threads))
        try:
            for n in args.researchers:
                row = run_count(n, args, url, work / "stack", work)
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            stop_stack(proc)
    base = results["runs"][0]["attempts_per_hour"] if results["runs"] else 0
    results["speedup"] = {str(r["researchers"]): round(r["attempts_per_hour"] / base, 2) if base else None for r in results["runs"]}
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()
