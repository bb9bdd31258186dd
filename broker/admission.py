"""Admission: a bounded, fail-fast queue in front of each database's pool.

pymongo's pool makes callers wait for a connection without limit on how many
wait, and under a time limit (CSOT) it ignores waitQueueTimeoutMS and waits
out the whole deadline. A broker that lets work pile up like that turns a slow
database into thousands of stuck calls. So every database round trip (a find,
each getMore, an insert; pings skip the queue) first takes one of `max_pool_size` slots
here:

- a free slot is taken at once;
- otherwise the call waits, at most `wait_queue_timeout_ms` (or its own
  deadline, if sooner), with at most `max_waiting` calls waiting;
- a full queue, or a wait that runs out, is refused at once with
  RESOURCE_EXHAUSTED and a RetryInfo saying when to come back: about when
  the queue in front of the caller will have turned over (see
  `Admission.retry_after`).

Slots are held only for a round trip, never while a Find stream waits for its
client to read, so a slow reader cannot starve the others. The pool itself
is pymongo's: with at most `max_pool_size` round trips admitted, its own wait
queue stays empty.

Each database has its own queue, so a burst on one cannot starve another.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Final

import grpc

from broker.errors import Reason, RpcError

__all__ = ["MIN_RETRY_AFTER_S", "Admission", "QueueFullError"]

# The shortest RetryInfo delay: below a few milliseconds a retry is a busy
# loop that only adds to the load.
MIN_RETRY_AFTER_S: Final = 0.005
# Hold times are averaged over the current and the previous window, so the
# hint follows the recent load, not the whole uptime.
_WINDOW_S: Final = 10.0


class QueueFullError(RpcError):
    """RESOURCE_EXHAUSTED: the database's wait queue is full or the wait ran out."""

    def __init__(self, message: str, database: str, retry_after_s: float) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            message,
            Reason.POOL_EXHAUSTED,
            {"database": database},
            retry_after_s=retry_after_s,
        )


class Admission:
    """The bounded wait queue of one database."""

    def __init__(
        self,
        database: str,
        slots: int,
        max_waiting: int,
        wait_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database = database
        self.slots = slots
        self.max_waiting = max_waiting
        self.wait_timeout_s = wait_timeout_s
        self._free = slots
        self._clock = clock
        # Slot-seconds held and holds ended, in this window and the last:
        # their ratio is the recent mean hold time (see retry_after).
        now = clock()
        self._window_start = now
        self._changed = now
        self._busy_s = [0.0, 0.0]
        self._holds = [0, 0]
        # FIFO of waiters: first come, first served within a database.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.waiting_max = 0
        self.rejected_full = 0
        self.rejected_timeout = 0

    @property
    def in_use(self) -> int:
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def would_wait(self) -> bool:
        """Whether an acquire now would queue: no free slot, or others already waiting."""
        return self._free <= 0 or bool(self._waiters)

    def _state(self) -> str:
        return f"{self.in_use}/{self.slots} connections busy, {self.waiting}/{self.max_waiting} calls waiting"

    def _account(self) -> None:
        """Add the slot-seconds held since the last change; roll the window when due."""
        now = self._clock()
        self._busy_s[0] += self.in_use * (now - self._changed)
        self._changed = now
        elapsed = now - self._window_start
        if elapsed >= _WINDOW_S:
            # After a whole idle window the last one is history too.
            recent = elapsed < 2 * _WINDOW_S
            self._busy_s = [0.0, self._busy_s[0] if recent else 0.0]
            self._holds = [0, self._holds[0] if recent else 0]
            self._window_start = now

    def mean_hold_s(self) -> float:
        """The recent mean time a slot is held for one round trip.

        Holds still running count with their age so far, so the figure
        exists (and is not too low) from the first refusal on.
        """
        self._account()
        holds = sum(self._holds) + self.in_use
        return sum(self._busy_s) / holds if holds else 0.0

    def retry_after(self) -> float:
        """The RetryInfo delay for a refused call: when the queue will have turned over.

        The slots serve round trips at ``slots / mean_hold`` per second, so
        the calls waiting now, and the refused one after them, are through
        after ``mean_hold * (waiting + 1) / slots``. Clamped to at least
        MIN_RETRY_AFTER_S and at most wait_queue_timeout_ms: a call that
        comes back then waits in the queue for the rest, as long as it would
        have been allowed to.
        """
        estimate = self.mean_hold_s() * (self.waiting + 1) / self.slots
        return min(max(estimate, MIN_RETRY_AFTER_S), max(self.wait_timeout_s, MIN_RETRY_AFTER_S))

    async def acquire(self, remaining_s: float) -> float:
        """Take a slot, waiting as configured; returns the seconds spent waiting.

        Every successful acquire must be paired with exactly one `release`.
        """
        if self._free > 0 and not self._waiters:
            self._account()
            self._free -= 1
            return 0.0
        if len(self._waiters) >= self.max_waiting:
            self.rejected_full += 1
            raise QueueFullError(
                f"database {self.database!r} is saturated ({self._state()}); "
                f"back off and retry, or raise max_pool_size / max_waiting",
                self.database,
                self.retry_after(),
            )
        timeout = min(self.wait_timeout_s, remaining_s)
        start = time.monotonic()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.waiting_max = max(self.waiting_max, len(self._waiters))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return time.monotonic() - start  # granted just as the wait ran out
            self._waiters.remove(waiter)
            waiter.cancel()
            if remaining_s <= self.wait_timeout_s:
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the call's deadline ran out while waiting for a connection to "
                    f"database {self.database!r} ({self._state()})",
                    Reason.TIMEOUT,
                    {"database": self.database},
                ) from None
            self.rejected_timeout += 1
            raise QueueFullError(
                f"no connection to database {self.database!r} became free within "
                f"wait_queue_timeout_ms ({self.wait_timeout_s * 1000:.0f} ms; {self._state()}); "
                "back off and retry, or raise max_pool_size",
                self.database,
                self.retry_after(),
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, but the caller left: pass it on
            else:
                self._waiters.remove(waiter)
                waiter.cancel()
            raise
        return time.monotonic() - start

    def release(self) -> None:
        self._account()
        self._holds[0] += 1
        # Hand the slot straight to the oldest waiter, so a newcomer cannot
        # overtake the queue.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
