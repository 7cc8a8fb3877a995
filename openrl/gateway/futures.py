"""Long-polled futures. The state lives in the KV bucket `openrl-futures`; this module
only keeps who is waiting on what, so any gateway replica can answer any poll.

Workers store a finished future in KV and then publish an empty core-NATS message on
`openrl.done.<request_id>`; one subscription per gateway wakes the local waiters. Core
NATS delivers at most once: a notification sent while the gateway was reconnecting, or
dropped because its subscription fell behind, never arrives. The bus reports both
(`Bus.on_messages_lost`), and every waiter then re-reads KV at once. Beyond that, a waiter
re-reads KV every `recheck_s` as a last resort, so N idle long polls cost N / recheck_s
KV reads a second, not a read per poll every few seconds.
"""

from __future__ import annotations

import asyncio
import time

from openrl.bus import subjects
from openrl.bus.client import Bus
from openrl.bus.messages import Future


class Waiters:
    def __init__(self, bus: Bus, recheck_s: float = 15.0):
        self.bus = bus
        self.recheck_s = recheck_s
        self._events: dict[str, set[asyncio.Event]] = {}
        self._sub = None
        self.closing = False  # shutting down: waits return at once (pending: "try again")

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
        for events in self._events.values():
            for event in events:
                event.set()

    def close(self) -> None:
        """Answer every long poll now (still pending ones with "try again"), and later ones at once."""
        self.closing = True
        self.wake_all()

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
                # Cleared before the read, never after: a notification that lands while the
                # read is in flight leaves the event set, and the wait below returns at once.
                event.clear()
                fut = await self.bus.kv_get(self.bus.futures, request_id, Future)
                if fut is None or fut.state != "pending":
                    return fut
                left = deadline - time.monotonic()
                if left <= 0 or self.closing:
                    return fut
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
