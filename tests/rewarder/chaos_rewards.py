"""Reward functions for the rewarder tests: plain functions, no openrl import, like a user's.

`chaos` does what its completion says, so one worker pool meets every kind of failure:
"ok:<x>" -> x, "raise", "sleep:<s>", "exit" (os._exit), "kill" (SIGKILL itself),
"oom:<MB>" (allocates that much), "nan", "str", "dict", "print", "pid", "stdin".
"""

from __future__ import annotations

import asyncio
import os
import signal
import time


def chaos(prompt, completion, reference):
    cmd, _, arg = completion.partition(":")
    if cmd == "ok":
        return float(arg)
    if cmd == "raise":
        raise ValueError(f"boom {arg}")
    if cmd == "sleep":
        time.sleep(float(arg))
        return 1.0
    if cmd == "exit":
        os._exit(3)
    if cmd == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if cmd == "oom":
        blob = bytearray(int(arg) * 1024 * 1024)
        return float(len(blob))
    if cmd == "nan":
        return float("nan")
    if cmd == "str":
        return "one"
    if cmd == "dict":
        return {"format": 0.25, "correct": 1.0}
    if cmd == "print":
        print("user output " * 1000)  # must not corrupt the pool's pipe
        return 2.0
    if cmd == "pid":
        return float(os.getpid())
    if cmd == "stdin":
        return float(len(os.read(0, 100)))  # user code reading stdin must not eat the protocol
    if cmd == "reference":
        return float(reference["x"])
    raise ValueError(f"unknown command {cmd!r}")


async def async_length(prompt, completion, reference):
    await asyncio.sleep(0.01)
    return {"reward": float(len(completion)), "prompt_chars": float(len(prompt))}


def counted(prompt, completion, reference):
    """Scores `reference["i"]` after `reference["sleep"]` s; appends a line per finished call
    to `reference["log"]`, so a test can count how often each item was scored."""
    time.sleep(reference.get("sleep", 0.0))
    with open(reference["log"], "a") as f:
        f.write(f"{reference['i']}\n")
    return float(reference["i"])


def exact(prompt, completion, reference):
    return 1.0 if completion.strip() == str(reference).strip() else 0.0


raise_at_import = None  # tests/rewarder/broken_rewards.py fails to import
