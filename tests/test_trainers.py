"""Several trainers for one base model: leases, least-loaded placement, failover.

The `stack` runs one supervised trainer (worker id "trainer"); these tests add a second,
unsupervised `openrl trainer` process on the same bus, so that killing or pausing it
leaves its models to the stack's trainer, which must take them over with nothing lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stack_helpers import BASE_MODEL, bus_config
from sdk_helpers import assert_logprobs_equal, logprobs, sdk_steps, training_client

pytestmark = pytest.mark.timeout(600)

EXTRA = "extra-trainer"


def leases(stack) -> dict[str, dict]:
    """Every lease in the bus, as plain dicts keyed by model id."""
    from openrl.bus.client import Bus
    from openrl.bus.messages import Lease, decode

    async def read():
        bus = await Bus.connect(bus_config(stack.nats_url, name="test-leases"))
        try:
            keys = await bus.kv_keys(bus.leases)
            out = {}
            for key in keys:
                entry = await bus.leases.get(key)
                lease = decode(entry.value, Lease)
                out[lease.model_id] = {"owner": lease.owner, "epoch": lease.epoch, "previous_owner": lease.previous_owner, "failed": lease.failed}
            return out
        finally:
            await bus.close()

    return asyncio.run(read())


class ExtraTrainer:
    """A second trainer process, configured from OPENRL_* env as a Deployment would be."""

    def __init__(self, stack, tmp_path, worker_id: str = EXTRA):
        self.log_path = tmp_path / f"{worker_id}.log"
        self._log = open(self.log_path, "wb")
        env = {
            **os.environ,
            "OPENRL_NATS_URL": stack.nats_url,
            "OPENRL_BASE_MODEL": BASE_MODEL,
            "OPENRL_WORKER_ID": worker_id,
            "OPENRL_THREADS": "1",
            "OPENRL_SNAPSHOT_EVERY": "4",
            "OPENRL_LOG_FORMAT": "json",
        }
        self.proc = subprocess.Popen([sys.executable, "-m", "openrl", "trainer"], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while worker_id not in stack.healthz()["trainers"]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("extra trainer did not start:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.3)

    def events(self, name: str) -> list[dict]:
        lines = self.log_path.read_text().splitlines()
        return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == name]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(30)
        self._log.close()


@pytest.fixture
def extra_trainer(stack, tmp_path):
    t = ExtraTrainer(stack, tmp_path)
    yield t
    t.stop()


def wait_owner(stack, model_id: str, owner: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lease = leases(stack).get(model_id)
        if lease and lease["owner"] == owner:
            return lease
        time.sleep(0.3)
    raise AssertionError(f"{model_id} never moved to {owner}: {leases(stack).get(model_id)}")


def test_new_models_go_to_the_least_loaded_trainer(stack, extra_trainer):
    placed = []
    for seed in range(5):
        before = leases(stack)
        load = {"trainer": 0, EXTRA: 0}
        for lease in before.values():
            if lease["failed"] is None and lease["owner"] in load:
                load[lease["owner"]] += 1
        _, tc = training_client(stack, seed=500 + seed)
        owner = leases(stack)[tc.model_id]["owner"]
        want = min(load, key=lambda w: (load[w], w))
        assert owner == want, (tc.model_id, owner, load)
        placed.append(owner)
    assert EXTRA in placed, placed  # it started with no models: it gets the first new ones


def _train_across(stack, data, *, seed: int, fault) -> tuple[list, str]:
    """Create models until one lands on the extra trainer, train 3 steps, apply `fault`,
    train 3 more; returns the final logprobs and the model id."""
    for attempt in range(40):
        _, tc = training_client(stack, seed=seed)
        if leases(stack)[tc.model_id]["owner"] == EXTRA:
            break
    else:
        raise AssertionError("no model was placed on the extra trainer")
    batches = [data[(2 * i) % 8 : (2 * i) % 8 + 2] for i in range(6)]
    sdk_steps(tc, batches[:3])
    fault()
    sdk_steps(tc, batches[3:])  # waits out the takeover: nothing may be lost
    return logprobs(tc.forward(data, loss_fn="cross_entropy").result()), tc.model_id


def test_a_dead_trainers_models_move_to_a_live_one_with_identical_weights(stack, extra_trainer, data):
    _, clean = training_client(stack, seed=601)
    sdk_steps(clean, [data[(2 * i) % 8 : (2 * i) % 8 + 2] for i in range(6)])
    want = logprobs(clean.forward(data, loss_fn="cross_entropy").result())

    got, model_id = _train_across(stack, data, seed=601, fault=lambda: os.kill(extra_trainer.proc.pid, signal.SIGKILL))
    lease = leases(stack)[model_id]
    assert lease["owner"] == "trainer" and lease["previous_owner"] == EXTRA and lease["epoch"] == 2, lease
    assert_logprobs_equal(got, want, rtol=0, atol=0)


def test_a_paused_owner_loses_its_models_and_lets_go_when_it_resumes(stack, extra_trainer, data):
    """SIGSTOP: the heartbeat stops, the lease moves; on SIGCONT the old owner sees the lease
    moved and releases the model instead of training it too (no split brain)."""
    _, clean = training_client(stack, seed=602)
    sdk_steps(clean, [data[(2 * i) % 8 : (2 * i) % 8 + 2] for i in range(6)])
    want = logprobs(clean.forward(data, loss_fn="cross_entropy").result())

    got, model_id = _train_across(stack, data, seed=602, fault=lambda: os.kill(extra_trainer.proc.pid, signal.SIGSTOP))
    assert leases(stack)[model_id]["owner"] == "trainer"
    os.kill(extra_trainer.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while not [e for e in extra_trainer.events("model_released") if e["model_id"] == model_id]:
        assert time.monotonic() < deadline, "the resumed trainer kept a model it no longer owns"
        time.sleep(0.3)
    assert_logprobs_equal(got, want, rtol=0, atol=0)
    assert extra_trainer.proc.poll() is None  # it lost a lease, it did not die
