"""Sampling through the stack: this checkout against another one (an older commit), in one run.

Both stacks (`openrl up --samplers 1`, the same torch threads) run side by side; each
repetition sends the same requests to one, then the other (bench/sampling.py's workload: chat
prompts, `stop=[]` so every sequence runs to max_tokens), so both see the same machine. Figures:
tokens/s of each, the ratio of the medians, the median of the per-pair ratios (this / baseline)
with its quartiles, and weight-sync latency (save_weights_and_get_sampling_client -> first token)
on each. Made to check that a refactor of the sampler did not slow sampling:

    git archive <old-commit> | tar -x -C /tmp/openrl-baseline
    python bench/sampler_versions.py --baseline /tmp/openrl-baseline [--prompts 16] [--samples 2] [--max-tokens 32] [--reps 5]

The baseline's processes import its code (each stack starts in its own tree); this checkout's import this one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import finish_results, start_stack, stop_stack
import sampling
from sampling import bench_weight_sync, compare, make_prompts, stack_runner

ROOT = Path(__file__).resolve().parent.parent


def start(data_dir: Path, code: Path, threads: int, base_model: str):
    """`openrl up` whose processes import openrl from `code` (started there: `python -m` puts
    the working directory first on sys.path, before PYTHONPATH)."""
    return start_stack(data_dir, "--threads", str(threads), "--samplers", "1", "--base-model", base_model, cwd=code)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="another checkout of openrl (its root folder)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sync-reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each stack's sampler")
    p.add_argument("--base-model", default=sampling.BASE_MODEL,
                   help="the stacks' base model (a name in the HF cache); the default model is built if it is not there")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "sampler_versions.json"))
    args = p.parse_args()
    started = time.perf_counter()
    baseline = Path(args.baseline).resolve()
    if not (baseline / "openrl" / "__init__.py").exists():
        raise SystemExit(f"--baseline {baseline}: no openrl package there")

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TINKER_TELEMETRY"] = "0"
    from transformers import AutoTokenizer

    from openrl.default_model import resolve_model_path

    sampling.BASE_MODEL = args.base_model  # what stack_runner and bench_weight_sync sample
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.base_model))
    prompts = make_prompts(tokenizer, args.prompts)
    expected = args.prompts * args.samples * args.max_tokens
    print(f"workload: {args.prompts} prompts x {args.samples} samples x {args.max_tokens} tokens = {expected} tokens per rep; "
          f"{args.threads} torch thread(s) per sampler; baseline {baseline}", flush=True)  # fmt: skip
    results: dict = {"machine": {"cpus": len(os.sched_getaffinity(0)), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}}
    with tempfile.TemporaryDirectory(prefix="openrl-bench-versions-") as tmp:
        stacks = {}
        try:
            stacks["baseline"] = start(Path(tmp) / "baseline", baseline, args.threads, args.base_model)
            stacks["this"] = start(Path(tmp) / "this", ROOT, args.threads, args.base_model)
            runners = {name: stack_runner(url, prompts, args.samples, args.max_tokens) for name, (_, url) in stacks.items()}
            results.update(compare(runners, "this", "baseline", args.reps, args.warmup, expected))
            for _, url in stacks.values():  # untimed: each stack's first training client and adapter load
                bench_weight_sync(url, tokenizer, prompts[0], 1, 8)
            for name, (_, url) in stacks.items():
                results[f"weight_sync_{name}"] = w = bench_weight_sync(url, tokenizer, prompts[0], args.sync_reps, 8)
                print(f"weight sync, {name}: p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms ({w['reps']} reps)", flush=True)
            sync = [results[f"weight_sync_{n}"]["p50_ms"] for n in ("this", "baseline")]
            results["weight_sync_p50_ratio"] = round(float(np.divide(*sync)), 3)
        finally:
            for proc, _ in stacks.values():
                stop_stack(proc)
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()
