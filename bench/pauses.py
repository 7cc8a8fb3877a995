"""What pausing inside a pass costs, and how long another key waits (trainer/pauses.py), in process.

One long forward_backward (by default the hostile benchmark's: 4 datums of 2046 tokens, two
micro-batches of two) on the default model, run two ways on one LoraEngine each, alternating
repetition by repetition:
- whole: `preempt_slice_ms=0`, each micro-batch one uninterrupted pass (what another key's call
  waits for, at most: the longest micro-batch);
- paused: the default slice (50 ms), through `forward_backward_steps`, the caller resuming it at
  once (nothing runs between): the same work plus every hand-over between the threads.

Prints the medians, the paused/whole time ratio (the overhead), and the longest stretch the
paused pass held the caller's thread without yielding (what another key's call waits for, at
most, on an otherwise idle machine), against the whole run's longest micro-batch. Writes JSON.

    python bench/pauses.py [--rows 4] [--length 2046] [--reps 5] [--slice-ms 50] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from common import fb_message, finish_results

ROOT = Path(__file__).resolve().parent.parent


def timed_steps(engine, msg) -> tuple[float, list[float]]:
    """(seconds for the whole request, the seconds of each stretch between two yields)."""
    steps = engine.forward_backward_steps(msg)
    start = last = time.perf_counter()
    gaps = []
    while True:
        try:
            next(steps)
        except StopIteration:
            now = time.perf_counter()
            gaps.append(now - last)
            return now - start, gaps
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=2046, help="tokens per datum")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side")
    p.add_argument("--slice-ms", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the stack's trainer runs with 1 under `openrl up --threads 1`)")
    p.add_argument("--quick", action="store_true", help="a tiny run to check that it works")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "pauses.json"))
    args = p.parse_args()
    if args.quick:
        args.rows, args.length, args.reps = 2, 300, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import structlog
    import torch

    from openrl.bus.messages import LoraSpec
    from openrl.default_model import ensure_default_model
    from openrl.trainer.engine import LoraEngine

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    path = str(ensure_default_model())
    whole, paused = LoraEngine(path, device="cpu", preempt_slice_ms=0), LoraEngine(path, device="cpu", preempt_slice_ms=args.slice_ms)
    for e in (whole, paused):
        e.create("m", LoraSpec(rank=32, seed=0))
    vocab = whole.info.vocab_size
    msg = fb_message("m", np.random.default_rng(0).integers(0, vocab, size=(args.rows, args.length + 1)))
    timed_steps(whole, msg), timed_steps(paused, msg)  # warm-up
    runs: dict[str, list] = {"whole": [], "paused": []}
    for _ in range(args.reps):
        for name, engine in (("whole", whole), ("paused", paused)):
            runs[name].append(timed_steps(engine, msg))
    med = {k: float(np.median([t for t, _ in v])) for k, v in runs.items()}
    longest = {k: max(max(g) for _, g in v) for k, v in runs.items()}
    stretches = [x for _, g in runs["paused"] for x in g]
    results = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "torch_threads": args.threads},
        "request": {"rows": args.rows, "length": args.length, "microbatch_tokens": whole.microbatch_tokens},
        "whole_s_median": round(med["whole"], 3),
        "paused_s_median": round(med["paused"], 3),
        "overhead_ratio": round(med["paused"] / med["whole"], 3),
        "pauses_per_request": round(len(stretches) / args.reps, 1),
        "longest_hold_s": {"whole (longest micro-batch)": round(longest["whole"], 3), "paused": round(longest["paused"], 3)},
        "paused_hold_ms_p50": round(1000 * float(np.median(stretches)), 1),
    }
    print(f"{args.rows} x {args.length} tokens, forward_backward, {args.threads} thread(s): whole {med['whole']:.3f} s, "
          f"paused {med['paused']:.3f} s (ratio {results['overhead_ratio']}), {results['pauses_per_request']} pauses a request")  # fmt: skip
    print(f"longest hold of the caller's thread: whole {longest['whole'] * 1000:.0f} ms (a micro-batch), "
          f"paused {longest['paused'] * 1000:.0f} ms (p50 {results['paused_hold_ms_p50']} ms; slice {args.slice_ms} ms)")  # fmt: skip
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()
