"""Long-polled futures. The state lives in the KV bucket `openrl-futures`; this module
only keeps who is waiting on what, so any gateway replica can answer any poll.

Workers store a finished future in KV and then publish a core-NATS message on
`openrl.done.<request_id>` (the finished future itself when it is small, else empty: see
`Bus.finish_future`); one subscription per gateway wakes the local waiters, and a waiter
answers from the message's future without reading KV again. Core
NATS delivers at most once: a notification sent while the gateway was reconnecting, or
dropped because its subscription fell behind, never arrives. The bus reports both
(`Bus.on_messages_lost`), and every waiter then re-reads KV at once. Beyond that, a waiter
re-reads KV every `recheck_s` as a last resort, so N idle long polls cost N / recheck_s
KV reads a second, not a read per poll every few seconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import msgspec

from openrl.bus import subjects
from openrl.bus.client import Bus
from openrl.bus.messages import Future, decode


class _Waiter:
    """One long poll: woken by `event`; `done` holds the finished future a notification
    carried, if it carried one."""

    __slots__ = ("request_id", "event", "done")

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.event = asyncio.Event()
        self.done: Future | None = None


class Waiters:
    def __init__(self, bus: Bus, recheck_s: float = 15.0, on_finished: Callable[[str], None] | None = None):
        self.bus = bus
        self.recheck_s = recheck_s
        self.on_finished = on_finished  # told every finished request's id (subject token), waited on here or not
        self._waiters: dict[str, set[_Waiter]] = {}
        self._sub = None
        self.closing = False  # shutting down: waits return at once (pending: "try again")
        self.reads = 0  # KV reads of futures (tests and the bench look)

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(subjects.DONE_ALL, cb=self._on_done)
        self.bus.on_messages_lost.append(self.wake_all)

    async def stop(self) -> None:
        if self.wake_all in self.bus.on_messages_lost:
            self.bus.on_messages_lost.remove(self.wake_all)
        if self._sub is not None:
            await self._sub.unsubscribe()

    def wake_all(self) -> None:
        """Every waiter re-reads its future now (notifications may have been lost)."""
        for waiters in self._waiters.values():
            for w in waiters:
                w.event.set()

    def close(self) -> None:
        """Answer every long poll now (still pending ones with "try again"), and later ones at once."""
        self.closing = True
        self.wake_all()

    @property
    def pending(self) -> int:
        return sum(len(v) for v in self._waiters.values())

    async def _on_done(self, msg) -> None:
        key = msg.subject.removeprefix(f"{subjects.PREFIX}.done.")
        if self.on_finished is not None:
            self.on_finished(key)
        waiters = self._waiters.get(key)
        if not waiters:
            return
        fut = None
        if msg.data:
            try:
                fut = decode(msg.data, Future)
            except msgspec.MsgspecError:  # not ours to read: the waiters read KV, as for an empty one
                fut = None
            if fut is not None and fut.state == "pending":
                fut = None
        for w in waiters:
            if fut is not None and fut.request_id == w.request_id:
                w.done = fut
            w.event.set()

    async def wait(self, request_id: str, timeout_s: float, owner: str | None = None) -> Future | None:
        """The future once it is no longer pending, or the pending one after `timeout_s`;
        None if no such future exists. With `owner`, a future of another owner is returned
        at once, without waiting (the caller answers it as absent, as fast as a missing one)."""
        key = subjects.token(request_id)
        w = _Waiter(request_id)
        self._waiters.setdefault(key, set()).add(w)  # registered before reading: no lost wake-up
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                # Cleared before the read, never after: a notification that lands while the
                # read is in flight leaves the event set, and the wait below returns at once.
                w.event.clear()
                if w.done is not None:  # the notification carried the finished future
                    return w.done
                self.reads += 1
                fut = await self.bus.kv_get(self.bus.futures, request_id, Future)
                if fut is None or fut.state != "pending" or (owner is not None and fut.owner != owner):
                    return fut
                left = deadline - time.monotonic()
                if left <= 0 or self.closing:
                    return w.done or fut
                try:
                    await asyncio.wait_for(w.event.wait(), min(left, self.recheck_s))
                except asyncio.TimeoutError:
                    pass
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None:
                waiting.discard(w)
                if not waiting:
                    del self._waiters[key]
