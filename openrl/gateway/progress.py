"""Training requests too far ahead of their model are refused before they reach the train log.

The trainer refuses a request more than its window (`--max-seq-ahead`) past the model's next
seq_id, but by then its body is in the train log, which is purged only below snapshots: a key
sending far-ahead bodies would grow the log without bound. The gateway refuses them first.

Where progress comes from: the futures the trainer finishes. Request ids of training requests
are `request_id("train", model, seq_id)`, so seq_id S is within the window of a model whose
next seq_id is N (S - N <= W) exactly when seq_id S - W - 1 is applied, i.e. its future is
finished. Per model the gateway keeps the highest seq_id it has seen finished (a lower bound
of progress, never wrong when stale: it only moves up) and, for a short TTL, the seq_id it
found unfinished; only a request that looks too far ahead by these reads one future. A future
that cannot tell (expired with the futures bucket's TTL, or refused by the trainer as too far
ahead itself) lets the request through: the trainer's own check stays the backstop.

A refused request fills nothing: the model has not reached its place, so its seq_id stays
open, and a request with that seq_id sent once the model has caught up is applied as usual
(docs/limits.md). So the refusal is a 429 with Retry-After, not a 400: the SDK sends the same
request again after its back-off (for up to 5 minutes) instead of giving up on that seq_id
and moving on, which would leave a hole that every later request of the model waits behind.
A client pipelining more than the window ahead is slowed down, never stranded.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from openrl.bus.client import Bus
from openrl.bus.messages import Future, ModelRecord
from openrl.gateway.http import Backlogged, request_id

# A trainer's future error for a request it refused as too far ahead (trainer.service.TOO_FAR_AHEAD;
# the gateway may not import the trainer).
TOO_FAR_AHEAD = "too far ahead"
MAX_MODELS = 65536  # models whose progress is cached (least recently used dropped)


class TooFarAhead(Backlogged):
    """A sequenced request more than the window past its model's progress: 429 with
    Retry-After, nothing recorded (the client sends it again once the model has caught up)."""


class Progress:
    def __init__(self, bus: Bus, window: int, *, ttl_s: float = 1.0, futures_ttl_s: float | None = None):
        self.bus = bus
        self.window = window
        self.ttl_s = ttl_s
        self.futures_ttl_s = futures_ttl_s if futures_ttl_s is not None else bus.cfg.futures_ttl_s
        self.applied: OrderedDict[str, int] = OrderedDict()  # model -> a seq_id known finished
        self.unfinished: OrderedDict[str, tuple[int, float]] = OrderedDict()  # model -> (seq_id found unfinished, when)
        self.reads = 0  # futures read (tests and the bench look)

    def _put(self, d: OrderedDict, key: str, value) -> None:
        d[key] = value
        d.move_to_end(key)
        while len(d) > MAX_MODELS:
            d.popitem(last=False)

    async def check(self, rec: ModelRecord, seq_id: int) -> None:
        """TooFarAhead when seq_id is more than the window past the model's next seq_id."""
        if self.window <= 0:
            return
        k = seq_id - self.window - 1  # must be applied for seq_id to be within the window
        model = rec.model_id
        if k < 1 or self.applied.get(model, 0) >= k:
            return
        seen = self.unfinished.get(model)
        if seen is None or k < seen[0] or time.monotonic() - seen[1] > self.ttl_s:
            self.reads += 1
            fut = await self.bus.kv_get(self.bus.futures, request_id("train", model, k), Future)
            if fut is not None and fut.state != "pending":
                if fut.state == "failed" and (fut.error or "").startswith(TOO_FAR_AHEAD):
                    return  # refused by the trainer, maybe skipped since: the trainer decides
                self._put(self.applied, model, max(k, self.applied.get(model, 0)))
                return
            if fut is None and time.time() - rec.created_at > self.futures_ttl_s:
                return  # its future may have expired: the trainer decides
            self._put(self.unfinished, model, (k, time.monotonic()))
        raise TooFarAhead(
            f"seq_id {seq_id} is too far ahead: at most {self.window} requests may wait past the model's next seq_id, "
            f"and seq_id {k} is not finished yet. Nothing was recorded for seq_id {seq_id}: send it again once the "
            f"model's earlier requests have finished (retry after the back-off)"
        )
