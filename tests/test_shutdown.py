"""SIGTERM drills, one per process kind, on the `stack`'s bus.

Each drill starts an extra process of a kind next to the stack's, configured by OPENRL_*
env as a Deployment would be, gives it work, sends SIGTERM while the work is in flight,
and checks: it exits 0 within the grace period the manifests give it, the work it held
was handed back (nak, not left to ack_wait) and completed by the other process of its
kind, and nothing was lost or applied twice.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker

from openrl.demo import make_datum, sft_examples

from stack_helpers import API_KEY, BASE_MODEL, free_port
from test_trainers import EXTRA, leases

pytestmark = pytest.mark.timeout(600)

GRACE_S = 15  # what `openrl up` and the manifests give a worker between SIGTERM and SIGKILL
CHAOS = str(Path(__file__).parent / "rewarder")  # chaos_rewards: "sleep:<s>" scores after s seconds


class Proc:
    """An extra `openrl <kind>` process with its own metrics port and JSON log."""

    def __init__(self, tmp_path: Path, kind: str, env: dict[str, str], *args: str):
        self.metrics_port = free_port()
        self.log_path = tmp_path / f"{kind}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "OPENRL_LOG_FORMAT": "json", "OPENRL_METRICS_PORT": str(self.metrics_port),
               "OPENRL_METRICS_HOST": "127.0.0.1", **env}  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-m", "openrl", kind, *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.output()}"
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"not ready:\n{self.output()}")

    def metric(self, name: str, **labels) -> float:
        from test_observability import parse, total

        return total(parse(self.get("/metrics")[1].decode()), name, **labels)

    def events(self, name: str) -> list[dict]:
        lines = self.log_path.read_text().splitlines()
        return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == name]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def sigterm(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running {GRACE_S} s after SIGTERM:\n{self.output()}") from None
        finally:
            self._log.close()
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def wait_for(what, timeout_s: float, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(what)


# -- sampler -------------------------------------------------------------------------------


def test_sigterm_sampler_hands_its_requests_to_the_others(stack, tmp_path):
    extra = Proc(tmp_path, "sampler", {"OPENRL_NATS_URL": stack.nats_url, "OPENRL_BASE_MODEL": BASE_MODEL, "OPENRL_THREADS": "1"})
    try:
        extra.wait_ready()
        sampling = stack.service_client().create_sampling_client(base_model=BASE_MODEL)
        prompt = tinker.types.ModelInput.from_ints([1, 2, 3, 4, 5])
        params = tinker.types.SamplingParams(max_tokens=48, temperature=1.0, seed=7)
        futures = [sampling.sample(prompt, num_samples=2, sampling_params=params) for _ in range(12)]
        # Mid-work: the extra sampler holds requests it has not answered.
        wait_for(lambda: extra.metric("openrl_messages_in_flight", stream="OPENRL_SAMPLE") > 0, 60)
        code, seconds = extra.sigterm()
        results = [f.result(timeout=300) for f in futures]
    finally:
        extra.kill()
    assert code == 0, extra.output()
    handed_back = [e for e in extra.events("message_handed_back") if e["reason"] == "shutting down"]
    assert handed_back, extra.output()
    assert all(len(r.sequences) == 2 and all(0 < len(s.tokens) <= 48 for s in r.sequences) for r in results)
    # The extra answered only what it finished before SIGTERM; the stack's samplers the rest.
    assert len(extra.events("message_handled")) < len(futures)
    assert seconds < GRACE_S


# -- rewarder ------------------------------------------------------------------------------


def _score(url: str, items: list[dict]) -> str:
    r = httpx.post(f"{url}/api/v1/score", headers={"X-API-Key": API_KEY}, json={"reward_name": "drill", "items": items}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _rewards(url: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/api/v1/rewards", headers={"X-API-Key": API_KEY}, timeout=30)
    assert r.status_code == 200, r.text
    return {x["name"]: x for x in r.json()["rewards"]}


def _result(url: str, rid: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.post(f"{url}/api/v1/retrieve_future", headers={"X-API-Key": API_KEY}, json={"request_id": rid}, timeout=60)
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 408, r.text
    raise TimeoutError(rid)


@pytest.fixture
def drill_rewarders(stack, tmp_path):
    env = {"OPENRL_NATS_URL": stack.nats_url, "OPENRL_REWARD_FN": "chaos_rewards:chaos", "OPENRL_REWARD_NAME": "drill",
           "OPENRL_REWARD_CONCURRENCY": "2", "PYTHONPATH": os.pathsep.join([CHAOS, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    procs = [Proc(tmp_path, "rewarder", env), Proc(tmp_path, "rewarder", env)]
    try:
        for p in procs:
            p.wait_ready()
        # Healthy is not yet listed: the gateway learns of a rewarder from its first heartbeat.
        wait_for(lambda: "drill" in _rewards(stack.url), 30, every_s=0.2)
        yield procs
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.sigterm()
            p.kill()


def test_sigterm_rewarder_hands_its_requests_to_the_other(stack, drill_rewarders):
    victim, other = drill_rewarders
    rids = [_score(stack.url, [{"completion": "sleep:2"}, {"completion": "ok:0.5"}]) for _ in range(6)]
    wait_for(lambda: victim.metric("openrl_messages_in_flight", stream="OPENRL_REWARD") > 0, 30)
    code, seconds = victim.sigterm()
    results = [_result(stack.url, rid) for rid in rids]
    assert code == 0, victim.output()
    assert seconds < GRACE_S
    assert [e for e in victim.events("message_handed_back") if e["reason"] == "shutting down"], victim.output()
    assert all([s["reward"] for s in r["scores"]] == [1.0, 0.5] for r in results), results
    # Every request was recorded once, by a process that finished it: the victim's handed-back
    # ones by the other rewarder.
    scored_by = {r["request_id"]: r["worker_id"] for r in results}
    victim_scored = {e["request_id"] for e in victim.events("scored")}
    assert {rid for rid, w in scored_by.items() if w.endswith(str(victim.proc.pid))} == victim_scored
    assert len(victim_scored) < len(rids)
    assert other.metric("openrl_reward_items_total", reward="drill") == 2 * (len(rids) - len(victim_scored))


# -- gateway -------------------------------------------------------------------------------


def test_sigterm_gateway_answers_its_long_polls_and_exits(stack, drill_rewarders, tmp_path):
    port = free_port()
    gw = Proc(tmp_path, "gateway", {"OPENRL_NATS_URL": stack.nats_url, "OPENRL_API_KEYS": API_KEY, "OPENRL_HOST": "127.0.0.1",
                                    "OPENRL_PORT": str(port)})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        gw.wait_ready(60)
        wait_for(lambda: "drill" in httpx.get(f"{url}/api/v1/rewards", headers={"X-API-Key": API_KEY}).text, 30, every_s=0.3)
        rid = _score(url, [{"completion": "sleep:4"}])
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            poll = pool.submit(httpx.post, f"{url}/api/v1/retrieve_future", headers={"X-API-Key": API_KEY}, json={"request_id": rid}, timeout=60)
            wait_for(lambda: gw.metric("openrl_futures_waiting") == 1, 10)
            code, seconds = gw.sigterm()
            answer = poll.result(timeout=10)
    finally:
        gw.kill()
    assert code == 0, gw.output()
    assert seconds < 10
    # The long poll got the SDK's quiet "try again", not a dropped connection ...
    assert answer.status_code == 408 and answer.json()["type"] == "try_again", answer.text
    # ... and polling again through the other gateway gets the result: nothing was lost.
    assert [s["reward"] for s in _result(stack.url, rid)["scores"]] == [1.0]


# -- trainer -------------------------------------------------------------------------------


def test_sigterm_trainer_hands_its_models_over_at_once(stack, tmp_path):
    env = {"OPENRL_NATS_URL": stack.nats_url, "OPENRL_BASE_MODEL": BASE_MODEL, "OPENRL_WORKER_ID": EXTRA,
           "OPENRL_THREADS": "1", "OPENRL_SNAPSHOT_EVERY": "4"}  # fmt: skip
    extra = Proc(tmp_path, "trainer", env)
    try:
        extra.wait_ready()
        wait_for(lambda: EXTRA in stack.healthz()["trainers"], 30, every_s=0.3)
        service = stack.service_client()
        # Models are placed on the least loaded trainer: create until one lands on the extra.
        clients = []
        for i in range(6):
            tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=21).result()
            clients.append(tc)
            if leases(stack)[tc.model_id]["owner"] == EXTRA:
                break
        victim = clients[-1]
        assert leases(stack)[victim.model_id]["owner"] == EXTRA
        # The fault-free run: the same model (same seed), trained only after the SIGTERM, so
        # whichever trainer it was placed on, no request of it is ever interrupted.
        reference = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=21).result()

        tokenizer = victim.get_tokenizer()
        batches = [[make_datum(tokenizer, q, a) for q, a in sft_examples(8, seed=s)] for s in range(30)]

        def submit(tc):
            out = []
            for batch in batches:
                out.append(tc.forward_backward(batch, loss_fn="cross_entropy"))
                out.append(tc.optim_step(tinker.types.AdamParams(learning_rate=5e-3)))
            return out

        victim_futures = submit(victim)
        # Mid-work: the extra holds requests of the model it has not finished.
        wait_for(lambda: extra.metric("openrl_messages_in_flight", stream="OPENRL_TRAIN") > 0, 60, every_s=0.02)
        code, seconds = extra.sigterm()
        victim_results = [f.result(timeout=300) for f in victim_futures]
        reference_results = [f.result(timeout=300) for f in submit(reference)]
    finally:
        extra.kill()
    assert code == 0, extra.output()
    assert seconds < GRACE_S
    # Handed over by the extra itself (compare-and-set), not taken over after the heartbeat TTL.
    lease = leases(stack)[victim.model_id]
    assert lease["owner"] == "trainer" and lease["previous_owner"] == EXTRA and lease["epoch"] == 2, lease
    handed = [e for e in extra.events("model_handed_over") if e["model_id"] == victim.model_id]
    assert handed and handed[0]["to"] == "trainer"
    taken = [e for e in _stack_events(stack, "trainer", "model_taken_over") if e["model_id"] == victim.model_id]
    assert not taken
    assert [e for e in extra.events("message_handed_back") if e["reason"] == "shutting down"], extra.output()
    # Nothing lost or applied twice: every step's output equals a fault-free run's.
    for got, want in zip(victim_results[::2], reference_results[::2]):
        for a, b in zip(got.loss_fn_outputs, want.loss_fn_outputs):
            np.testing.assert_array_equal(a["logprobs"].to_numpy(), b["logprobs"].to_numpy())
    for got, want in zip(victim_results[1::2], reference_results[1::2]):
        assert got.metrics == want.metrics


def _stack_events(stack, role: str, name: str) -> list[dict]:
    lines = (stack.data_dir / "logs" / f"{role}.log").read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == name]
