"""What a reward request costs the rewarder's process and its workers (openrl/rewarder/pool.py).

One request of N quick items (`exact_match`, the hostile benchmark's 4,096), scored by one pool
two ways, alternating repetition by repetition:
- per item: one `Pool.score` per item, gathered: one task, one frame and one pipe round trip
  per item (how the rewarder scored a request before chunks, with today's hand-out of workers);
- chunked: `Pool.score_many`, what the rewarder does now: each worker gets a chunk of items
  per frame and sends each result back as it is done.

Prints the medians (wall seconds, CPU-seconds of the rewarder's process and of its workers)
and the per-item/chunked ratios of the totals. Also the latency of a 1-item request sent while a large one
runs (a worker hand-over per chunk, against the whole large request). Writes JSON.

    python bench/rewards.py [--items 4096] [--workers 2] [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import numpy as np

from common import finish_results

ROOT = Path(__file__).resolve().parent.parent


def cpu_of(pids: list[int]) -> float:
    """CPU-seconds (user + system) of live processes, from /proc."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def measure(pool, score, items) -> dict:
    pids = pool.pids()
    wall, own, workers = time.perf_counter(), time.process_time(), cpu_of(pids)
    scores = await score(items)
    assert len(scores) == len(items) and all(s.error is None for s in scores), "a score failed"
    if pool.pids() != pids:
        raise RuntimeError("a worker was replaced during the run")
    return {"wall_s": time.perf_counter() - wall, "rewarder_cpu_s": time.process_time() - own, "workers_cpu_s": cpu_of(pids) - workers}


async def small_while_large(pool, score, items, small) -> float:
    """Seconds a 1-item request takes while `items` are being scored."""
    large = asyncio.ensure_future(score(items))
    await asyncio.sleep(0.005)
    start = time.perf_counter()
    await score([small])
    took = time.perf_counter() - start
    await large
    return took


async def run(args) -> dict:
    from openrl.bus.messages import ScoreItem
    from openrl.rewarder.pool import Pool

    pool = Pool("openrl.rewarder.builtin:exact_match", "bench", args.workers, timeout_s=30)
    await pool.start()
    try:
        items = [ScoreItem(completion="a" * 64, reference=b'"b"')] * args.items
        ways = {
            "per_item": lambda xs: asyncio.gather(*(pool.score(x) for x in xs)),
            "chunked": pool.score_many,
        }
        for score in ways.values():  # warm-up
            await measure(pool, score, items)
        runs: dict[str, list[dict]] = {k: [] for k in ways}
        waits: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.reps):
            for name, score in ways.items():
                runs[name].append(await measure(pool, score, items))
                waits[name].append(await small_while_large(pool, score, items, items[0]))
    finally:
        await pool.close()
    med = {k: {f: float(np.median([r[f] for r in v])) for f in v[0]} for k, v in runs.items()}
    # Ratios of the totals over all repetitions: /proc counts CPU in ticks of 10 ms, too coarse for
    # one chunked run's workers; a total under 3 ticks gives no ratio (null).
    total = {k: {f: sum(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
    return {
        "median": {k: {f: round(x, 4) for f, x in v.items()} for k, v in med.items()},
        "per_item_over_chunked": {f: round(total["per_item"][f] / total["chunked"][f], 2) if total["chunked"][f] >= 0.03 else None
                                  for f in total["chunked"]},  # fmt: skip
        "small_request_s_median": {k: round(float(np.median(v)), 4) for k, v in waits.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side")
    p.add_argument("--quick", action="store_true", help="a tiny run to check that it works")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rewards.json"))
    args = p.parse_args()
    if args.quick:
        args.items, args.reps = 256, 2
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    started = time.perf_counter()
    results = {"machine": {"cpus": len(os.sched_getaffinity(0))}, **asyncio.run(run(args))}
    for name, m in results["median"].items():
        print(f"{name:9s} {args.items} items: {m['wall_s']:.3f} s wall, rewarder {m['rewarder_cpu_s']:.3f} CPU-s, "
              f"workers {m['workers_cpu_s']:.3f} CPU-s; a 1-item request meanwhile {results['small_request_s_median'][name]:.3f} s")  # fmt: skip
    print("per item / chunked:", results["per_item_over_chunked"])
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()
