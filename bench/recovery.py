"""Recovery time after `kill -9` of the trainer, against the requests since the model's last snapshot.

The trainer stores a model's full state every `--snapshot-every` requests (at an optim_step);
a restarted trainer loads the newest snapshot and replays only the train-stream log after it
(`TrainerService._hydrate`). For each point a fresh `openrl up` (one trainer, no sampler) is
started; one LoRA model (rank 16 on the default model) runs K SFT steps (forward_backward +
optim_step, 2 requests each, on a fixed batch); then the trainer gets SIGKILL and the clock
runs until the next `forward_backward(...).result()` returns: supervisor restart, process
start and base-model load, hydrate (snapshot import + log replay), the request itself.
The restarted trainer's `model_loaded` log event gives the hydrate part separately.

Two series: "no snapshot" (`--snapshot-every` 1000000: everything since creation is
replayed) and "snapshots" (`--snapshot-every` 16 by default: at most about one interval).

    python bench/recovery.py [--steps 4 16 64] [--quick] [--out bench/results/recovery.json]

Prints the figures and writes them as JSON.

What dominates (2-core CPU machine): the restarted trainer is ready about 4.5 s after the kill
and hydrates in well under a second, but a request sent right after the kill is first handed
to the dead trainer's still-open JetStream pull request (`fetch(timeout=1.0)`), so it is
redelivered only after the consumer's ack_wait (30 s): recovery is ~30 s + hydrate. With
`--after-ready` the request goes out once the new trainer logs `trainer_ready`, and recovery
is restart + load + hydrate. `kill->loaded s` in the table shows where the time went.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from common import API_KEY, start_stack, stop_stack, write_results

BASE_MODEL = "openrl/tiny-qwen3"
ROOT = Path(__file__).resolve().parent.parent
NO_SNAPSHOT = 1_000_000


def log_events(path: Path, offset: int = 0) -> list[dict]:
    """The JSON lines of a log from byte `offset` on (anything else, e.g. tracebacks, skipped)."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    events = []
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events


def event_time(ev: dict) -> float:
    return datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()


def wait_for_event(path: Path, pred, timeout_s: float, offset: int = 0) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for ev in log_events(path, offset):
            if pred(ev):
                return ev
        time.sleep(0.05)
    return None


def make_datums(vocab: int, batch: int, length: int, seed: int = 0) -> list:
    import tinker

    rng = np.random.default_rng(seed)
    rows = rng.integers(0, vocab, size=(batch, length + 1))
    return [
        tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={
                "target_tokens": tinker.types.TensorData.from_numpy(row[1:].astype(np.int64)),
                "weights": tinker.types.TensorData.from_numpy(np.ones(length, dtype=np.float32)),
            },
        )
        for row in rows
    ]


def measure_point(args: argparse.Namespace, steps: int, snapshot_every: int, datums: list) -> dict:
    """One fresh stack: K steps, kill -9 of the trainer, time to the next forward_backward."""
    import tinker

    with tempfile.TemporaryDirectory(prefix="openrl-bench-recovery-") as tmp:
        data_dir = Path(tmp)
        proc, url = start_stack(
            data_dir, "--threads", str(args.threads), "--samplers", str(args.samplers), "--snapshot-every", str(snapshot_every)
        )
        trainer_log = data_dir / "logs" / "trainer.log"
        try:
            service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
            tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=args.rank, seed=0).result()
            model_id = tc.model_id
            adam = tinker.types.AdamParams(learning_rate=1e-4)
            step_s = []
            for _ in range(steps):
                t0 = time.perf_counter()
                fb = tc.forward_backward(datums, loss_fn="cross_entropy")
                opt = tc.optim_step(adam)
                fb.result()
                opt.result()
                step_s.append(time.perf_counter() - t0)
            requests = 2 * steps  # the model's seq ids 1..requests
            # A snapshot is stored after its optim_step's result is out: wait for the one this
            # interval implies, or the kill could land before it and replay more than intended.
            expected_snap = (requests // snapshot_every) * snapshot_every if snapshot_every <= requests else 0
            if expected_snap:
                ev = wait_for_event(
                    trainer_log,
                    lambda e: e.get("event") == "snapshot_saved" and e.get("model_id") == model_id and e.get("seq_id") == expected_snap,
                    30,
                )
                if ev is None:
                    print(f"  warning: no snapshot_saved for seq {expected_snap} within 30 s", flush=True)
            snaps = [e["seq_id"] for e in log_events(trainer_log) if e.get("event") == "snapshot_saved" and e.get("model_id") == model_id]
            last_snap = max(snaps, default=0)

            pid_file = data_dir / "run" / "trainer.pid"
            old_pid = int(pid_file.read_text())
            offset = trainer_log.stat().st_size
            t_kill = time.time()
            t0 = time.perf_counter()
            os.kill(old_pid, signal.SIGKILL)
            if args.after_ready:  # send only once the restarted trainer is fetching
                if wait_for_event(trainer_log, lambda e: e.get("event") == "trainer_ready", 120, offset) is None:
                    print("  warning: no trainer_ready within 120 s of the kill", flush=True)
            tc.forward_backward(datums, loss_fn="cross_entropy").result()
            recovery_s = time.perf_counter() - t0
            # One more step completes the run and shows the restarted trainer serves at speed.
            t1 = time.perf_counter()
            tc.optim_step(adam).result()
            after_s = time.perf_counter() - t1

            loaded = wait_for_event(trainer_log, lambda e: e.get("event") == "model_loaded" and e.get("model_id") == model_id, 10, offset)
            ready = wait_for_event(trainer_log, lambda e: e.get("event") == "trainer_ready", 1, offset)
            new_pid = int(pid_file.read_text())
            try:  # stops the session's heartbeats, which would complain once the stack is gone
                service.close("success").result(timeout=30)
            except Exception as e:
                print(f"  warning: closing the SDK session failed: {e!r}", flush=True)
        finally:
            stop_stack(proc)
    point = {
        "snapshot_every": snapshot_every,
        "steps": steps,
        "requests": requests,
        "last_snapshot_seq": last_snap,
        "requests_since_snapshot": requests - last_snap,
        "step_s_median": round(float(np.median(step_s)), 4),
        "recovery_s": round(recovery_s, 3),
        "next_optim_step_s": round(after_s, 4),
        "trainer_restarted": new_pid != old_pid,
        "after_ready": args.after_ready,
    }
    if ready is not None:
        point["kill_to_trainer_ready_s"] = round(event_time(ready) - t_kill, 3)
    if loaded is not None:
        point["model_loaded"] = {k: loaded.get(k) for k in ("snapshot", "replayed", "finished", "seconds")}
        point["hydrate_s"] = loaded.get("seconds")
        point["replayed"] = loaded.get("replayed")
        point["kill_to_model_loaded_s"] = round(event_time(loaded) - t_kill, 3)
    return point


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 16, 64], help="SFT steps before the kill (2 requests each)")
    p.add_argument("--quick", action="store_true", help="steps 2 and 8 only")
    p.add_argument("--snapshot-every", type=int, default=16, help="interval of the 'snapshots' series, in requests")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer (openrl up --threads)")
    p.add_argument("--samplers", type=int, default=0, help="sampler processes (none are needed)")
    p.add_argument("--after-ready", action="store_true",
                   help="send the request after the kill only once the restarted trainer logs trainer_ready "
                        "(a request sent at once waits for JetStream's 30 s ack_wait: see the module docstring)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery.json"))
    args = p.parse_args()
    if args.quick:
        args.steps = [2, 8]

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TINKER_TELEMETRY"] = "0"
    from transformers import AutoConfig

    from openrl.default_model import ensure_default_model

    vocab = AutoConfig.from_pretrained(str(ensure_default_model())).vocab_size
    datums = make_datums(vocab, args.batch, args.length)

    series = {"no_snapshot": NO_SNAPSHOT, "snapshots": args.snapshot_every}
    results: dict = {"machine": {"cpus": len(os.sched_getaffinity(0))}, "series": {}}
    started = time.monotonic()
    for name, every in series.items():
        results["series"][name] = []
        for k in args.steps:
            pt = measure_point(args, k, every, datums)
            results["series"][name].append(pt)
            print(
                f"{name} (snapshot every {every}): {k} steps, {pt['requests_since_snapshot']} requests since snapshot "
                f"(replayed {pt.get('replayed')}): recovery {pt['recovery_s']} s, hydrate {pt.get('hydrate_s')} s",
                flush=True,
            )
    results["config"] = {k: v for k, v in vars(args).items() if k != "out"}
    results["seconds"] = round(time.monotonic() - started, 1)

    header = ["series", "steps", "since snapshot (reqs)", "replayed", "recovery s", "kill->ready s", "kill->loaded s", "hydrate s", "step s"]
    rows = [
        [f"{name} ({every if every != NO_SNAPSHOT else 'never'})", pt["steps"], pt["requests_since_snapshot"], pt.get("replayed", "?"),
         pt["recovery_s"], pt.get("kill_to_trainer_ready_s", "?"), pt.get("kill_to_model_loaded_s", "?"), pt.get("hydrate_s", "?"),
         pt["step_s_median"]]
        for name, every in series.items() for pt in results["series"][name]
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print()
    for row in [header, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)), flush=True)
    print("\n'replayed' counts the request sent after the kill too (it is in the log when the model loads).")
    write_results(args.out, results, f" ({results['seconds']} s)")


if __name__ == "__main__":
    main()
