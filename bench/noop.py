"""The no-op request's latency (SDK -> gateway -> JetStream -> trainer -> KV future -> gateway
-> SDK), and where it goes, optionally against another source tree in the same run.

The request is an `optim_step` with no accumulated gradients (the trainer's AdamW skips every
parameter), sent one at a time through the tinker SDK, as bench/stack_overhead.py measures it.
Beside it, to split the total: the SDK's `get_server_capabilities` (one HTTP round trip to
the gateway, no bus), the same no-op as two plain HTTP calls (httpx: the optim_step POST, the
retrieve_future poll, beside a get_server_capabilities GET; per stack, alternating too), and a
KV get and a PING from a NATS client (one bus round trip). CPU milliseconds per no-op by process
(utime + stime from /proc over the SDK no-op blocks; "bench" is the SDK client, this process).

With `--baseline-tree DIR` (the code before a change, e.g. `git archive HEAD openrl | tar -x
-C DIR`), a second stack runs from DIR (started in DIR, its `openrl` package first on sys.path:
`python -m` puts the working directory before PYTHONPATH) and the two are measured in
alternating blocks, so machine load hits both alike.

    python bench/noop.py [--requests 400] [--baseline-tree DIR] [--out bench/results/noop.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import API_KEY, finish_results, machine, start_stack, stop_stack
from jobs import cpu_by_kind, stack_processes

ROOT = Path(__file__).resolve().parent.parent
BASE_MODEL = "openrl/tiny-qwen3"


def summary(samples: list[float]) -> dict:
    return {"n": len(samples), "p50_ms": round(float(np.percentile(samples, 50)) * 1000, 2),
            "p90_ms": round(float(np.percentile(samples, 90)) * 1000, 2), "p99_ms": round(float(np.percentile(samples, 99)) * 1000, 2),
            "mean_ms": round(float(np.mean(samples)) * 1000, 2)}  # fmt: skip


async def bus_round_trips(data_dir: Path, n: int) -> dict:
    """A NATS KV get (the futures bucket, a missing key) and a PING/PONG (`flush`), from this
    process with the stack's operator credentials: what one of the path's bus round trips
    costs on this machine now."""
    import json

    import nats

    from openrl.bus import auth
    from openrl.bus.subjects import FUTURES_BUCKET

    url = json.loads((data_dir / "run" / "stack.json").read_text())["nats_url"]
    creds = auth.load(data_dir / "nats-credentials.json", "operator")
    nc = await nats.connect(url, **auth.connect_options("operator", creds))
    try:
        kv = await nc.jetstream().key_value(FUTURES_BUCKET)
        gets, flushes = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                await kv.get("bench-missing-key")
            except Exception:
                pass
            t1 = time.perf_counter()
            await nc.flush()
            gets.append(t1 - t0)
            flushes.append(time.perf_counter() - t1)
        return {"kv_get": summary(gets), "ping": summary(flushes)}
    finally:
        await nc.close()


def raw_http(targets: dict[str, tuple[str, str]], n: int, block: int) -> dict:
    """The same no-op as two plain HTTP calls (httpx, one kept-alive connection per stack):
    the optim_step POST (gateway -> JetStream, answered once published) and the retrieve_future
    long poll (trainer -> KV future -> gateway). What the SDK adds is the rest. Beside them,
    `no_bus_get`: get_server_capabilities the same way (an HTTP round trip, no bus work).
    `targets`: name -> (base URL, model id); the stacks take turns in blocks of `block`."""
    import httpx

    headers = {"X-API-Key": API_KEY}
    clients = {name: (httpx.Client(base_url=url, headers=headers, timeout=60), model_id) for name, (url, model_id) in targets.items()}
    times = {name: {"post": [], "poll": [], "plain": []} for name in targets}
    seq = 0
    try:
        for start in range(0, n, block):
            for name, (http, model_id) in clients.items():
                for k in range(start, min(start + block, n)):
                    t = time.perf_counter()  # one HTTP round trip to the gateway with no bus work
                    http.get("/api/v1/get_server_capabilities").raise_for_status()
                    plain = time.perf_counter() - t
                    t0 = time.perf_counter()
                    r = http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": k + 1, "adam_params": {"learning_rate": 1e-4}})
                    r.raise_for_status()
                    t1 = time.perf_counter()
                    while True:
                        f = http.post("/api/v1/retrieve_future", json={"request_id": r.json()["request_id"]})
                        if f.status_code != 408:
                            f.raise_for_status()
                            break
                    t2 = time.perf_counter()
                    if k >= 10:  # the first warm the connection
                        times[name]["post"].append(t1 - t0)
                        times[name]["poll"].append(t2 - t1)
                        times[name]["plain"].append(plain)
    finally:
        for http, _ in clients.values():
            http.close()
    return {
        name: {"optim_step_post": summary(t["post"]), "retrieve_future": summary(t["poll"]),
               "both": summary([a + b for a, b in zip(t["post"], t["poll"])]), "no_bus_get": summary(t["plain"])}
        for name, t in times.items()
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=400, help="no-op requests per stack")
    p.add_argument("--block", type=int, default=20, help="requests per stack before switching")
    p.add_argument("--baseline-tree", default="", help="a source tree to measure against (its openrl/ first on PYTHONPATH)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "noop.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    import tinker

    from openrl.default_model import ensure_default_model

    ensure_default_model()
    started = time.perf_counter()
    trees = {"this": str(ROOT)} | ({"baseline": str(Path(args.baseline_tree).resolve())} if args.baseline_tree else {})
    results: dict = {"machine": machine(), "trees": trees}
    stacks, clients = {}, {}
    pythonpath = os.environ.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="openrl-bench-noop-") as tmp:
        try:
            for name, tree in trees.items():
                os.environ["PYTHONPATH"] = os.pathsep.join(x for x in [tree, pythonpath] if x)
                stacks[name] = start_stack(Path(tmp) / name, "--threads", "1", cwd=tree)
            os.environ["PYTHONPATH"] = pythonpath
            adam = tinker.types.AdamParams(learning_rate=1e-4)
            for name, (_, url) in stacks.items():
                service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
                tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=8).result()
                for _ in range(20):  # warm the connection pool and the trainer's tenant
                    tc.optim_step(adam).result()
                    service.get_server_capabilities()
                clients[name] = (service, tc)
            noop = {n: [] for n in trees}
            caps = {n: [] for n in trees}
            # CPU-seconds by process over the no-op blocks alone ("bench": this process, the SDK client)
            procs = {name: stack_processes(proc.pid) for name, (proc, _) in stacks.items()}
            cpu = {name: {} for name in trees}
            for _ in range(0, args.requests, args.block):
                for name, (service, tc) in clients.items():
                    before = cpu_by_kind(procs[name])
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        tc.optim_step(adam).result()
                        noop[name].append(time.perf_counter() - t0)
                    after = cpu_by_kind(procs[name])
                    for kind in after:
                        cpu[name][kind] = cpu[name].get(kind, 0.0) + after[kind] - before.get(kind, 0.0)
                    for _ in range(args.block):
                        t1 = time.perf_counter()
                        service.get_server_capabilities()
                        caps[name].append(time.perf_counter() - t1)
            import asyncio

            targets = {}
            for name, (_, url) in stacks.items():
                raw_tc = tinker.ServiceClient(base_url=url, api_key=API_KEY).create_lora_training_client(base_model=BASE_MODEL, rank=8).result()
                targets[name] = (url, raw_tc.get_info().model_id)
            results["raw_http"] = raw_http(targets, args.requests + 10, args.block)
            for name, r in results["raw_http"].items():
                print(f"{name}: the no-op as two plain HTTP calls: {r}", flush=True)

            results["bus_round_trip"] = asyncio.run(bus_round_trips(Path(tmp) / "this", 200))
            print(f"bus round trips from this process: {results['bus_round_trip']}", flush=True)
        finally:
            for proc, _ in stacks.values():
                stop_stack(proc)
    for name in trees:
        results[name] = {"noop": summary(noop[name]), "capabilities": summary(caps[name]),
                         "cpu_ms_per_noop": {k: round(v / len(noop[name]) * 1000, 3) for k, v in sorted(cpu[name].items()) if v > 0}}  # fmt: skip
        r = results[name]
        print(f"{name}: no-op p50 {r['noop']['p50_ms']} ms (p90 {r['noop']['p90_ms']}), one gateway round trip "
              f"(get_server_capabilities) p50 {r['capabilities']['p50_ms']} ms; CPU ms per no-op by process "
              f"{r['cpu_ms_per_noop']}", flush=True)  # fmt: skip
    if "baseline" in results:
        results["ratio_p50"] = round(results["baseline"]["noop"]["p50_ms"] / results["this"]["noop"]["p50_ms"], 3)
        results["ratio_p99"] = round(results["baseline"]["noop"]["p99_ms"] / results["this"]["noop"]["p99_ms"], 3)
        print(f"baseline / this, no-op p50: {results['ratio_p50']}, p99: {results['ratio_p99']}", flush=True)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    finish_results(args.out, results, args, started)


if __name__ == "__main__":
    main()
