"""The transformers engine's running KV cache with room (openrl/sampler/hf_cache.py) against a
copy of the whole cache per decode step (transformers' DynamicLayer concatenates; here the
same RoomLayer with no room, `Scheduler.kv_room = False`), in one run, alternating.

Each case: a random model saved locally, the `Scheduler` in this process over
`TransformersSampler`, `--rows` rows (requests of 4 samples) of a `--prompt`-token prompt
generating `--max-tokens` each (no stop), run to the end; seconds per run, decode tokens/s, the
ratio (copy per step / room), and whether both sides drew the same tokens.

    HF_HOME=~/.cache/openrl-tests/hf python bench/kv_cache.py [--reps 3] [--threads 1] [--out bench/results/kv_cache.json]

Prints the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from common import finish_results
from lora_slots import configs

CASES = (  # model, rows, prompt tokens, max_tokens
    ("default_shape", 64, 64, 448),
    ("default_shape", 16, 64, 448),
    ("wide_qwen3", 32, 64, 448),
)


def run_once(sampler, rows: int, prompt: int, max_tokens: int, vocab: int, room: bool):
    import numpy as np

    from openrl.bus.messages import SamplingParams
    from openrl.sampler.hf_batching import Scheduler
    from openrl.sampler.spec import SampleSpec

    rng = np.random.default_rng(0)
    scheduler = Scheduler(sampler)
    scheduler.kv_room = room
    scheduler.reserve_rows = 0  # one key: every row runs at once, none kept free for another key
    for i in range(rows // 4):
        params = SamplingParams(max_tokens=max_tokens, seed=i, stop_at_eos=False)
        scheduler.add(i, SampleSpec(prompt=rng.integers(4, vocab, prompt).tolist(), num_samples=4, params=params))
    results, steps = {}, 0
    t = time.perf_counter()
    while not scheduler.idle:
        results.update(scheduler.step())
        steps += 1
    return time.perf_counter() - t, steps, [results[k] for k in sorted(results)]


def bench_case(name: str, config, rows: int, prompt: int, max_tokens: int, reps: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from openrl.sampler.hf_model import TransformersSampler

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        sampler = TransformersSampler(tmp, device="cpu", dtype=torch.float32, max_batch_rows=rows)
        run_once(sampler, 4, prompt, 8, config.vocab_size, True)  # warm-up
        room_s, copy_s = [], []
        for rep in range(reps):
            s, steps, room_out = run_once(sampler, rows, prompt, max_tokens, config.vocab_size, True)
            room_s.append(s)
            s, _, copy_out = run_once(sampler, rows, prompt, max_tokens, config.vocab_size, False)
            copy_s.append(s)
            print(f"{name} {rows} rows: rep {rep}: room {room_s[-1]:.2f} s, copy per step {copy_s[-1]:.2f} s", flush=True)
    pairs = [(a, b) for x, y in zip(room_out, copy_out, strict=True) for a, b in zip(x.sequences, y.sequences, strict=True)]
    tokens = rows * max_tokens
    room, copy = statistics.median(room_s), statistics.median(copy_s)
    out = {
        "model": name, "rows": rows, "prompt_tokens": prompt, "max_tokens": max_tokens, "steps": steps,
        "room_tokens_per_s": round(tokens / room, 1), "copy_tokens_per_s": round(tokens / copy, 1),
        "copy_over_room": round(copy / room, 3), "room_s": [round(x, 3) for x in room_s], "copy_s": [round(x, 3) for x in copy_s],
        "same_tokens": all(np.array_equal(a.tokens, b.tokens) for a, b in pairs),
        "max_logprob_diff": max(float(np.abs(a.logprobs - b.logprobs).max()) for a, b in pairs),
    }  # fmt: skip
    print(out, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv_cache.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"machine": {"loadavg_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}, "cases": []}
    cfgs = configs()
    for name, rows, prompt, max_tokens in CASES[:1] if args.quick else CASES:
        if args.quick:
            rows, prompt, max_tokens = 8, 8, 24
        results["cases"].append(bench_case(name, cfgs[name], rows, prompt, max_tokens, 1 if args.quick else args.reps))
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()
