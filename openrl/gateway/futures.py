"""Long-polled futures. The state lives in the KV bucket `openrl-futures`; this module
only keeps who is waiting on what, so any gateway replica can answer any poll.

Workers store a finished future in KV and then publish an empty core-NATS message on
`openrl.done.<request_id>`; one subscription per gateway wakes the local waiters. A
missed notification (a reconnect) costs at most `recheck_s` of extra latency, because
waiters re-read KV on that period anyway.
"""

from __future__ import annotations

import asyncio
import time

from openrl.bus import subjects
from openrl.bus.client import Bus
from openrl.bus.messages import Future


class Waiters:
    def __init__(self, bus: Bus, recheck_s: float = 2.0):
        self.bus = bus
        self.recheck_s = recheck_s
        self._events: dict[str, set[asyncio.Event]] = {}
        self._sub = None
        self.closing = False  # shutting down: waits return at once (pending: "try again")

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(subjects.DONE_ALL, cb=self._on_done)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def close(self) -> None:
        """Answer every long poll now (still pending ones with "try again"), and later ones at once."""
        self.closing = True
        for events in self._events.values():
            for event in events:
                event.set()

    @property
    def pending(self) -> int:
        return sum(len(v) for v in self._events.values())

    async def _on_done(self, msg) -> None:
        key = msg.subject.removeprefix(f"{subjects.PREFIX}.done.")
        for event in self._events.get(key, ()):
            event.set()

    async def wait(self, request_id: str, timeout_s: float) -> Future | None:
        """The future once it is no longer pending, or the pending one after `timeout_s`;
        None if no such future exists."""
        key = subjects.token(request_id)
        event = asyncio.Event()
        self._events.setdefault(key, set()).add(event)  # register before reading: no lost wake-up
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                fut = await self.bus.kv_get(self.bus.futures, request_id, Future)
                if fut is None or fut.state != "pending":
                    return fut
                left = deadline - time.monotonic()
                if left <= 0 or self.closing:
                    return fut
                event.clear()
                try:
                    await asyncio.wait_for(event.wait(), min(left, self.recheck_s))
                except asyncio.TimeoutError:
                    pass
        finally:
            waiting = self._events.get(key)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._events[key]
