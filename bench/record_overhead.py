"""Recording overhead: SFT training throughput with and without `openrl record --subjects 'openrl.>'`
attached to the same stack, in one run, alternating rounds (target: with / without >= 0.95).

One `openrl up` (one trainer, no sampler), one LoRA model (rank 8, 8 rows x 128 tokens per
forward_backward). Each round runs `--steps` steps (forward_backward + optim_step, submitted
back to back and awaited); "with" rounds start `openrl record` first (it is subscribed
before the round starts: its `recording` log line) and stop it (SIGTERM) after, checking the
file holds the round's messages. The order alternates (without, with, with, without, ...) so
drift (caches, the machine's other load) falls on both sides.

    python bench/record_overhead.py [--rounds 6] [--steps 10] [--out bench/results/record_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from common import API_KEY, start_stack, stop_stack, write_results

BASE_MODEL = "openrl/tiny-qwen3"


def start_recorder(nats_url: str, out: Path, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "openrl", "record", "--subjects", "openrl.>", "--out", str(out), "--nats-url", nats_url],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 30
    while not re.search(rb"\brecording\b", log_path.read_bytes()):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"openrl record did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return proc


def stop_recorder(proc: subprocess.Popen, log_path: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    m = re.search(r"\brecorded\b.*?messages\W+(\d+)", log_path.read_text())
    if m:
        return int(m.group(1))
    sys.exit(f"openrl record did not finish:\n{log_path.read_text()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6, help="rounds of each kind")
    p.add_argument("--steps", type=int, default=10, help="SFT steps per round")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "record_overhead.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tinker

    work = Path(tempfile.mkdtemp(prefix="openrl-record-overhead-"))
    proc, url = start_stack(work / "stack", "--samplers", "0")
    nats_url = json.loads((work / "stack" / "run" / "stack.json").read_text())["nats_url"]
    os.environ["OPENRL_NATS_CREDS"] = str(work / "stack" / "nats-credentials.json")  # openrl record connects as the operator
    try:
        service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0).result()
        rng = np.random.default_rng(0)
        batch = []
        for _ in range(8):
            toks = rng.integers(10, 800, 129).tolist()
            batch.append(tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(toks[:-1]),
                                            loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * 128}))  # fmt: skip

        def steps(n: int) -> float:
            started = time.perf_counter()
            for _ in range(n):
                fb = tc.forward_backward(batch, "cross_entropy")
                opt = tc.optim_step(tinker.types.AdamParams(learning_rate=1e-4))
                fb.result()
                opt.result()
            return n / (time.perf_counter() - started)

        steps(3)  # warm-up
        rates = {"without": [], "with": []}
        recorded = []
        order = [k for i in range(args.rounds) for k in (("without", "with") if i % 2 == 0 else ("with", "without"))]
        for i, kind in enumerate(order):
            if kind == "with":
                out, log_path = work / f"round-{i}.orlrec", work / f"record-{i}.log"
                rec = start_recorder(nats_url, out, log_path)
                rates[kind].append(steps(args.steps))
                messages = stop_recorder(rec, log_path)
                assert messages >= 2 * args.steps, f"the recording holds {messages} messages for {args.steps} steps"
                recorded.append({"messages": messages, "bytes": out.stat().st_size})
            else:
                rates[kind].append(steps(args.steps))
            print(f"round {i + 1}/{len(order)} {kind:<8} {rates[kind][-1]:.2f} steps/s", flush=True)
    finally:
        stop_stack(proc)
    without, with_ = float(np.median(rates["without"])), float(np.median(rates["with"]))
    res = {
        "date": datetime.now().isoformat(timespec="seconds"), "rounds": args.rounds, "steps_per_round": args.steps,
        "batch": "8 x 128 tokens, rank 8", "steps_per_s_without": round(without, 3), "steps_per_s_with": round(with_, 3),
        "ratio": round(with_ / without, 3), "rates": rates, "recorded": recorded,
    }  # fmt: skip
    print(f"\nSFT steps/s without openrl record: {without:.2f}, with: {with_:.2f}; ratio {with_ / without:.3f} (target >= 0.95)")
    print(f"each recorded round: ~{int(np.median([r['messages'] for r in recorded]))} messages, ~{int(np.median([r['bytes'] for r in recorded])) // 1024} KiB")
    write_results(args.out, res)


if __name__ == "__main__":
    main()
