"""`openrl up` runs a supervised rewarder per built-in reward (and per --rewarder)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from openrl.cli import _up_rewarders
from openrl.client import RewardClient
from openrl.rewarder.builtin import REWARDS

from stack_helpers import alive


def test_rewarder_flags_of_up():
    assert _up_rewarders(None) == REWARDS
    got = _up_rewarders(["chaos=chaos_rewards:chaos", "my_pkg.rewards:exact_ish", "math=my_pkg.rewards:better_math", "sql"])
    assert got == {**REWARDS, "chaos": "chaos_rewards:chaos", "exact_ish": "my_pkg.rewards:exact_ish", "math": "my_pkg.rewards:better_math"}
    for bad in ["no_colon_here", "bad name=a:b", "=a:b:"]:
        with pytest.raises(SystemExit):
            _up_rewarders([bad])


def _cmdline(pid: int) -> str:
    return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry))
    return kids


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_up_serves_the_builtin_rewards_and_restarts_a_killed_rewarder(stack):
    client = RewardClient(stack.url, stack.api_key, timeout_s=120)
    deadline = time.monotonic() + 60
    while {r["name"] for r in client.rewards()} < set(REWARDS):
        assert time.monotonic() < deadline, client.rewards()
        time.sleep(0.5)
    sql_ref = {"schema": "CREATE TABLE t (a INTEGER);", "rows": {"t": [[1], [2], [3]]}, "gold": "SELECT sum(a) FROM t"}
    assert [s.reward for s in client.score("exact_match", [{"completion": "Yes.", "reference": "yes"}, {"completion": "no", "reference": "yes"}])] == [1.0, 0.0]
    assert [s.reward for s in client.score("math", [{"completion": "so \\boxed{6}", "reference": "6"}])] == [1.0]
    assert [s.metrics for s in client.score("sql", [{"completion": "SELECT 6", "reference": sql_ref}, {"completion": "DROP TABLE t", "reference": sql_ref}])] == [
        {"reward": 1.0, "executed": 1.0, "correct": 1.0}, {"reward": 0.0, "executed": 0.0, "correct": 0.0}]  # fmt: skip

    victim = stack.pid("rewarder-math")
    assert f"openrl rewarder --fn {REWARDS['math']} --name math" in _cmdline(victim)
    workers = _children(victim)
    assert len(workers) == 2 and all("-m openrl.rewarder math worker" in _cmdline(w) for w in workers)
    os.kill(victim, signal.SIGKILL)
    # Scoring keeps working: the request waits in the queue for the restarted rewarder.
    assert [s.reward for s in client.score("math", [{"completion": "The answer is 3/4", "reference": "0.75"}])] == [1.0]
    assert stack.wait_restarted("rewarder-math", victim) != victim
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers):  # the dead rewarder's workers died with it
        assert time.monotonic() < deadline
        time.sleep(0.1)
