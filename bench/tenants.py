"""What sharing one base model among LoRA tenants costs, in process on the trainer's LoraEngine.

1. Multi-tenant throughput: training tokens per second of forward_backward + optim_step for
   one tenant with a batch of B sequences x L tokens per round, against N tenants (8 by
   default) in one engine, each with B/N of those sequences per round, served round-robin
   (fb + step of each tenant in turn): the same tokens per round. The ratio N-tenant /
   1-tenant is the figure to compare across machines (the target is >= 0.8).
2. Tenant switch cost: the time of a small forward_backward on tenant A when the request
   before it was also A's, against when it was B's (the engine then re-activates A's
   adapter); also peft's `set_adapter` alone. Medians, in ms.

Both sides of each comparison alternate repetition by repetition and report medians, so a
noisy machine affects both alike. Runs on the default model (openrl/tiny-qwen3, built on
first use), on CUDA when available, else CPU.

    python bench/tenants.py [--batch 32] [--length 256] [--tenants 8] [--rounds 20] [--quick]
                            [--out bench/results/tenants.json]

Prints the figures and writes them as JSON. The defaults take about a minute on 2 idle CPU
cores. On a machine that is busy with something else, pass --threads 1: torch's threads
wait on each other and every figure gets many times slower and noisier.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from common import fb_message, write_results

ROOT = Path(__file__).resolve().parent.parent


def make_engine(model_path: str, device: str, model_ids: list[str], rank: int):
    from openrl.bus.messages import LoraSpec
    from openrl.trainer.engine import LoraEngine

    engine = LoraEngine(model_path, device=device)
    for i, m in enumerate(model_ids):
        engine.create(m, LoraSpec(rank=rank, seed=i))
    return engine


def bench_throughput(model_path: str, device: str, args, vocab: int) -> tuple[dict, object]:
    """Rounds of B x L tokens: one tenant with all B sequences vs N tenants with B/N each."""
    from openrl.bus.messages import AdamParams

    adam = AdamParams(learning_rate=1e-4)
    per_tenant = args.batch // args.tenants
    ids = [f"tenant-{i}" for i in range(args.tenants)]
    single = make_engine(model_path, device, ["solo"], args.rank)
    multi = make_engine(model_path, device, ids, args.rank)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, vocab, size=(args.batch, args.length + 1)) for _ in range(args.rounds + args.warmup)]
    single_msgs = [fb_message("solo", b) for b in batches]
    multi_msgs = [[fb_message(m, b[i * per_tenant : (i + 1) * per_tenant]) for i, m in enumerate(ids)] for b in batches]

    def single_round(r: int) -> float:
        t0 = time.perf_counter()
        single.forward_backward(single_msgs[r])
        single.optim_step("solo", adam)
        return time.perf_counter() - t0

    def multi_round(r: int) -> float:
        t0 = time.perf_counter()
        for m, msg in zip(ids, multi_msgs[r]):
            multi.forward_backward(msg)
            multi.optim_step(m, adam)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"one": [], "many": []}
    for r in range(args.rounds + args.warmup):
        # Alternate which side goes first, so neither always follows the other.
        sides = [("one", single_round), ("many", multi_round)]
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            t = fn(r)
            if r >= args.warmup:
                times[name].append(t)
    tokens = per_tenant * args.tenants * args.length
    out = {}
    for name, ts in times.items():
        med = float(np.median(ts))
        out[name] = {
            "rounds": len(ts),
            "round_s_median": round(med, 4),
            "round_s_min": round(min(ts), 4),
            "tokens_per_s": round(tokens / med, 1),
        }
    out["ratio"] = round(out["one"]["round_s_median"] / out["many"]["round_s_median"], 3)
    out["tokens_per_round"] = tokens
    return out, multi


def bench_switch(engine, vocab: int, args) -> dict:
    """Small forward_backward on A after A vs after B; and peft set_adapter alone."""
    rng = np.random.default_rng(1)
    a, b = engine.model_ids()[:2]
    msg = {m: fb_message(m, rng.integers(0, vocab, size=(1, args.switch_length + 1))) for m in (a, b)}

    def timed_fb(m: str) -> float:
        t0 = time.perf_counter()
        engine.forward_backward(msg[m])
        return time.perf_counter() - t0

    same, switch = [], []
    for rep in range(args.switch_reps + 3):
        # Gradients accumulate throughout (no optim_step): every timed call adds into .grad alike.
        pair = [("same", a), ("switch", b)]
        for kind, before in pair if rep % 2 == 0 else pair[::-1]:
            engine.forward_backward(msg[before])
            t = timed_fb(a)
            if rep >= 3:
                (same if kind == "same" else switch).append(t)

    # peft's set_adapter alone: what the engine runs on a switch (it walks every module).
    adapters = [engine._tenant(m).adapter for m in (a, b)]
    set_times = []
    for i in range(args.switch_reps * 2):
        t0 = time.perf_counter()
        engine.peft.set_adapter(adapters[i % 2])
        set_times.append(time.perf_counter() - t0)
    engine._active = adapters[(args.switch_reps * 2 - 1) % 2]  # keep the engine's note of it true

    def ms(x: list[float]) -> float:
        return round(float(np.median(x)) * 1000, 3)

    return {
        "reps": len(same),
        "tokens": args.switch_length,
        "tenants_in_engine": len(engine.model_ids()),
        "same_tenant_ms": ms(same),
        "after_other_tenant_ms": ms(switch),
        "switch_cost_ms": round(ms(switch) - ms(same), 3),
        "set_adapter_ms": ms(set_times),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="sequences per round (B), split evenly among the tenants")
    p.add_argument("--length", type=int, default=256, help="tokens per sequence (L)")
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank of every tenant (all modules targeted)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--switch-reps", type=int, default=60, help="timed calls per side of the switch comparison")
    p.add_argument("--switch-length", type=int, default=16, help="tokens of the small forward_backward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: the trainer's choice)")
    p.add_argument("--quick", action="store_true", help="a tiny run to check that it works")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "tenants.json"))
    args = p.parse_args()
    if args.quick:
        args.batch, args.length, args.rounds, args.warmup, args.switch_reps = 8, 32, 3, 1, 10
    if args.batch % args.tenants:
        p.error(f"--batch {args.batch} must be a multiple of --tenants {args.tenants}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import structlog
    import torch

    from openrl.default_model import ensure_default_model
    from openrl.base_model import pick_device

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet the engine's info logs
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    device = args.device or pick_device()
    model_path = str(ensure_default_model())
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_path).vocab_size

    results: dict = {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "torch_threads": threads,
            "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        }
    }
    t0 = time.perf_counter()
    results["throughput"], multi = bench_throughput(model_path, device, args, vocab)
    tp = results["throughput"]
    per = args.batch // args.tenants
    print(f"1 tenant, {args.batch} x {args.length} tokens per round: {tp['one']['tokens_per_s']} tokens/s "
          f"(round {tp['one']['round_s_median'] * 1000:.1f} ms)", flush=True)  # fmt: skip
    print(f"{args.tenants} tenants, {per} x {args.length} each, round-robin: {tp['many']['tokens_per_s']} tokens/s "
          f"(round {tp['many']['round_s_median'] * 1000:.1f} ms)", flush=True)  # fmt: skip
    print(f"{args.tenants}-tenant / 1-tenant = {tp['ratio']:.3f} (target >= 0.8)", flush=True)
    results["switch"] = bench_switch(multi, vocab, args)
    sw = results["switch"]
    print(f"forward_backward of {sw['tokens']} tokens on A ({sw['tenants_in_engine']} tenants in the engine): "
          f"after A {sw['same_tenant_ms']} ms, after B {sw['after_other_tenant_ms']} ms; "
          f"switch cost {sw['switch_cost_ms']} ms (peft set_adapter alone {sw['set_adapter_ms']} ms)", flush=True)  # fmt: skip
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    write_results(args.out, results, f" ({results['seconds']} s)")


if __name__ == "__main__":
    main()
