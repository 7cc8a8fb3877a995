"""The transformers engine's running KV cache with room (openrl/sampler/hf_cache.py) against the
copies it replaced, in one run, alternating, same code (the Scheduler's `kv_room` and
`kv_row_room` switches):
- "room": room for columns and for rows (decode steps, joins and leaves in place);
- "columns": room for columns only (a decode step in place; each join and leave copies the
  cache);
- "copy": no room, a copy of the whole cache every decode step, as transformers' own
  `DynamicLayer` (its `update` concatenates), and at each join and leave.

Each case: a random model saved locally (the default model's shape, the wide Qwen3 of
lora_slots.py, and `kv_heavy`), the `Scheduler` in this process over
`TransformersSampler`, requests of 4 samples of a 64-token prompt, no stop:
- "batch": all requests at once, `rows` rows generating `max_tokens` each;
- "stream": a request arriving every 8 steps, each generating `max_tokens` (so about
  4 x max_tokens / 8 rows run at once), `rows` rows in all: a join and a leave every 8 steps.
Seconds per run, generated tokens/s, the ratios to "room", and whether all sides drew the same
tokens.

    HF_HOME=~/.cache/openrl-tests/hf python bench/kv_cache.py [--reps 3] [--threads 1] [--models kv_heavy] [--out bench/results/kv_cache.json]

Prints the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import finish_results, machine
from lora_slots import configs

ROOT = Path(__file__).resolve().parent.parent
CASES = (  # model, workload, rows, max_tokens
    ("default_shape", "batch", 64, 448),
    ("default_shape", "batch", 16, 448),
    ("default_shape", "stream", 256, 128),
    ("wide_qwen3", "batch", 32, 448),
    ("kv_heavy", "stream", 256, 128),
)
SIDES = {"room": (True, True), "columns": (True, False), "copy": (False, False)}  # kv_room, kv_row_room
PROMPT = 64
EVERY = 8  # steps between arrivals, in the stream workload


def kv_heavy():
    """A Qwen3 whose KV cache weighs as much against its weights as a large model's does at a
    long context (16 KV heads x 64 on a hidden of 256): a step's time goes to the cache."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=16, num_key_value_heads=16, head_dim=64)  # fmt: skip


def run_once(sampler, workload: str, rows: int, max_tokens: int, vocab: int, side: str):
    import numpy as np

    from openrl.bus.messages import SamplingParams
    from openrl.sampler.hf_batching import Scheduler
    from openrl.sampler.spec import SampleSpec

    rng = np.random.default_rng(0)
    scheduler = Scheduler(sampler)
    scheduler.kv_room, scheduler.kv_row_room = SIDES[side]
    scheduler.reserve_rows = 0  # one key: every row runs at once, none kept free for another key
    specs = [
        SampleSpec(prompt=rng.integers(4, vocab, PROMPT).tolist(), num_samples=4,
                   params=SamplingParams(max_tokens=max_tokens, seed=i, stop_at_eos=False))
        for i in range(rows // 4)
    ]  # fmt: skip
    arrivals = {0: list(enumerate(specs))} if workload == "batch" else {EVERY * i: [(i, spec)] for i, spec in enumerate(specs)}
    results, step = {}, 0
    t = time.perf_counter()
    while step <= max(arrivals) or not scheduler.idle:
        for i, spec in arrivals.get(step, []):
            scheduler.add(i, spec)
        results.update(scheduler.step())
        step += 1
    return time.perf_counter() - t, [results[k] for k in sorted(results)]


def bench_case(name: str, config, workload: str, rows: int, max_tokens: int, reps: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from openrl.sampler.hf_model import TransformersSampler

    times: dict[str, list[float]] = {side: [] for side in SIDES}
    outs = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        sampler = TransformersSampler(tmp, device="cpu", dtype=torch.float32, max_batch_rows=max(rows, 4))
        run_once(sampler, "batch", 4, 8, config.vocab_size, "room")  # warm-up
        for rep in range(reps):
            for side in SIDES if rep % 2 == 0 else reversed(SIDES):
                s, outs[side] = run_once(sampler, workload, rows, max_tokens, config.vocab_size, side)
                times[side].append(s)
            print(f"{name} {workload} {rows} rows: rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {side: statistics.median(v) for side, v in times.items()}
    tokens = rows * max_tokens

    def same(a, b) -> bool:
        return all(np.array_equal(x.tokens, y.tokens) for p, q in zip(a, b, strict=True) for x, y in zip(p.sequences, q.sequences, strict=True))

    out = {
        "model": name, "workload": workload, "rows": rows, "prompt_tokens": PROMPT, "max_tokens": max_tokens,
        **{f"{side}_tokens_per_s": round(tokens / med[side], 1) for side in SIDES},
        "columns_over_room": round(med["columns"] / med["room"], 3), "copy_over_room": round(med["copy"] / med["room"], 3),
        "seconds": {side: [round(x, 3) for x in v] for side, v in times.items()},
        "same_tokens": same(outs["room"], outs["columns"]) and same(outs["room"], outs["copy"]),
    }  # fmt: skip
    print(out, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script")
    p.add_argument("--models", default="", help="only the cases of these models (comma-separated; default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv_cache.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"machine": machine(), "cases": []}
    cfgs = {**configs(), "kv_heavy": kv_heavy()}
    for name, workload, rows, max_tokens in CASES:
        if args.models and name not in args.models.split(","):
            continue
        if args.quick:
            rows, max_tokens = 8, 24
        results["cases"].append(bench_case(name, cfgs[name], workload, rows, max_tokens, 1 if args.quick else args.reps))
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()
