"""Load: N concurrent tinker SDK clients, each training its own LoRA model and sampling from it.

Each client is one `ServiceClient` (its own session) with one training client (rank 1 by
default) and loops until the deadline: `forward_backward` + `optim_step` on a tiny batch,
after its first step and every `--sample-every`-th after that `save_weights_and_get_sampling_client` + `sample`
(`--max-tokens` tokens): an RL loop in miniature. All clients run on one asyncio loop with
the SDK's `*_async` methods. Every call is timed from submission to its result; any
exception is an error. Afterwards the gateway's own counters are read: the HTTP responses
it gave during the run by status (a 5xx the SDK retried silently still shows there).

    python bench/load.py [--clients 64] [--seconds 180] [--url URL --api-key KEY]
    python bench/load.py --hostile [--clients 16] [--seconds 60]

Without --url it starts its own `openrl up --samplers 2` (bench/common.py) in a temporary data
dir, deleted at the end unless --keep (then its path is printed: the processes' logs are in its
logs/). Prints p50 / p95 / p99 per call kind and writes bench/results/load.json (--out).

--hostile (docs/limits.md): the same clients (each with an API key of its own: --client-keys)
run twice on one stack, quiet and then while another key floods it (`flood`, from a process of
its own, as it would be another machine): the largest requests the bounds allow (forward_backward
bodies near the body limit far ahead of their model's next seq_id; in-order training steps of
the longest datums; sample requests of MAX_NUM_SAMPLES), sessions past its quota, and reward
requests of 4096 items past its reward quota. The result has both runs' error counts and
latencies, the flood run's p99 over the quiet run's per call kind, and the CPU-seconds each
process of the stack used in each run (bench/results/load_hostile.json).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import random
import re
import shutil
import tempfile
import time
import urllib.request
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import numpy as np

BASE_MODEL = "openrl/tiny-qwen3"
KINDS = ("create", "forward_backward", "optim_step", "save_weights_and_get_sampling_client", "sample")


class Recorder:
    def __init__(self):
        self.latencies_s: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.submitted = 0
        self.resolved = 0

    async def timed(self, kind: str, make, started: float | None = None):
        """The result of `make()` (an APIFuture, or a coroutine of one or of the result), timed
        from `started` (default: now); counted."""
        self.submitted += 1
        started = time.perf_counter() if started is None else started
        try:
            out = make()
            while True:
                if hasattr(out, "result_async"):
                    out = await out.result_async()
                elif inspect.isawaitable(out):
                    out = await out
                else:
                    break
        except Exception as e:  # any failure is an error of the run, reported below
            self.errors.append(f"{kind}: {type(e).__name__}: {e}"[:300])
            raise
        self.resolved += 1
        self.latencies_s[kind].append(time.perf_counter() - started)
        return out

    def percentiles_ms(self) -> dict[str, dict[str, float]]:
        out = {}
        for kind in KINDS:
            xs = np.array(self.latencies_s.get(kind, [])) * 1000
            if len(xs):
                out[kind] = {"n": int(len(xs)), "p50": round(float(np.percentile(xs, 50)), 1), "p95": round(float(np.percentile(xs, 95)), 1),
                             "p99": round(float(np.percentile(xs, 99)), 1), "max": round(float(xs.max()), 1)}  # fmt: skip
        return out


def _batch(rng: random.Random, rows: int, length: int):  # token ids below the default model's 876
    import tinker

    data = []
    for _ in range(rows):
        toks = [rng.randrange(10, 800) for _ in range(length + 1)]
        data.append(tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(toks[:-1]),
                                       loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * length}))  # fmt: skip
    return data


async def _client(i: int, service, rec: Recorder, deadline: float, args) -> int:
    import tinker

    rng = random.Random(i)
    tc = await rec.timed("create", lambda: service.create_lora_training_client(base_model=args.base_model, rank=args.rank, seed=i))
    batch = _batch(rng, args.rows, args.tokens)
    prompt = tinker.types.ModelInput.from_ints([rng.randrange(10, 800) for _ in range(8)])
    params = tinker.types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i)
    steps = 0
    while time.monotonic() < deadline:
        # Submitted back to back as the SDK asks (seq_ids are taken at the call), then awaited.
        t0 = time.perf_counter()
        fb_future = tc.forward_backward(batch, "cross_entropy")
        opt_future = tc.optim_step(tinker.types.AdamParams(learning_rate=1e-3))
        await rec.timed("forward_backward", lambda: fb_future, t0)
        await rec.timed("optim_step", lambda: opt_future, t0)
        steps += 1
        if steps % args.sample_every == 1 % args.sample_every:  # after the first step, then every sample_every
            sc = await rec.timed("save_weights_and_get_sampling_client", tc.save_weights_and_get_sampling_client)
            out = await rec.timed("sample", lambda: sc.sample(prompt, 1, params))
            assert 1 <= len(out.sequences[0].tokens) <= args.max_tokens
    return steps


def gateway_statuses(metrics_url: str | None) -> dict[str, float]:
    """The gateway's HTTP responses so far, by status code (from its /metrics)."""
    if not metrics_url:
        return {}
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, float] = defaultdict(float)
    for m in re.finditer(r'^openrl_http_requests_total\{([^}]*)\} (\S+)$', text, re.M):
        status = re.search(r'status="(\d+)"', m.group(1))
        if status:
            out[status.group(1)] += float(m.group(2))
    return dict(out)


def client_keys(api_key: str, n: int) -> list[str]:
    """The clients' API keys: `api_key` first, then n - 1 more (each its own tenant)."""
    return [api_key] + [f"tml-bench-client-{i:03d}-0000000000" for i in range(1, n)]


async def run_load(url: str, api_key: str, args, metrics_url: str | None = None) -> dict:
    """Drive the stack at `url`; returns the figures (errors listed, not raised). The clients
    take `--client-keys` keys in turn (client i the key i mod n)."""
    import tinker

    before = gateway_statuses(metrics_url)
    keys = client_keys(api_key, max(1, args.client_keys or 1))
    services = [tinker.ServiceClient(base_url=url, api_key=keys[i % len(keys)]) for i in range(args.clients)]
    rec = Recorder()
    started = time.monotonic()
    deadline = started + args.seconds
    results = await asyncio.gather(*(_client(i, s, rec, deadline, args) for i, s in enumerate(services)), return_exceptions=True)
    wall_s = time.monotonic() - started
    after = gateway_statuses(metrics_url)
    statuses = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before)) if after.get(k, 0) - before.get(k, 0)}
    steps = [r for r in results if isinstance(r, int)]
    return {
        "clients": args.clients, "client_keys": len(keys), "seconds": args.seconds, "wall_s": round(wall_s, 1),
        "rank": args.rank, "rows": args.rows, "tokens": args.tokens, "max_tokens": args.max_tokens, "sample_every": args.sample_every,
        "clients_failed": len(results) - len(steps), "steps": sum(steps), "min_client_steps": min(steps, default=0), "steps_per_s": round(sum(steps) / wall_s, 2),
        "calls_submitted": rec.submitted, "calls_resolved": rec.resolved, "errors": rec.errors[:50], "error_count": len(rec.errors),
        "latency_ms": rec.percentiles_ms(), "gateway_http_statuses": statuses,
    }  # fmt: skip


# -- the hostile key


HOSTILE_KEY = "tml-bench-hostile-0000000000"


class Flood:
    """What the hostile key sent and got back, by kind and HTTP status."""

    def __init__(self):
        self.statuses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def saw(self, kind: str, status: int | str) -> None:
        self.statuses[kind][str(status)] += 1


async def flood(url: str, key: str, until: asyncio.Event, args, out: Flood) -> None:
    """Flood the stack with what one key may send, until `until` is set (each kind on its own)."""
    import httpx
    import tinker
    from tinker.proto.request_conv import forward_backward_request_to_proto

    from openrl.bus.messages import MAX_NUM_SAMPLES
    from openrl.gateway.proto import pb

    service = tinker.ServiceClient(base_url=url, api_key=key)
    tc = await service.create_lora_training_client(base_model=args.base_model, rank=args.rank, seed=999)
    http = httpx.AsyncClient(base_url=f"{url}/api/v1", headers={"X-API-Key": key}, timeout=httpx.Timeout(120.0, connect=10.0))
    caps = {m["model_name"]: m for m in (await http.get("/get_server_capabilities")).json()["supported_models"]}
    context = int(caps.get(args.base_model, {}).get("max_context_length") or 2048)
    tokens = min(context - 2, args.hostile_tokens)
    rng = random.Random(999)
    sampler = (await http.post("/create_sampling_session", json={"session_id": tc.model_id.split(":")[0], "sampling_session_seq_id": 77,
                                                                 "base_model": args.base_model})).json()["sampling_session_id"]  # fmt: skip
    # A forward_backward body near the body limit (dense weights), for seq_ids far ahead.
    rows = max(1, args.hostile_body_mb * 1024 * 1024 // (16 * tokens))  # int32 token, int64 target, float32 weight
    big = _batch(rng, rows, tokens)
    req = tinker.types.ForwardBackwardRequest(model_id=tc.model_id, seq_id=10**6,
                                              forward_backward_input=tinker.types.ForwardBackwardInput(data=big, loss_fn="cross_entropy"))  # fmt: skip
    template = forward_backward_request_to_proto(req)
    ahead_seq = [10**6]

    def far_ahead() -> bytes:
        """The same body at the next far-ahead seq_id (a new request each time, never a duplicate)."""
        ahead_seq[0] += 1
        msg = pb.ForwardBackwardRequest()
        msg.CopyFrom(template)
        msg.seq_id = ahead_seq[0]
        return msg.SerializeToString()

    longest = _batch(rng, args.hostile_rows, tokens)
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [rng.randrange(10, 800) for _ in range(8)]}]}
    items = [{"completion": "a" * 64, "reference": "b"}] * 4096

    async def loop(kind: str, send) -> None:
        while not until.is_set():
            try:
                status = await send()
            except Exception as e:  # the flood must go on; what failed is counted
                status = type(e).__name__
            out.saw(kind, status)

    async def ahead() -> int:
        return (await http.post("/forward_backward", content=far_ahead(), headers={"Content-Type": "application/x-protobuf"})).status_code

    async def train_longest() -> int:
        fb = tc.forward_backward(longest, "cross_entropy")  # submitted back to back, as the clients do
        opt = tc.optim_step(tinker.types.AdamParams(learning_rate=1e-4))
        await fb.result_async()
        await opt.result_async()
        return 200

    async def sample_most() -> int:
        r = await http.post("/asample", json={"sampling_session_id": sampler, "seq_id": rng.randrange(1, 10**9), "num_samples": MAX_NUM_SAMPLES,
                                              "prompt": prompt, "sampling_params": {"max_tokens": args.max_tokens, "temperature": 1.0}})  # fmt: skip
        return r.status_code

    async def sessions() -> int:
        return (await http.post("/create_session", json={}, headers={"X-Idempotency-Key": f"flood-{rng.random()}"})).status_code

    async def rewards() -> int:
        return (await http.post("/score", json={"reward_name": "exact_match", "items": items})).status_code

    kinds = [("forward_backward_far_ahead", ahead), ("train_longest", train_longest), ("asample_max", sample_most),
             ("create_session", sessions), ("score_4096", rewards)]  # fmt: skip
    try:
        await asyncio.gather(*(loop(kind, send) for kind, send in kinds for _ in range(args.hostile_concurrency)))
    finally:
        await http.aclose()


def _flood_process(url: str, key: str, args, stop, statuses) -> None:
    """The hostile key's own process (as it would be its own machine): its request building
    (4 MiB protobuf bodies, 4096-item JSON) never holds the clients' interpreter."""

    async def main() -> None:
        until = asyncio.Event()
        out = Flood()
        flooding = asyncio.create_task(flood(url, key, until, args, out))
        while not stop.is_set() and not flooding.done():
            await asyncio.sleep(0.1)
        until.set()
        await asyncio.gather(flooding, return_exceptions=True)
        statuses.put(({k: dict(v) for k, v in out.statuses.items()}, time.process_time()))

    asyncio.run(main())


async def run_hostile(url: str, api_key: str, args, metrics_url: str | None = None, cpu=None) -> dict:
    """The clients quiet, then the clients while the hostile key floods from a process of its
    own; both runs' figures. `cpu`: CPU-seconds so far by process kind (the stack's, when this
    benchmark started it), read around each run."""
    import multiprocessing

    def used(before: dict | None) -> dict | None:
        if cpu is None:
            return None
        now = cpu()
        return now if before is None else {k: round(v - before.get(k, 0.0), 1) for k, v in now.items()}

    start = used(None)
    quiet = await run_load(url, api_key, args, metrics_url)
    quiet["cpu_seconds"] = used(start)
    ctx = multiprocessing.get_context("spawn")
    stop, statuses = ctx.Event(), ctx.Queue()
    flooding = ctx.Process(target=_flood_process, args=(url, HOSTILE_KEY, args, stop, statuses), daemon=True)
    flooding.start()
    await asyncio.sleep(args.flood_warmup_s)  # the flood is under way before the clients start
    try:
        start = used(None)
        loud = await run_load(url, api_key, args, metrics_url)
        loud["cpu_seconds"] = used(start)
    finally:
        stop.set()
        sent, flood_cpu_s = await asyncio.to_thread(statuses.get, True, 120)
        await asyncio.to_thread(flooding.join, 30)
    if loud.get("cpu_seconds") is not None:
        loud["cpu_seconds"]["hostile client (whole flood)"] = round(flood_cpu_s, 1)
    ratio = {}
    for kind, p in loud["latency_ms"].items():
        q = quiet["latency_ms"].get(kind)
        if q and q["p99"] > 0:
            ratio[kind] = round(p["p99"] / q["p99"], 2)
    return {
        "quiet": quiet, "flood": loud, "hostile_sent": sent,
        "p99_flood_over_quiet": ratio, "errors_quiet": quiet["error_count"], "errors_flood": loud["error_count"],
        "goal": "0 errors, p99 <= 2x the quiet run", "met": loud["error_count"] == 0 and all(r <= 2.0 for r in ratio.values()),
    }  # fmt: skip


def print_report(res: dict) -> None:
    print(f"\n{res['clients']} clients for {res['wall_s']} s: {res['steps']} train steps ({res['steps_per_s']}/s), "
          f"{res['calls_resolved']}/{res['calls_submitted']} calls resolved, {res['error_count']} errors, "
          f"gateway statuses {res['gateway_http_statuses']}")  # fmt: skip
    print(f"{'call':<40}{'n':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for kind, p in res["latency_ms"].items():
        print(f"{kind:<40}{p['n']:>7}{p['p50']:>10}{p['p95']:>10}{p['p99']:>10}{p['max']:>10}")
    for e in res["errors"][:10]:
        print("error:", e)


def add_args(p: argparse.ArgumentParser, clients: int = 64, seconds: float = 180) -> None:
    p.add_argument("--clients", type=int, default=clients)
    p.add_argument("--seconds", type=float, default=seconds, help="how long each client keeps submitting")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--rows", type=int, default=1, help="datums per forward_backward")
    p.add_argument("--tokens", type=int, default=16, help="tokens per datum")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens per sample")
    p.add_argument("--sample-every", type=int, default=3, help="save weights + sample every this many steps")
    p.add_argument("--base-model", default=BASE_MODEL)
    p.add_argument("--client-keys", type=int, default=None,
                   help="API keys the clients use in turn: 1 (one tenant; the default) up to --clients (each client a tenant of "
                        "its own; the default with --hostile); with --url, the extra keys must be accepted there "
                        "(tml-bench-client-NNN-0000000000)")
    p.add_argument("--keep", action="store_true", help="keep the stack's data dir and logs (printed at the end; else deleted)")
    p.add_argument("--hostile", action="store_true", help="run quiet, then under a hostile key's flood (docs/limits.md)")
    p.add_argument("--hostile-concurrency", type=int, default=2, help="hostile requests in flight per flood kind")
    p.add_argument("--hostile-body-mb", type=int, default=4, help="size of the far-ahead forward_backward bodies")
    p.add_argument("--hostile-tokens", type=int, default=2048, help="tokens per hostile datum (at most the model's context)")
    p.add_argument("--hostile-rows", type=int, default=4, help="datums per hostile training step")
    p.add_argument("--flood-warmup-s", type=float, default=5.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--url", help="an existing stack's gateway (default: start one)")
    p.add_argument("--api-key")
    p.add_argument("--metrics-url", help="the gateway's /metrics (from <data-dir>/run/stack.json)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.out = args.out or str(Path(__file__).parent / "results" / ("load_hostile.json" if args.hostile else "load.json"))
    if args.client_keys is None:  # well-behaved users are many tenants; fair shares are per key
        args.client_keys = args.clients if args.hostile else 1
    proc = cpu = None
    metrics_url = args.metrics_url
    if args.url:
        url, api_key = args.url, args.api_key
    else:
        from common import API_KEY, start_stack

        data_dir = Path(tempfile.mkdtemp(prefix="openrl-load-"))
        # The gateway accepts the clients' other keys and the hostile key beside API_KEY.
        extra = client_keys(API_KEY, args.client_keys)[1:] + ([HOSTILE_KEY] if args.hostile else [])
        if extra:
            os.environ["OPENRL_API_KEYS"] = ",".join(extra)
        proc, url = start_stack(data_dir, "--samplers", "2", "--threads", "1")
        api_key = API_KEY
        from common import cpu_by_kind, stack_processes

        procs = stack_processes(proc.pid)
        cpu = lambda: cpu_by_kind(procs)  # noqa: E731
        metrics_url = json.loads((data_dir / "run" / "stack.json").read_text())["metrics"]["gateway"]
    try:
        res = asyncio.run(run_hostile(url, api_key, args, metrics_url, cpu) if args.hostile else run_load(url, api_key, args, metrics_url))
    finally:
        if proc is not None:
            from common import stop_stack

            stop_stack(proc)
    res["date"] = datetime.now().isoformat(timespec="seconds")
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.url:  # what the train log holds on disk at the end (far-ahead bodies used to pile up there)
        res["train_stream_bytes"] = sum(f.stat().st_size for d in data_dir.rglob("OPENRL_TRAIN") if d.is_dir() for f in d.rglob("*") if f.is_file())
        if args.keep:
            print(f"the stack's data dir, with its processes' logs (logs/*.log): {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    if args.hostile:
        for name in ("quiet", "flood"):
            print(f"\n== {name}")
            print_report(res[name])
            if res[name].get("cpu_seconds"):
                print(f"CPU-seconds by process: {res[name]['cpu_seconds']}")
        print(f"\nhostile key sent: {res['hostile_sent']}; train stream on disk at the end: {res.get('train_stream_bytes')} bytes")
        print(f"p99 flood / quiet: {res['p99_flood_over_quiet']}; errors quiet {res['errors_quiet']}, flood {res['errors_flood']}; goal met: {res['met']}")
    else:
        print_report(res)
    from common import write_results

    write_results(args.out, res)


if __name__ == "__main__":
    main()
