"""RL pipeline benchmark: steps per second and worker busy fractions for 1, 2 and 3 concurrent
RL jobs, (a) the plain sequential Tinker loop against (b) the asynchronous pipeline
(`openrl.recipes.async_grpo`, max staleness 1), in one run on one `openrl up` stack.

    .venv/bin/python bench/rl_pipeline.py            # writes bench/results/rl_pipeline.json
    .venv/bin/python bench/rl_pipeline.py --quick    # fewer steps, 1 and 3 jobs

Each group's reward costs about 200 ms of CPU: the stack runs this file's `burn_exact_match`
as the rewarder `burn` (`openrl up --rewarder burn=bench.rl_pipeline:burn_exact_match`),
which spins for `burn_ms` of CPU time per item (200 / group_size) and then scores exact
match. The task is the toy "Say the other word" task of `openrl demo --rl`.

Busy fraction, from the workers' heartbeats (KV `openrl-workers`): trainers and samplers
report busy seconds since start (busy_fraction x uptime), so a phase's fraction is the
difference over the phase; rewarders report their fraction over the last 30 s, read at
the end of the phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REWARD_MS_PER_GROUP = 200.0


def burn_exact_match(prompt: str, completion: str, reference: dict) -> float:
    """Exact match after spinning `reference["burn_ms"]` of CPU time (a stand-in for a costly
    reward: a verifier, a compiler, a judge). Needs no openrl import, like any user's."""
    deadline = time.process_time() + reference["burn_ms"] / 1000
    x = 0
    while time.process_time() < deadline:
        x += 1
    want = {w.strip().lower() for w in reference["answers"]}
    return float(completion.strip().lower() in want)


def operator_options() -> dict:
    """nats.connect arguments for the stack's operator (its credentials file, OPENRL_NATS_CREDS)."""
    from openrl.bus import auth

    return auth.connect_options("operator", auth.load(Path(os.environ["OPENRL_NATS_CREDS"]), "operator"))


async def worker_snapshot(nats_url: str) -> dict[str, dict]:
    """worker id -> kind, busy seconds so far (trainers, samplers), busy fraction, heartbeat time."""
    import nats

    from openrl.bus.client import kv_keys
    from openrl.bus.messages import WorkerInfo, decode
    from openrl.bus.subjects import WORKERS_BUCKET

    nc = await nats.connect(nats_url, **operator_options())
    try:
        js = nc.jetstream()
        kv = await js.key_value(WORKERS_BUCKET)
        out = {}
        for key in await kv_keys(js, kv):
            try:
                w = decode((await kv.get(key)).value, WorkerInfo)
            except Exception:  # expired between keys() and get()
                continue
            out[w.worker_id] = {"kind": w.kind, "busy_s": w.busy_fraction * (w.heartbeat_at - w.started_at), "at": w.heartbeat_at,
                                "busy_fraction": w.busy_fraction, "reward_name": w.reward_name}  # fmt: skip
        return out
    finally:
        await nc.close()


async def reward_backlog(nats_url: str, reward_name: str) -> int:
    """Score requests of `reward_name` waiting or being scored."""
    import nats

    from openrl.bus import subjects

    nc = await nats.connect(nats_url, **operator_options())
    try:
        info = await nc.jetstream().consumer_info(subjects.REWARD_STREAM, subjects.rewarder_consumer(reward_name))
        return info.num_pending + info.num_ack_pending
    finally:
        await nc.close()


def drain(nats_url: str, reward_name: str, timeout_s: float = 120) -> None:
    """Wait for the rewarders to finish what earlier phases left (an async run's last
    look-ahead groups), so that no phase pays for another's rewards."""
    deadline = time.monotonic() + timeout_s
    while asyncio.run(reward_backlog(nats_url, reward_name)) and time.monotonic() < deadline:
        time.sleep(0.5)


def busy_between(before: dict, after: dict, reward_name: str) -> dict[str, float]:
    """Busy fraction per worker over the phase (trainers, samplers) or its last 30 s (the rewarder)."""
    out = {}
    for wid, w in sorted(after.items()):
        if w["kind"] == "rewarder":
            if w["reward_name"] == reward_name:
                out[wid] = round(w["busy_fraction"], 3)
        elif wid in before and w["at"] > before[wid]["at"]:
            out[wid] = round((w["busy_s"] - before[wid]["busy_s"]) / (w["at"] - before[wid]["at"]), 3)
    return out


def run_phase(mode: str, jobs: int, url: str, nats_url: str, steps: int, group_size: int, groups_per_step: int,
              reward_concurrency: int) -> dict:  # fmt: skip
    from openrl.recipes.async_grpo import Config, Task, say_word_tasks, train, train_sequential

    burn_ms = REWARD_MS_PER_GROUP / group_size
    cfgs = [
        Config(base_url=url, api_key=API_KEY, reward_name="burn", steps=steps, groups_per_step=groups_per_step, group_size=group_size,
               max_staleness=1, seed=j, name=f"{mode}-{jobs}-{j}", progress=False)
        for j in range(jobs)
    ]  # fmt: skip
    tasks = [[Task(t.prompt, {**t.reference, "burn_ms": burn_ms}) for t in say_word_tasks(128, seed=c.seed)] for c in cfgs]
    drain(nats_url, "burn")
    time.sleep(2.5)  # a fresh heartbeat of every worker before the phase
    before = asyncio.run(worker_snapshot(nats_url))
    started = time.monotonic()
    if mode == "sequential":
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(train_sequential, cfgs, tasks))
    else:

        async def all_jobs():
            return await asyncio.gather(*(train(c, t) for c, t in zip(cfgs, tasks)))

        results = asyncio.run(all_jobs())
    wall = time.monotonic() - started
    time.sleep(2.5)
    after = asyncio.run(worker_snapshot(nats_url))
    busy = busy_between(before, after, "burn")
    kinds = {wid: after[wid]["kind"] for wid in busy}
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None  # noqa: E731
    return {
        "mode": mode,
        "jobs": jobs,
        "steps_per_job": steps,
        "wall_s": round(wall, 2),
        "steps_per_s": round(jobs * steps / wall, 3),
        "busy": busy,
        "busy_trainer": mean([b for wid, b in busy.items() if kinds[wid] == "trainer"]),
        "busy_samplers": mean([b for wid, b in busy.items() if kinds[wid] == "sampler"]),
        "busy_rewarder_30s": mean([b for wid, b in busy.items() if kinds[wid] == "rewarder"]),
        # Reward-call seconds of the groups trained on, over the phase and the pool's processes:
        # a lower bound (look-ahead groups dropped or cut off at the end are not counted).
        "busy_rewarder": round(sum(x["time/reward_s"] for r in results for x in r) / (wall * reward_concurrency), 3),
        "reward_first": round(sum(r[0]["reward/mean"] for r in results) / jobs, 3),
        "reward_last": round(sum(r[-1]["reward/mean"] for r in results) / jobs, 3),
        "staleness_max": max(max(x["staleness/max"] for x in r) for r in results),
        "groups_dropped": sum(sum(x.get("groups/dropped", 0) for x in r) for r in results),
        "groups_launched": sum(r[-1].get("groups/launched", steps * groups_per_step) for r in results),
    }


API_KEY = "tml-bench-key-0000000000"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="RL steps per job")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--jobs", default="1,2,3")
    p.add_argument("--samplers", type=int, default=1)
    p.add_argument("--reward-concurrency", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="4 steps per job, 1 and 3 jobs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rl_pipeline.json")
    args = p.parse_args()
    if args.quick:
        args.steps, args.jobs = 4, "1,3"
    sys.path.insert(0, str(ROOT))
    from bench.common import API_KEY as STACK_KEY, start_stack, stop_stack

    assert STACK_KEY == API_KEY
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # the rewarder imports this file
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    data_dir = Path(tempfile.mkdtemp(prefix="openrl-bench-rl-"))
    proc, url = start_stack(data_dir, "--threads", "1", "--samplers", str(args.samplers), "--reward-concurrency", str(args.reward_concurrency),
                            "--rewarder", "burn=bench.rl_pipeline:burn_exact_match")  # fmt: skip
    nats_url = json.loads((data_dir / "run" / "stack.json").read_text())["nats_url"]
    os.environ["OPENRL_NATS_CREDS"] = str(data_dir / "nats-credentials.json")  # the stack's bus enforces its roles
    rows = []
    try:
        deadline = time.monotonic() + 60  # the burn rewarder announces itself by heartbeat
        while not any(w["reward_name"] == "burn" for w in asyncio.run(worker_snapshot(nats_url)).values()):
            if time.monotonic() > deadline:
                sys.exit(f"the burn rewarder did not start; see {data_dir}/logs")
            time.sleep(0.5)
        run_phase("async", 1, url, nats_url, 2, args.group_size, args.groups_per_step, args.reward_concurrency)  # warm-up: tokenizer, adapters, code paths
        for jobs in (int(j) for j in args.jobs.split(",")):
            for mode in ("sequential", "async"):
                row = run_phase(mode, jobs, url, nats_url, args.steps, args.group_size, args.groups_per_step, args.reward_concurrency)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        stop_stack(proc)
    by = {(r["mode"], r["jobs"]): r for r in rows}
    print(f"\n{'jobs':>4} {'mode':>10} {'steps/s':>8} {'speedup':>8} {'trainer':>8} {'samplers':>8} {'rewarder':>8}  reward first>last")
    for r in rows:
        seq = by.get(("sequential", r["jobs"]))
        speedup = r["steps_per_s"] / seq["steps_per_s"] if seq else float("nan")
        r["speedup_vs_sequential"] = round(speedup, 3)
        print(f"{r['jobs']:>4} {r['mode']:>10} {r['steps_per_s']:>8.3f} {speedup:>8.2f} {r['busy_trainer']:>8} {r['busy_samplers']:>8} "
              f"{r['busy_rewarder']:>8}  {r['reward_first']:.2f}>{r['reward_last']:.2f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    facts = {"cpus": os.cpu_count(), "reward_ms_per_group": REWARD_MS_PER_GROUP, "group_size": args.group_size,
             "groups_per_step": args.groups_per_step, "samplers": args.samplers, "reward_concurrency": args.reward_concurrency}  # fmt: skip
    args.out.write_text(json.dumps({"config": facts, "rows": rows, "at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
