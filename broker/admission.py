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
  RESOURCE_EXHAUSTED and a RetryInfo saying when to come back.

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

import grpc

from broker.errors import Reason, RpcError

__all__ = ["Admission", "QueueFullError"]


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

    def __init__(self, database: str, slots: int, max_waiting: int, wait_timeout_s: float) -> None:
        self.database = database
        self.slots = slots
        self.max_waiting = max_waiting
        self.wait_timeout_s = wait_timeout_s
        self._free = slots
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

    def _state(self) -> str:
        return f"{self.in_use}/{self.slots} connections busy, {self.waiting}/{self.max_waiting} calls waiting"

    def _retry_after(self) -> float:
        # Roughly one wait-queue timeout: by then the queue has turned over.
        return max(0.05, min(self.wait_timeout_s, 1.0))

    async def acquire(self, remaining_s: float) -> float:
        """Take a slot, waiting as configured; returns the seconds spent waiting.

        Every successful acquire must be paired with exactly one `release`.
        """
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return 0.0
        if len(self._waiters) >= self.max_waiting:
            self.rejected_full += 1
            raise QueueFullError(
                f"database {self.database!r} is saturated ({self._state()}); "
                f"back off and retry, or raise max_pool_size / max_waiting",
                self.database,
                self._retry_after(),
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
                self._retry_after(),
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
        # Hand the slot straight to the oldest waiter, so a newcomer cannot
        # overtake the queue.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
