"""A reward worker process: loads one reward function and calls it, one item at a time.

Started by `pool.Pool` as `python -m openrl.rewarder <name> worker <module:fn>`, so `ps`
shows which reward it serves. It talks to its parent over its original stdin/stdout with
length-prefixed msgpack frames (a chunk of `ScoreItem`s in; one `ItemScore` out per item, in
order, each sent as soon as its call returns, so the parent times each call); user code sees
/dev/null as stdin and the log (stderr) as stdout, so a `print` cannot corrupt a frame.

Everything that can go wrong inside the call (an exception, a result that is not a float
or a dict of floats, running out of its address-space limit) comes back as an error for
that item. What cannot be caught here (a segfault, `os._exit`, a hang) the parent sees as
a dead or silent child, and kills and replaces it.

User code runs with a scrubbed environment (`scrubbed_env`): no bus credentials, no API keys,
no `OPENRL_*` setting, nothing named like a secret, unless the operator passes it by name.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import math
import numbers
import os
import re
import resource
import signal
import struct
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import BinaryIO

import msgspec

from openrl.bus.messages import ItemScore, ScoreItem

_HEADER = struct.Struct("<I")
MAX_ERROR_CHARS = 2000

# Names a reward function's environment never has (unless passed by name): the bus's and the
# gateway's settings and credentials, and whatever looks like a secret.
_SECRET_NAME = re.compile(r"^(OPENRL_|NATS_|TINKER_)|TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|AUTH|(^|_)(API_?)?KEYS?$", re.IGNORECASE)


def scrubbed_env(environ: Mapping[str, str], pass_env: tuple[str, ...] = ()) -> dict[str, str]:
    """`environ` without what user code must not see: bus credentials, API keys, `OPENRL_*`,
    and any variable named like a secret (`*TOKEN*`, `*SECRET*`, `*PASSWORD*`, `*AUTH*`, `*_KEY`, ...).
    `pass_env` names variables to keep anyway (say, the API key of an LLM judge); never the
    bus's own (`OPENRL_*`, `NATS_*`)."""
    keep = {k for k in pass_env if not k.upper().startswith(("OPENRL_", "NATS_"))}
    return {k: v for k, v in environ.items() if k in keep or not _SECRET_NAME.search(k)}


class Ready(msgspec.Struct, frozen=True, kw_only=True):
    """The first frame a worker sends: it loaded the function (or why it could not)."""

    pid: int
    error: str | None = None


def load_reward_fn(spec: str) -> Callable:
    """`"my_pkg.rewards:exact_match"` -> the callable. Raises ValueError with a clear message."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function must be given as module:function, got {spec!r}")
    module = importlib.import_module(module_name)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"{module_name} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{spec} is not callable")
    return fn


def to_score(value: object) -> ItemScore:
    """A reward function's return value as an ItemScore: a float, or a dict of named floats
    whose reward is its "reward" entry (or the sum of its entries when it has none)."""
    if isinstance(value, numbers.Real):
        reward = float(value)
        if not math.isfinite(reward):
            return ItemScore(error=f"reward function returned {reward}", error_kind="bad_result")
        return ItemScore(reward=reward)
    if isinstance(value, Mapping) and value:
        metrics: dict[str, float] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                return ItemScore(error=f"reward function returned a dict with entry {k!r}: {v!r}; expected str keys and finite floats",
                                 error_kind="bad_result")  # fmt: skip
            metrics[k] = float(v)
        return ItemScore(reward=metrics.get("reward", sum(metrics.values())), metrics=metrics)
    shown = repr(value)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    return ItemScore(error=f"reward function returned {type(value).__name__} {shown}; expected a float or a dict of floats",
                     error_kind="bad_result")  # fmt: skip


def call(fn: Callable, item: ScoreItem, loop: asyncio.AbstractEventLoop, memory_mb: int) -> ItemScore:
    try:
        reference = msgspec.json.decode(item.reference)
        value = fn(item.prompt, item.completion, reference)
        if inspect.isawaitable(value):
            value = loop.run_until_complete(value)
        return to_score(value)
    except MemoryError:
        return ItemScore(error=f"reward function ran out of memory (limit {memory_mb} MB)", error_kind="memory")
    except BaseException as e:  # noqa: BLE001 - user code: SystemExit and KeyboardInterrupt are its errors too
        traceback.print_exc(file=sys.stderr)
        text = f"{type(e).__name__}: {e}"
        return ItemScore(error=text[:MAX_ERROR_CHARS], error_kind="exception")


def _read(inp: BinaryIO, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = inp.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _send(out: BinaryIO, msg: msgspec.Struct) -> None:
    data = msgspec.msgpack.encode(msg)
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def _isolate(parent_pid: int, memory_mb: int) -> tuple[BinaryIO, BinaryIO]:
    """Take the protocol pipes away from user code, die with the parent, cap memory."""
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # print() goes to the log
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: a kill -9 of the rewarder takes us along
        libc.prctl(15, b"openrl-rewardfn", 0, 0, 0)  # PR_SET_NAME, what `ps -o comm` and top show
    except (OSError, AttributeError):  # not Linux: the parent's pipe closing still ends us
        pass
    if os.getppid() != parent_pid:  # the parent died before PDEATHSIG was armed
        os._exit(0)
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return inp, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrl.rewarder")
    p.add_argument("name")
    p.add_argument("role", choices=["worker"])
    p.add_argument("fn")
    p.add_argument("--memory-mb", type=int, default=0)
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    inp, out = _isolate(args.parent, args.memory_mb)
    try:
        fn = load_reward_fn(args.fn)
    except BaseException as e:  # noqa: BLE001 - an import error of any kind is reported, not raised
        traceback.print_exc(file=sys.stderr)
        _send(out, Ready(pid=os.getpid(), error=f"cannot load reward function {args.fn}: {type(e).__name__}: {e}"[:MAX_ERROR_CHARS]))
        os._exit(1)
    _send(out, Ready(pid=os.getpid()))
    loop = asyncio.new_event_loop()
    decoder = msgspec.msgpack.Decoder(list[ScoreItem])
    while True:
        header = _read(inp, _HEADER.size)
        if header is None:  # the parent closed the pipe: we are done
            break
        data = _read(inp, _HEADER.unpack(header)[0])
        if data is None:
            break
        for item in decoder.decode(data):
            score = call(fn, item, loop, args.memory_mb)
            sys.stdout.flush()
            _send(out, score)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: user code may have left threads behind
