"""A long pass that hands the compute thread back at block boundaries (preemption inside a pass).

The trainer's compute thread is shared fairly between API keys (compute.py), but only between
calls: a key's micro-batch of 2 x 2048 tokens holds the thread for its whole forward and
backward (over a second of CPU on the default model), and every other key's 16-token step
waits for it. `PausablePasses.run` runs such a pass on a thread of its own and turns it into a
generator: at each pause point past its time slice (the start of a decoder layer, of its
attention or MLP block, or of a chunk of the head in the forward; the gradient of a block's
output in the backward: `pause_point`, called from the engine's hooks), the
pass stops and the generator yields; the caller (the compute thread) runs other keys' calls and
resumes it with `next`. Only one thread runs at any time: the pass's thread waits while the
caller runs and the caller waits while the pass runs, handing over through two semaphores.

What a paused pass holds: its activations and its own gradients (a local list, not `.grad`),
and nothing of the model's state. Whatever ran meanwhile may have switched the active adapter,
so `on_resume` (the engine: make this tenant's adapter active again) runs before the pass goes
on. At most `max_passes` passes run or are paused at a time (`busy`): another long pass
meanwhile runs unpaused, so a trainer holds the activations of `max_passes` paused passes at most
(each one micro-batch's). Closing the generator (a request
cancelled mid-pass) stops the pass at its pause point (`PassAborted`) and waits for its thread.

CPU only (the engine's choice): on CUDA the autograd engine runs every backward of a device on
one thread of its own, so a backward paused in a hook would stall the next backward there.

    passes = PausablePasses(slice_s=0.05)
    loss = yield from passes.run(lambda: model_pass(batch), on_resume=activate)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from typing import TypeVar

from openrl import metrics

T = TypeVar("T")

_local = threading.local()


class PassAborted(BaseException):
    """Raised at a paused pass's pause point when its generator is closed. A BaseException, so
    that no `except Exception` inside the pass swallows it."""


def pause_point() -> None:
    """Hand the compute thread back if this thread runs a pausable pass whose slice is spent;
    returns when the pass is resumed. Elsewhere (any other thread, an unpausable pass) a no-op
    of one attribute lookup, so hooks may call it on every layer of every pass."""
    run = getattr(_local, "run", None)
    if run is not None:
        run.maybe_pause()


def in_pausable_pass() -> bool:
    """Whether this thread runs a pausable pass (hooks that would add pause points check first)."""
    return getattr(_local, "run", None) is not None


class _Run:
    def __init__(self, slice_s: float, on_resume: Callable[[], None]):
        self.slice_s, self.on_resume = slice_s, on_resume
        self.to_caller, self.to_pass = threading.Semaphore(0), threading.Semaphore(0)
        self.deadline = time.perf_counter() + slice_s
        self.aborted = self.finished = False
        self.result: object = None
        self.error: BaseException | None = None

    def maybe_pause(self) -> None:
        if time.perf_counter() < self.deadline:
            return
        self.to_caller.release()
        self.to_pass.acquire()
        if self.aborted:
            raise PassAborted()
        self.on_resume()
        self.deadline = time.perf_counter() + self.slice_s

    def body(self, fn: Callable[[], object]) -> None:
        _local.run = self
        try:
            self.result = fn()
        except BaseException as e:  # handed to the caller, raised there
            self.error = e
        finally:
            _local.run = None
            self.finished = True
            self.to_caller.release()


class PausablePasses:
    def __init__(self, slice_s: float, max_passes: int = 1):
        if not slice_s > 0:
            raise ValueError(f"slice_s must be > 0, got {slice_s}")
        if max_passes < 1:
            raise ValueError(f"max_passes must be >= 1, got {max_passes}")
        self.slice_s, self.max_passes = slice_s, max_passes
        self.pauses = 0  # pauses so far, over every pass (metrics, tests)
        self._running = 0

    @property
    def busy(self) -> bool:
        """`max_passes` passes run or are paused: the next one runs unpaused."""
        return self._running >= self.max_passes

    def run(self, fn: Callable[[], T], on_resume: Callable[[], None]) -> Generator[None, None, T]:
        """`fn()`'s result (its exception raised here), yielding each time it pauses. Busy, it
        runs `fn` here, at once, yielding nothing."""
        if self.busy:
            return fn()
        self._running += 1
        run = _Run(self.slice_s, on_resume)
        thread = threading.Thread(target=run.body, args=(fn,), name="compute-pass", daemon=True)
        try:
            thread.start()
            while True:
                run.to_caller.acquire()
                if run.finished:
                    break
                self.pauses += 1
                metrics.PASS_PAUSES.inc()
                try:
                    yield
                except BaseException:  # closed (GeneratorExit) or thrown into: stop the pass first
                    run.aborted = True
                    run.to_pass.release()
                    thread.join()
                    raise
                run.to_pass.release()
            thread.join()
        finally:
            self._running -= 1
        if run.error is not None:
            raise run.error
        return run.result  # type: ignore[return-value]
