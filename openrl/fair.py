"""Fair shares of a worker's compute between API keys: start-time fair queuing.

Every key has a virtual time. Among the work that is ready, the next to run is the work of the
key whose virtual time is lowest (in arrival order within a key, and between keys that tie);
running it advances that key's virtual time by its cost (tokens) divided by the key's weight
(1 unless set). The worker's virtual time is the start of the last work picked; a key that had
nothing waiting rejoins there, so idle time banks no credit, while a key that just ran a big
request carries it as debt: the others go first until they have run as much. It never holds
work back: a key alone is served at once, whatever its debt.

    share = FairShare()
    i = share.pick(ready, key=lambda r: r.owner)      # what runs next
    share.charge(ready[i].owner, tokens)              # it ran: its key moves on

One per worker (the trainer's compute thread, a sampler's batch admission); the owner key of
the work is the caller's. Pure Python, no I/O; one thread or one event loop at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class FairShare:
    def __init__(self, weights: dict[str, float] | None = None, *, remember: int = 4096):
        self.weights = dict(weights or {})
        self.now = 0.0  # the virtual time: where an idle or new key (re)joins
        self._vt: dict[str, float] = {}  # keys ahead of `now` (the others are at `now`)
        self._remember = remember

    def vtime(self, key: str) -> float:
        """When `key`'s next work would start, in virtual time."""
        return max(self._vt.get(key, 0.0), self.now)

    def pick(self, items: Sequence[T], key: Callable[[T], str]) -> int:
        """The index of the item to run next (the first of the lowest virtual time); -1 if none."""
        best, best_vt = -1, 0.0
        for i, item in enumerate(items):
            vt = self.vtime(key(item))
            if best < 0 or vt < best_vt:
                best, best_vt = i, vt
        return best

    def order(self, items: Sequence[T], key: Callable[[T], str]) -> list[T]:
        """`items` in the order they would run if nothing were charged meanwhile (stable)."""
        return sorted(items, key=lambda item: self.vtime(key(item)))

    def charge(self, key: str, cost: float, *, advance: bool = True) -> float:
        """`key` starts work of `cost` now: the virtual time moves to its start (unless not
        `advance`: work that rides along with what was picked), the key's past it by cost /
        weight. Returns the key's new virtual time (when its work finishes)."""
        start = self.vtime(key)
        if advance:
            self.now = start
        finish = start + max(cost, 0.0) / self.weights.get(key, 1.0)
        self._vt[key] = finish
        if len(self._vt) > self._remember:  # keys at or behind `now` rejoin there anyway
            self._vt = {k: v for k, v in self._vt.items() if v > self.now}
        return finish
