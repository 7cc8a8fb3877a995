"""A trainer group of 2 ranks (FSDP2 over gloo on CPU) inside a real `openrl up`, driven by the
tinker SDK: it is one trainer to the bus, its ranks show in `ps`, it computes what the session
stack's single trainer computes, and a kill -9 of either rank loses nothing."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import tinker

from stack_helpers import alive, run_stack
from sdk_helpers import assert_logprobs_equal, logprobs, training_client

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def group_stack(tmp_path_factory, default_model, nats_credentials):
    stacks = run_stack(tmp_path_factory.mktemp("group-stack"), nats_credentials,
                       args=("--samplers", "0", "--trainer-nproc", "2"), stop_s=90)  # fmt: skip
    yield next(stacks)
    ranks = rank_pids()
    next(stacks, None)  # SIGTERM; every role stopped, within its permissions
    assert not [pid for pid in ranks.values() if alive(pid)], "a rank outlived openrl up"


def rank_pids() -> dict[str, int]:
    """pid of each live process whose command line starts 'openrl trainer rank K/N' (what ps shows)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("openrl trainer rank ") and alive(int(entry)):
            out[cmdline.split()[3]] = int(entry)
    return out


def wait_group(timeout_s: float = 180, old: dict[str, int] | None = None) -> dict[str, int]:
    """Both ranks up (and, after a kill, both new)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = rank_pids()
        if set(pids) >= {"0/2", "1/2"} and not (old and set(pids.values()) & set(old.values())):
            return pids
        time.sleep(0.3)
    raise AssertionError(f"the group's ranks did not come up: {rank_pids()}")


def steps(tc, batches, lr=5e-3) -> list[list[np.ndarray]]:
    """forward_backward + optim_step per batch; the logprobs of each forward_backward."""
    out = []
    for batch in batches:
        fb = tc.forward_backward(batch, loss_fn="cross_entropy")
        opt = tc.optim_step(tinker.types.AdamParams(learning_rate=lr))
        out.append(logprobs(fb.result(timeout=300)))
        opt.result(timeout=300)
    return out


def test_the_group_is_one_trainer_with_its_ranks_in_ps(group_stack):
    pids = wait_group()
    assert set(pids) == {"0/2", "1/2"}
    health = group_stack.healthz()
    assert len(health["trainers"]) == 1, health  # one lease holder, one consumer
    launcher = group_stack.pid("trainer")
    for pid in pids.values():  # the ranks are the launcher's children
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == launcher


def test_the_group_computes_what_a_single_trainer_does_and_survives_kill_9_of_each_rank(group_stack, stack, data):
    """The same SDK calls on the session stack (one trainer process) and on the group: equal
    logprobs. Midway each rank in turn is killed with a request in flight: the supervisor
    restarts the group, which rebuilds the model from its snapshot and log, and every result
    still equals the uninterrupted run's."""
    batches = [data[:4], data[4:], data[2:6], data[:3], data[5:], data[1:7]]
    _, single = training_client(stack, seed=21)
    want = steps(single, batches)

    _, tc = training_client(group_stack, seed=21)
    got = steps(tc, batches[:2])
    for victim in ("1/2", "0/2"):
        pids = wait_group()
        launcher = group_stack.pid("trainer")
        k = len(got)
        fb = tc.forward_backward(batches[k], loss_fn="cross_entropy")  # in flight when the rank dies
        opt = tc.optim_step(tinker.types.AdamParams(learning_rate=5e-3))
        os.kill(pids[victim], signal.SIGKILL)
        group_stack.wait_restarted("trainer", launcher, timeout_s=120)
        got.append(logprobs(fb.result(timeout=300)))
        opt.result(timeout=300)
        wait_group(old=pids)
        got += steps(tc, batches[len(got) : len(got) + 1])
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        assert_logprobs_equal(a, b)
