"""What the stack costs on top of the math, measured against a baseline in the same run.

1. Per-request overhead: latency of a request that does no model work (an `optim_step`
   with no accumulated gradients: the trainer's AdamW skips every parameter), through the
   whole path SDK -> gateway -> JetStream -> trainer -> KV future -> gateway -> SDK:
   p50/p99 one at a time, then requests per second with 32 concurrent clients.
2. Stack overhead ratio: SFT steps per second (forward_backward + optim_step on 8 x 256
   tokens of the default model) through the stack, divided by the same steps in a bare
   in-process torch + peft loop on identical batches. Both run here, one after the other,
   with the same torch thread count; the ratio is what to compare across machines.

    python bench/stack_overhead.py [--steps 20] [--requests 300] [--out bench/results/stack_overhead.json]

Prints the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import API_KEY, fb_message, start_stack, stop_stack, write_results

BASE_MODEL = "openrl/tiny-qwen3"
ROOT = Path(__file__).resolve().parent.parent


def percentile_ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)) * 1000, 2)


def bench_noop_latency(url: str, n: int) -> dict:
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=8).result()
    adam = tinker.types.AdamParams(learning_rate=1e-4)
    for _ in range(10):  # warm the connection pool and the trainer's tenant
        tc.optim_step(adam).result()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        tc.optim_step(adam).result()
        samples.append(time.perf_counter() - t0)
    return {"n": n, "p50_ms": percentile_ms(samples, 50), "p99_ms": percentile_ms(samples, 99), "mean_ms": round(float(np.mean(samples)) * 1000, 2)}


def bench_concurrent(url: str, clients: int, seconds: float) -> dict:
    """`clients` threads, each its own SDK client and model, each one request at a time."""
    import tinker

    adam = tinker.types.AdamParams(learning_rate=1e-4)
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    tcs = [service.create_lora_training_client(base_model=BASE_MODEL, rank=8).result() for _ in range(clients)]
    for tc in tcs:
        tc.optim_step(adam).result()
    counts = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        start.wait()
        while time.perf_counter() < deadline[0]:
            t0 = time.perf_counter()
            tcs[i].optim_step(adam).result()
            latencies[i].append(time.perf_counter() - t0)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    flat = [x for lat in latencies for x in lat]
    return {
        "clients": clients,
        "requests": sum(counts),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(sum(counts) / elapsed, 1),
        "p50_ms": percentile_ms(flat, 50),
        "p99_ms": percentile_ms(flat, 99),
    }


def make_batches(vocab: int, n_batches: int, batch: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=(batch, length + 1)) for _ in range(n_batches)]


def stack_stepper(url: str, batches: list[np.ndarray], *, as_lists: bool = False):
    """SFT steps through the SDK. Loss inputs are numpy-backed TensorData (what
    tinker-cookbook builds); `as_lists` passes plain Python lists, which the SDK converts
    on every call, to show what that costs the client."""
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=32, seed=0).result()
    adam = tinker.types.AdamParams(learning_rate=1e-4)

    def inputs(row: np.ndarray) -> dict:
        targets, weights = row[1:].astype(np.int64), np.ones(len(row) - 1, dtype=np.float32)
        if as_lists:
            return {"target_tokens": targets.tolist(), "weights": weights.tolist()}
        return {"target_tokens": tinker.types.TensorData.from_numpy(targets), "weights": tinker.types.TensorData.from_numpy(weights)}

    datums = [
        [tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(row[:-1].tolist()), loss_fn_inputs=inputs(row)) for row in b]
        for b in batches
    ]

    def step(i: int) -> float:
        t0 = time.perf_counter()
        fb = tc.forward_backward(datums[i], loss_fn="cross_entropy")
        opt = tc.optim_step(adam)
        fb.result()
        opt.result()
        return time.perf_counter() - t0

    return step


def engine_stepper(model_path: str, batches: list[np.ndarray]):
    """The trainer's own LoraEngine, in process, fed the bus messages the gateway would build."""
    from openrl.bus.messages import AdamParams, LoraSpec
    from openrl.trainer.engine import LoraEngine

    engine = LoraEngine(model_path, device="cpu")
    engine.create("m", LoraSpec(rank=32, seed=0))

    messages = [fb_message("m", b) for b in batches]

    def step(i: int) -> float:
        t0 = time.perf_counter()
        engine.forward_backward(messages[i])
        engine.optim_step("m", AdamParams(learning_rate=1e-4))
        return time.perf_counter() - t0

    return step


def bare_stepper(model_path: str, batches: list[np.ndarray]):
    """The baseline: a plain peft + torch loop, no service, same batches and LoRA config."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from openrl.trainer.engine import LORA_ALPHA

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=LORA_ALPHA, target_modules=targets)).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    def step(i: int) -> float:
        t0 = time.perf_counter()
        ids = torch.from_numpy(batches[i])
        logits = model(input_ids=ids[:, :-1]).logits
        lp = -F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        loss = -lp.sum()
        loss.backward()
        _ = lp.detach().numpy(), loss.item()  # the results a client gets back
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def interleaved(steppers: dict, n: int, warmup: int) -> dict:
    """One step of each in turn, n times: every side sees the same machine conditions."""
    times = {name: [] for name in steppers}
    for i in range(n + warmup):
        for name, step in steppers.items():
            t = step(i)
            if i >= warmup:
                times[name].append(t)
    return {
        name: {"steps": len(ts), "step_s_median": round(float(np.median(ts)), 4), "steps_per_s": round(1 / float(np.median(ts)), 3)}
        for name, ts in times.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed SFT steps per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--requests", type=int, default=300, help="sequential no-op requests for p50/p99")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="duration of the concurrent run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: all cores)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "stack_overhead.json"))
    args = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    import torch

    from openrl.default_model import ensure_default_model

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model_path = str(ensure_default_model())
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    batches = make_batches(vocab, args.steps + args.warmup, args.batch, args.length)

    results: dict = {"machine": {"cpus": len(os.sched_getaffinity(0)), "torch_threads": threads, "cuda": torch.cuda.is_available()}}
    with tempfile.TemporaryDirectory(prefix="openrl-bench-") as tmp:
        proc, url = start_stack(Path(tmp), "--threads", str(threads))
        try:
            results["noop_request"] = bench_noop_latency(url, args.requests)
            print(f"no-op request, sequential: p50 {results['noop_request']['p50_ms']} ms, p99 {results['noop_request']['p99_ms']} ms", flush=True)
            results["noop_concurrent"] = bench_concurrent(url, args.clients, args.seconds)
            c = results["noop_concurrent"]
            print(f"no-op request, {c['clients']} concurrent clients: {c['requests_per_s']} req/s (p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms)", flush=True)
            steppers = {
                "bare_sft": bare_stepper(model_path, batches),
                "engine_sft": engine_stepper(model_path, batches),
                "stack_sft": stack_stepper(url, batches),
                "stack_sft_lists": stack_stepper(url, batches, as_lists=True),
            }
            results.update(interleaved(steppers, args.steps, args.warmup))
        finally:
            stop_stack(proc)
    for name, what in [
        ("bare_sft", "bare torch + peft loop"),
        ("engine_sft", "the trainer's engine, in process"),
        ("stack_sft", "through the stack (SDK, numpy inputs)"),
        ("stack_sft_lists", "through the stack (SDK, list inputs)"),
    ]:
        print(f"SFT {what}: {results[name]['steps_per_s']} steps/s", flush=True)
    bare, stack = results["bare_sft"]["step_s_median"], results["stack_sft"]["step_s_median"]
    results["ratio"] = round(bare / stack, 3)
    results["ratio_lists"] = round(bare / results["stack_sft_lists"]["step_s_median"], 3)
    results["ms_per_step"] = {
        "bare": round(bare * 1000, 1),
        "engine_over_bare": round((results["engine_sft"]["step_s_median"] - bare) * 1000, 1),
        "service_over_engine": round((stack - results["engine_sft"]["step_s_median"]) * 1000, 1),
        "two_noop_requests": round(2 * results["noop_request"]["p50_ms"], 1),
    }
    results["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    print(f"stack / bare = {results['ratio']:.3f} (target >= 0.90); with list inputs {results['ratio_lists']:.3f}", flush=True)
    print(f"ms per step: {results['ms_per_step']}", flush=True)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
