"""Failover: time from `kill -9` of each kind of process to the first completed request.

One `openrl up` (one trainer, one sampler, one rewarder per built-in reward, the gateway,
nats-server), so every failover goes through the supervisor's restart (or, for work a dead
worker held, JetStream's redelivery after ack_wait, 10 s). For each kind, in turn:
SIGKILL the process (its pid from <data-dir>/run/<role>.pid), submit at once the request
that kind serves, and time until its result is back:

    trainer   forward_backward + optim_step of an existing model (restart, load, hydrate)
    sampler   sample from that model's sampling client
    rewarder  a score request to exact_match (the rewarder-exact_match process)
    gateway   forward_backward through the SDK, which retries while the port is closed
    nats      nats-server: the same, while every process reconnects to the restarted server

Between kinds the stack is given time to be whole again (new pid, /healthz ok, a warm-up
request). Each measurement is repeated `--rounds` times; prints a table and writes JSON.

    python bench/failover.py [--rounds 2] [--kinds trainer sampler rewarder gateway nats]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

from common import API_KEY, start_stack, stop_stack, write_results

BASE_MODEL = "openrl/tiny-qwen3"
ROLES = {"trainer": "trainer", "sampler": "sampler", "rewarder": "rewarder-exact_match", "gateway": "gateway", "nats": "nats"}


def pid(data_dir: Path, role: str) -> int:
    return int((data_dir / "run" / f"{role}.pid").read_text())


def wait_restarted(data_dir: Path, role: str, old: int, timeout_s: float = 120) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if pid(data_dir, role) != old:
                return time.monotonic() - started
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{role} was not restarted")


def healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=5) as r:
                h = json.loads(r.read())
            if h.get("status") == "ok" and h.get("trainers") and h.get("samplers"):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the stack did not become healthy again")


def score(url: str) -> None:
    with httpx.Client(base_url=f"{url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=60) as http:
        while True:  # the gateway may answer 400 "unknown reward" until the restarted rewarder registers
            r = http.post("/score", json={"reward_name": "exact_match", "items": [{"completion": "42", "reference": "42"}]})
            if r.status_code == 200:
                break
            time.sleep(0.05)
        rid = r.json()["request_id"]
        while (r := http.post("/retrieve_future", json={"request_id": rid})).status_code == 408:
            pass
        assert r.status_code == 200 and r.json()["scores"][0]["reward"] == 1.0, r.text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kinds", nargs="+", default=list(ROLES), choices=list(ROLES))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "failover.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tinker

    data_dir = Path(tempfile.mkdtemp(prefix="openrl-failover-"))
    proc, url = start_stack(data_dir, "--samplers", "1", "--snapshot-every", "4")
    results: dict[str, list[dict]] = {k: [] for k in args.kinds}
    try:
        service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0).result()
        batch = [tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(list(range(10, 42))),
                                    loss_fn_inputs={"target_tokens": list(range(11, 43)), "weights": [1.0] * 32})]  # fmt: skip
        prompt = tinker.types.ModelInput.from_ints([1, 2, 3, 4, 5])
        params = tinker.types.SamplingParams(max_tokens=4, temperature=0.0)

        def train() -> None:
            fb = tc.forward_backward(batch, "cross_entropy")
            opt = tc.optim_step(tinker.types.AdamParams(learning_rate=1e-4))
            fb.result(timeout=300)
            opt.result(timeout=300)

        sampler = tc.save_weights_and_get_sampling_client().result()
        request = {
            "trainer": train, "gateway": train, "nats": train,
            "sampler": lambda: sampler.sample(prompt, 1, params).result(timeout=300),
            "rewarder": lambda: score(url),
        }  # fmt: skip
        for _ in range(3):  # warm: every path has run once
            train(), request["sampler"](), score(url)
        for r in range(args.rounds):
            for kind in args.kinds:
                role = ROLES[kind]
                old = pid(data_dir, role)
                with ThreadPoolExecutor(1) as pool:
                    started = time.monotonic()
                    os.kill(old, signal.SIGKILL)
                    restarted = pool.submit(wait_restarted, data_dir, role, old)  # watches the pid file from the kill on
                    request[kind]()
                    seconds = time.monotonic() - started
                    restart_s = restarted.result()
                results[kind].append({"kill_to_result_s": round(seconds, 2), "kill_to_new_pid_s": round(restart_s, 2)})
                print(f"round {r + 1} {kind:<9} kill -9 -> first result {seconds:6.2f} s (new process after {restart_s:.2f} s)", flush=True)
                healthy(url)
                for _ in range(2):
                    request[kind]()
                time.sleep(2)
    finally:
        stop_stack(proc)
    table = {k: {"median_s": round(float(np.median([x["kill_to_result_s"] for x in v])), 2),
                 "max_s": round(max(x["kill_to_result_s"] for x in v), 2)} for k, v in results.items() if v}  # fmt: skip
    print(f"\n{'kill -9 of':<12}{'first result, median s':>24}{'max s':>8}")
    for kind, t in table.items():
        print(f"{kind:<12}{t['median_s']:>24}{t['max_s']:>8}")
    write_results(args.out, {"date": datetime.now().isoformat(timespec="seconds"), "rounds": args.rounds, "summary": table, "runs": results})


if __name__ == "__main__":
    main()
