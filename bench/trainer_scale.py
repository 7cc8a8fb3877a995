"""What a trainer request costs in memory and time as it grows, on CPU, on a Qwen3 with the real
151,936-token vocabulary (random init, small layers, built here offline; no tokenizer).

1. Memory: peak RSS of one `forward_backward` (importance_sampling, datums of 1,024 tokens)
   of 2k, 16k and 64k tokens through the trainer's LoraEngine with its defaults (micro-batches
   under a token budget, logprobs in chunks of positions). Each size runs in a fresh
   subprocess, so ru_maxrss is that request's peak; the RSS after loading the model, creating
   the tenant and building the request is the baseline. The target: the 64k peak <= 1.5 x the
   2k peak. The old one-shot path (one padded forward, whole-vocabulary fp32 logits) runs at
   2k; larger one-shot runs only where an estimate from the 2k one says it fits in half the
   free memory (64k would need tokens x vocab x 4 bytes, ~40 GB, for the logits alone).
2. Speed: micro-batched vs one-shot forward_backward + optim_step where both fit, in one
   process, alternating repetition by repetition: on this model at 2k tokens (one micro-batch,
   so the cost of chunked logprobs alone), and on the default model's shapes (vocab 1,024,
   random init) at 8k tokens (two micro-batches, no chunking: the cost of micro-batching
   alone). tokens/s of both and micro / one-shot (the target is >= 0.95), also as the median
   of back-to-back pairs and in CPU seconds, which other work on the machine disturbs less.
3. 2 ranks vs 1 on CPU: a placeholder for the trainer group on torch.distributed (skipped by
   default; see bench_ranks).

    python bench/trainer_scale.py [--sizes 2048,16384,65536] [--reps 7] [--sections memory,speed]
                                  [--quick] [--out bench/results/trainer_scale.json]

Prints the figures and writes them as JSON, with the load average before and after (the
machine may be shared). Runs on 1 torch thread unless --threads says otherwise: on a busy
machine torch's threads wait on each other and every figure gets slower and noisier. --quick
runs small sizes only, to check that it works.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import finish_results

ROOT = Path(__file__).resolve().parent.parent
QWEN3_VOCAB = 151_936
DATUM_TOKENS = 1024
# What the engine did before micro-batching: one padded forward, whole-vocabulary logits.
ONE_SHOT = dict(microbatch_tokens=10**9, logits_chunk_bytes=2**50)
MIB = 2**20
# openrl/tiny-qwen3's vocabulary, width and depth (the default model), random init here.
DEFAULT_SHAPES = dict(vocab=1024, hidden=192, layers=4)


def build_model(path: Path, *, vocab: int, hidden: int, layers: int, seed: int = 0) -> dict:
    """A random-init Qwen3 saved with save_pretrained; returns its shape and parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    heads = max(1, hidden // 32)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return {"vocab": vocab, "hidden": hidden, "layers": layers, "params": sum(p.numel() for p in model.parameters())}


def rl_message(model_id: str, n_datums: int, vocab: int, seed: int = 0):
    """An importance_sampling forward_backward of `n_datums` random datums of DATUM_TOKENS
    tokens: sampler logprobs near a random-init model's own (-log vocab), so ratios stay near
    1, and one advantage per datum, as GRPO gives."""
    from openrl.bus.messages import Datum, ForwardBackward, Tensor

    rng = np.random.default_rng(seed)
    n = DATUM_TOKENS

    def tensor(arr: np.ndarray) -> Tensor:
        dtype = "int64" if arr.dtype.kind == "i" else "float32"
        return Tensor(dtype=dtype, data=arr.astype("<i8" if dtype == "int64" else "<f4").tobytes(), shape=[len(arr)])

    data = []
    for _ in range(n_datums):
        row = rng.integers(0, vocab, n + 1)
        inputs = {
            "target_tokens": tensor(row[1:]),
            "logprobs": tensor(-math.log(vocab) + rng.normal(0, 0.1, n)),
            "advantages": tensor(np.full(n, rng.normal())),
        }
        data.append(Datum(tokens=row[:-1].astype("<i4").tobytes(), loss_fn_inputs=inputs))
    return ForwardBackward(request_id="r", model_id=model_id, seq_id=1, loss_fn="importance_sampling", data=data)


def quiet_logs() -> None:
    import structlog
    from transformers.utils import logging as hf_logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # the engine's info logs
    hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"


# ---------------------------------------------------------------------- 1. memory


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_child(argv: list[str]) -> None:
    """In a fresh process: load, create a tenant, build the request, then one forward_backward;
    prints the RSS figures as one JSON line."""
    model_path, mode, tokens, threads = argv[0], argv[1], int(argv[2]), int(argv[3])
    import gc

    import torch

    torch.set_num_threads(threads)
    quiet_logs()
    from openrl.bus.messages import LoraSpec
    from openrl.trainer.engine import LoraEngine

    engine = LoraEngine(model_path, device="cpu", **(ONE_SHOT if mode == "one_shot" else {}))
    engine.create("m", LoraSpec(rank=32, seed=0))
    msg = rl_message("m", tokens // DATUM_TOKENS, engine.info.vocab_size)
    gc.collect()
    baseline, load_peak = rss_mb(), peak_rss_mb()
    t0 = time.perf_counter()
    result = engine.forward_backward(msg)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(json.dumps({
        "mode": mode, "tokens": tokens, "datums": len(msg.data),
        "microbatch_tokens": engine.microbatch_tokens, "logits_chunk_rows": engine._chunk_rows,
        "baseline_mb": round(baseline, 1), "load_peak_mb": round(load_peak, 1), "peak_mb": round(peak, 1),
        "request_mb": round(peak - baseline, 1),
        # ru_maxrss never goes down: if loading peaked higher than the request, the request's
        # own peak is hidden (it is at most peak_mb).
        "peak_is_request": peak > load_peak,
        "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
        "loss_sum": result.metrics["loss:sum"],
    }), flush=True)  # fmt: skip


def run_child(model_path: str, mode: str, tokens: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "_measure", model_path, mode, str(tokens), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"mode": mode, "tokens": tokens, "failed": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 1024


def bench_memory(model_path: str, vocab: int, sizes: list[int], threads: int) -> dict:
    runs = []

    def run(mode: str, tokens: int) -> dict:
        r = run_child(model_path, mode, tokens, threads)
        runs.append(r)
        if "failed" in r:
            print(f"  {mode} {tokens} tokens: FAILED {r['failed'][-300:]}", flush=True)
        else:
            print(f"  {mode:>8} {tokens:>6} tokens: peak {r['peak_mb']:7.0f} MB (baseline {r['baseline_mb']:.0f} MB, "
                  f"request +{r['request_mb']:.0f} MB), {r['seconds']} s, {r['tokens_per_s']} tokens/s", flush=True)  # fmt: skip
        return r

    print("memory: peak RSS of one forward_backward, fresh process each", flush=True)
    micro = {t: run("micro", t) for t in sizes}
    out: dict = {"datum_tokens": DATUM_TOKENS, "loss_fn": "importance_sampling", "runs": runs}
    small, large = min(sizes), max(sizes)
    if "failed" not in micro[small] and "failed" not in micro[large]:
        out["peak_ratio"] = round(micro[large]["peak_mb"] / micro[small]["peak_mb"], 3)
        out["request_ratio"] = round(micro[large]["request_mb"] / max(micro[small]["request_mb"], 1.0), 3)
        out["peak_ratio_of"] = f"{large} / {small} tokens"
        out["target"] = "peak_ratio <= 1.5"

    # One shot: whole-vocabulary fp32 logits, several (tokens, vocab) tensors alive at once.
    out["one_shot_logits_gb"] = {t: round(t * vocab * 4 / 1e9, 1) for t in sizes}
    one = run("one_shot", small)
    skipped = {}
    if "failed" not in one:
        per_token_mb = one["request_mb"] / small
        for t in sizes:
            if t == small:
                continue
            estimate = one["baseline_mb"] + per_token_mb * t
            room = mem_available_mb() / 2
            if estimate > room:
                skipped[t] = (f"one-shot at {t} tokens needs about {estimate / 1024:.0f} GiB (scaled from {small} tokens: "
                              f"{per_token_mb:.2f} MB per token; fp32 logits alone {t * vocab * 4 / 1e9:.1f} GB); "
                              f"half the free memory is {room / 1024:.1f} GiB")  # fmt: skip
                print(f"  one_shot {t:>6} tokens: skipped: {skipped[t]}", flush=True)
            else:
                run("one_shot", t)
    out["one_shot_skipped"] = skipped
    return out


# ---------------------------------------------------------------------- 2. speed


def bench_speed(model_path: str, vocab: int, tokens: int, reps: int, warmup: int) -> dict:
    """forward_backward + optim_step of the same request on two engines, micro-batched (the
    defaults) and one-shot, alternating which goes first."""
    from openrl.bus.messages import AdamParams, LoraSpec
    from openrl.trainer.engine import LoraEngine

    adam = AdamParams(learning_rate=1e-4)
    engines = {"micro": LoraEngine(model_path, device="cpu"), "one_shot": LoraEngine(model_path, device="cpu", **ONE_SHOT)}
    for engine in engines.values():
        engine.create("m", LoraSpec(rank=32, seed=0))
    msg = rl_message("m", tokens // DATUM_TOKENS, vocab)
    times: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}  # (user, sys) seconds
    for rep in range(warmup + reps):
        order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
        for name in order:
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            engines[name].forward_backward(msg)
            engines[name].optim_step("m", adam)
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            if rep >= warmup:
                times[name].append(t1 - t0)
                cpu[name].append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime))
    micro = engines["micro"]
    out: dict = {
        "tokens": tokens, "vocab": vocab, "reps": reps,
        "micro_batches": -(-tokens // micro.microbatch_tokens),
        "logits_chunks": -(-min(tokens, micro.microbatch_tokens) // micro._chunk_rows),
    }  # fmt: skip
    for name, ts in times.items():
        med = float(np.median(ts))
        user_s, sys_s = np.median(np.array(cpu[name]), axis=0)
        out[name] = {
            "step_s_median": round(med, 4), "step_s_min": round(min(ts), 4), "tokens_per_s": round(tokens / med, 1),
            # CPU seconds per step, which other work on the machine disturbs less than wall time.
            # sys: mostly page faults, as glibc gives every tensor over 32 MB fresh pages.
            "cpu_user_s_median": round(float(user_s), 4), "cpu_sys_s_median": round(float(sys_s), 4),
        }  # fmt: skip
    out["ratio"] = round(out["one_shot"]["step_s_median"] / out["micro"]["step_s_median"], 3)
    # Per repetition (the two sides ran back to back), then the median: steadier on a busy machine.
    out["ratio_paired_median"] = round(float(np.median(np.array(times["one_shot"]) / np.array(times["micro"]))), 3)
    cpu_s = {name: float(np.median([u + s for u, s in cpu[name]])) for name in engines}
    out["ratio_cpu"] = round(cpu_s["one_shot"] / cpu_s["micro"], 3)
    return out


# ---------------------------------------------------------------------- 3. 2 ranks vs 1 (CPU)


def ranks_child(argv: list[str]) -> None:
    """Under torchrun: a trainer group of WORLD_SIZE CPU ranks (FSDP2 over gloo) times the
    request; rank 0 writes its step times, loss and logprobs to `out`."""
    model_path, tokens, vocab, reps, warmup, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]), argv[5]
    import torch

    from openrl.bus.messages import LoraSpec
    from openrl.trainer import group as groups
    from openrl.trainer.engine import LoraEngine

    quiet_logs()
    torch.set_num_threads(1)
    cfg = groups.GroupConfig(collective_timeout_s=600)
    rank = groups.init_rank(cfg, "cpu")
    engine = LoraEngine(model_path, device="cpu", sharded=True)
    if rank.rank != 0:
        groups.follow(engine)
        return
    group = groups.GroupEngine(engine, cfg)
    group.create("m", LoraSpec(rank=32, seed=0))
    result = time_steps(group, rl_message("m", tokens // DATUM_TOKENS, vocab), reps, warmup)
    result["peak_rss_mb_rank0"] = round(peak_rss_mb(), 1)
    Path(out).write_text(json.dumps(result))
    group.stop()


def time_steps(engine, msg, reps: int, warmup: int) -> dict:
    """forward_backward + optim_step of `msg`, `warmup + reps` times: step times, and the first
    step's loss and logprobs (to compare two engines' numbers)."""
    from openrl.bus.messages import AdamParams

    adam = AdamParams(learning_rate=1e-4)
    times, first = [], None
    for rep in range(warmup + reps):
        t0 = time.perf_counter()
        res = engine.forward_backward(msg)
        engine.optim_step("m", adam)
        if rep >= warmup:
            times.append(time.perf_counter() - t0)
        if first is None:
            first = {"loss": res.metrics["loss:sum"], "logprobs": [a.tolist() for a in res.logprobs]}
    return {"step_s": times, "first": first}


def bench_ranks(model_path: str, vocab: int, tokens: int, reps: int, warmup: int) -> dict:
    """The same request on a trainer group of 2 CPU ranks (1 torch thread each, under torchrun)
    and on a single engine with 2 threads: tokens/s of both, their ratio, and how far the
    group's loss and logprobs are from the single engine's (fp32)."""
    from openrl.bus.messages import LoraSpec
    from openrl.trainer.engine import LoraEngine

    import torch

    with tempfile.TemporaryDirectory(prefix="openrl-ranks-") as tmp:
        out = Path(tmp) / "group.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", __file__, "_ranks",
               model_path, str(tokens), str(vocab), str(reps), str(warmup), str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            return {"failed": proc.stderr[-2000:]}
        group = json.loads(out.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = LoraEngine(model_path, device="cpu")
        engine.create("m", LoraSpec(rank=32, seed=0))
        single = time_steps(engine, rl_message("m", tokens // DATUM_TOKENS, vocab), reps, warmup)
    finally:
        torch.set_num_threads(threads)
    g_lp = np.concatenate([np.asarray(a, dtype=np.float64) for a in group["first"]["logprobs"]])
    s_lp = np.concatenate([np.asarray(a, dtype=np.float64) for a in single["first"]["logprobs"]])
    med = {name: float(np.median(r["step_s"])) for name, r in (("two_ranks", group), ("one_rank", single))}
    return {
        "tokens": tokens, "vocab": vocab, "reps": reps,
        "two_ranks": {"step_s_median": round(med["two_ranks"], 4), "tokens_per_s": round(tokens / med["two_ranks"], 1),
                      "threads_per_rank": 1, "peak_rss_mb_rank0": group["peak_rss_mb_rank0"]},
        "one_rank": {"step_s_median": round(med["one_rank"], 4), "tokens_per_s": round(tokens / med["one_rank"], 1), "threads": 2},
        "ratio": round(med["one_rank"] / med["two_ranks"], 3),
        "agreement": {
            "loss_rel_diff": abs(group["first"]["loss"] - single["first"]["loss"]) / max(abs(single["first"]["loss"]), 1e-12),
            "logprob_max_abs_diff": float(np.abs(g_lp - s_lp).max()),
        },
        "note": "2 ranks share the same 2 cores as 1 rank with 2 threads: no speedup is possible here",
    }  # fmt: skip


# ---------------------------------------------------------------------- main


def report_memory(mem: dict) -> dict:
    if "peak_ratio" in mem:
        print(f"peak {mem['peak_ratio_of']}: {mem['peak_ratio']} (target <= 1.5); "
              f"request above baseline: {mem['request_ratio']}", flush=True)  # fmt: skip
    big = 65536
    mem["one_shot_64k_logits_gb"] = round(big * QWEN3_VOCAB * 4 / 1e9, 1)
    print(f"one-shot at {big} tokens is not run: its fp32 logits alone are {big} x {QWEN3_VOCAB} x 4 B = "
          f"{mem['one_shot_64k_logits_gb']} GB", flush=True)  # fmt: skip
    return mem


def report_speed(speed: dict) -> None:
    for name, s in speed.items():
        print(f"  {name}: {s['tokens']} tokens ({s['micro_batches']} micro-batches, {s['logits_chunks']} logits chunks "
              f"each): micro {s['micro']['tokens_per_s']} tokens/s, one-shot {s['one_shot']['tokens_per_s']} tokens/s, "
              f"micro / one-shot = {s['ratio']} (target >= 0.95; paired {s['ratio_paired_median']}, "
              f"CPU time {s['ratio_cpu']})", flush=True)  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["_measure"]:
        return measure_child(sys.argv[2:])
    if sys.argv[1:2] == ["_ranks"]:
        return ranks_child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2048,16384,65536", help="request sizes in tokens (multiples of 1024)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the real-vocabulary model")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--speed-tokens", type=int, default=2048, help="request size of the real-vocabulary speed comparison")
    p.add_argument("--speed-tokens-default", type=int, default=8192, help="request size on the default model's shapes")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per side of each speed comparison")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ranks-tokens", type=int, default=8192, help="request size of 2 ranks vs 1 (default model's shapes)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: all cores); 1 by default, as on a shared machine more threads wait on each other")
    p.add_argument("--sections", default="memory,speed,ranks", help="which of memory, speed, ranks to run")
    p.add_argument("--quick", action="store_true", help="small sizes only, to check that it works")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "trainer_scale.json"))
    args = p.parse_args()
    if args.quick:
        args.sizes, args.speed_tokens, args.speed_tokens_default, args.reps, args.ranks_tokens = "1024,4096", 1024, 2048, 2, 2048
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if any(s % DATUM_TOKENS for s in sizes):
        p.error(f"--sizes must be multiples of {DATUM_TOKENS}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    quiet_logs()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    started = time.perf_counter()
    results: dict = {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)), "torch_threads": threads,
            "mem_total_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            # glibc's allocator settings, if any: they decide whether big tensors are fresh mmaps
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        },
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="openrl-trainer-scale-") as tmp:
        real, tiny = Path(tmp) / "real-vocab", Path(tmp) / "default-shapes"
        results["model"] = build_model(real, vocab=QWEN3_VOCAB, hidden=args.hidden, layers=args.layers)
        tiny_info = build_model(tiny, **DEFAULT_SHAPES)
        print(f"model: random-init Qwen3, vocab {QWEN3_VOCAB}, hidden {args.hidden}, {args.layers} layers, "
              f"{results['model']['params'] / 1e6:.1f}M parameters; {threads} torch threads", flush=True)  # fmt: skip

        if "memory" in args.sections:
            results["memory"] = report_memory(bench_memory(str(real), QWEN3_VOCAB, sizes, threads))
        if "speed" in args.sections:
            print("speed: micro-batched vs one-shot, forward_backward + optim_step, alternating", flush=True)
            results["speed"] = {
                "real_vocab": bench_speed(str(real), QWEN3_VOCAB, args.speed_tokens, args.reps, args.warmup),
                "default_shapes": {
                    "model": tiny_info,
                    **bench_speed(str(tiny), DEFAULT_SHAPES["vocab"], args.speed_tokens_default, args.reps, args.warmup),
                },
            }
            report_speed(results["speed"])
        if "ranks" in args.sections:
            print("ranks: a trainer group of 2 CPU ranks vs 1 rank with 2 threads, same request", flush=True)
            ranks = bench_ranks(str(tiny), DEFAULT_SHAPES["vocab"], args.ranks_tokens, args.reps, args.warmup)
            results["ranks"] = ranks
            if "failed" in ranks:
                print(f"  failed: {ranks['failed']}", flush=True)
            else:
                print(f"  2 ranks {ranks['two_ranks']['tokens_per_s']} tokens/s, 1 rank {ranks['one_rank']['tokens_per_s']} "
                      f"tokens/s, ratio {ranks['ratio']} (2 shared cores: no speedup possible); agreement: loss "
                      f"{ranks['agreement']['loss_rel_diff']:.1e} relative, logprobs {ranks['agreement']['logprob_max_abs_diff']:.1e} "
                      "max abs", flush=True)  # fmt: skip

    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()
