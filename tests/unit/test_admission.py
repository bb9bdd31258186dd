"""The admission queue (broker.admission.Admission) on its own: no server, no gRPC.

Each test runs its own event loop, so races between release, timeout and
cancellation are driven step by step rather than through database timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import pytest

from broker.admission import MIN_RETRY_AFTER_S, Admission, QueueFullError
from broker.errors import Reason, RpcError

_T = TypeVar("_T")


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


async def _settle() -> None:
    # Let every ready callback and task step run.
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_free_slot_is_taken_at_once_and_given_back() -> None:
    async def scenario() -> None:
        queue = Admission("appdb", slots=2, max_waiting=1, wait_timeout_s=1.0)
        assert await queue.acquire(5.0) == 0.0
        assert await queue.acquire(5.0) == 0.0
        assert (queue.in_use, queue.waiting) == (2, 0)
        queue.release()
        queue.release()
        assert queue.in_use == 0

    run(scenario())


def test_waiters_are_served_first_come_first_served() -> None:
    async def scenario() -> list[int]:
        queue = Admission("appdb", slots=1, max_waiting=5, wait_timeout_s=5.0)
        await queue.acquire(5.0)
        order: list[int] = []

        async def wait(n: int) -> None:
            await queue.acquire(5.0)
            order.append(n)

        tasks = [asyncio.create_task(wait(n)) for n in range(3)]
        await _settle()
        assert queue.waiting == 3 and queue.waiting_max == 3
        for _ in range(3):
            queue.release()
            await _settle()
        await asyncio.gather(*tasks)
        return order

    assert run(scenario()) == [0, 1, 2]


def test_a_newcomer_cannot_overtake_a_waiter() -> None:
    async def scenario() -> None:
        queue = Admission("appdb", slots=1, max_waiting=5, wait_timeout_s=5.0)
        await queue.acquire(5.0)
        waiter = asyncio.create_task(queue.acquire(5.0))
        await _settle()
        queue.release()  # handed to the waiter, not put back as free
        newcomer = asyncio.create_task(queue.acquire(0.05))
        await _settle()
        assert waiter.done() and not newcomer.done()
        with pytest.raises(RpcError):
            await newcomer

    run(scenario())


def test_a_full_queue_is_refused_at_once_with_a_retry_hint() -> None:
    async def scenario() -> None:
        queue = Admission("appdb", slots=1, max_waiting=1, wait_timeout_s=5.0)
        await queue.acquire(5.0)
        waiter = asyncio.create_task(queue.acquire(5.0))
        await _settle()
        with pytest.raises(QueueFullError) as refused:
            await queue.acquire(5.0)
        error = refused.value
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.POOL_EXHAUSTED)
        assert error.metadata == {"database": "appdb"}
        assert error.retry_after_s is not None and 0 < error.retry_after_s <= 5.0
        assert "1/1 connections busy, 1/1 calls waiting" in error.message
        assert queue.rejected_full == 1
        queue.release()
        await waiter

    run(scenario())


def test_a_wait_that_outlasts_wait_queue_timeout_is_pool_exhausted() -> None:
    async def scenario() -> None:
        queue = Admission("appdb", slots=1, max_waiting=5, wait_timeout_s=0.02)
        await queue.acquire(5.0)
        with pytest.raises(QueueFullError) as refused:
            await queue.acquire(5.0)
        assert "wait_queue_timeout_ms (20 ms" in refused.value.message
        assert (queue.waiting, queue.rejected_timeout) == (0, 1)
        queue.release()
        assert queue.in_use == 0  # the timed-out waiter took nothing with it

    run(scenario())


def test_a_wait_cut_short_by_the_callers_deadline_is_deadline_exceeded() -> None:
    async def scenario() -> None:
        queue = Admission("appdb", slots=1, max_waiting=5, wait_timeout_s=5.0)
        await queue.acquire(5.0)
        with pytest.raises(RpcError) as refused:
            await queue.acquire(0.02)
        assert (refused.value.code, refused.value.reason) == (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            Reason.TIMEOUT,
        )
        assert queue.rejected_timeout == 0 and queue.waiting == 0

    run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_takes_no_slot() -> None:
    async def scenario() -> None:
        queue = Admission("appdb", slots=1, max_waiting=5, wait_timeout_s=5.0)
        await queue.acquire(5.0)
        waiter = asyncio.create_task(queue.acquire(5.0))
        await _settle()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert queue.waiting == 0
        queue.release()
        assert queue.in_use == 0

    run(scenario())


def test_a_waiter_cancelled_just_after_its_grant_never_loses_the_slot() -> None:
    async def scenario() -> None:
        queue = Admission("appdb", slots=1, max_waiting=5, wait_timeout_s=5.0)
        await queue.acquire(5.0)
        first = asyncio.create_task(queue.acquire(5.0))
        second = asyncio.create_task(queue.acquire(5.0))
        await _settle()
        queue.release()  # granted to `first`, which has not run yet...
        first.cancel()  # ...and is cancelled before it does
        try:
            await first
        except asyncio.CancelledError:
            pass  # it passed the slot on to the next waiter
        else:
            # asyncio.wait_for may deliver the result and drop the
            # cancellation: then `first` holds the slot and gives it back.
            queue.release()
        await asyncio.wait_for(second, 1.0)
        assert queue.in_use == 1 and queue.waiting == 0
        queue.release()
        assert queue.in_use == 0

    run(scenario())


def test_a_grant_that_lands_as_the_wait_runs_out_is_kept() -> None:
    async def scenario() -> None:
        queue = Admission("appdb", slots=1, max_waiting=5, wait_timeout_s=0.05)
        await queue.acquire(5.0)
        waiter = asyncio.create_task(queue.acquire(5.0))
        await asyncio.sleep(0.049)
        queue.release()
        await waiter  # granted or refused, the books must balance
        assert queue.waiting == 0 and queue.in_use == 1
        queue.release()
        assert queue.in_use == 0

    run(scenario())


# --- the RetryInfo hint: when the queue in front of a refused call turns over ---


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _admission(clock: Clock, slots: int = 1, max_waiting: int = 50, wait_timeout_s: float = 1.0) -> Admission:
    return Admission(
        "appdb", slots=slots, max_waiting=max_waiting, wait_timeout_s=wait_timeout_s, clock=clock
    )


async def _hold(admission: Admission, clock: Clock, seconds: float) -> None:
    await admission.acquire(10.0)
    clock.advance(seconds)
    admission.release()


def _holds(admission: Admission, clock: Clock, count: int, seconds: float) -> None:
    async def run() -> None:
        for _ in range(count):
            await _hold(admission, clock, seconds)

    asyncio.run(run())


def _hint_with_waiting(admission: Admission, waiting: int) -> float:
    """``retry_after`` with every slot held (for no time) and ``waiting`` calls queued."""

    async def run() -> float:
        for _ in range(admission.slots):
            await admission.acquire(10.0)
        waiters = [asyncio.ensure_future(admission.acquire(10.0)) for _ in range(waiting)]
        await asyncio.sleep(0)
        assert admission.waiting == waiting
        hint = admission.retry_after()
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        return hint

    return asyncio.run(run())


def test_mean_hold_counts_finished_and_running_holds():
    clock = Clock()
    admission = _admission(clock, slots=2)
    assert admission.mean_hold_s() == 0.0
    _holds(admission, clock, 3, 0.002)
    assert admission.mean_hold_s() == pytest.approx(0.002)
    # One hold running for 8 ms so far: four holds, 14 ms held in all.
    asyncio.run(admission.acquire(10.0))
    clock.advance(0.008)
    assert admission.mean_hold_s() == pytest.approx(0.014 / 4)


def test_the_hint_is_the_time_for_the_queue_in_front_to_turn_over():
    clock = Clock()
    admission = _admission(clock, slots=4, max_waiting=50, wait_timeout_s=1.0)
    _holds(admission, clock, 100, 0.002)
    assert admission.mean_hold_s() == pytest.approx(0.002)
    # Nobody waiting: the next slot frees in about a quarter of a hold, so the floor.
    assert admission.retry_after() == MIN_RETRY_AFTER_S
    # 50 waiting and the refused one, served four at a time, 2 ms each (the
    # four holds just taken count as holds of no time yet).
    assert _hint_with_waiting(admission, 50) == pytest.approx(0.2 / 104 * 51 / 4)


def test_the_hint_is_at_most_the_wait_queue_timeout():
    clock = Clock()
    admission = _admission(clock, slots=2, wait_timeout_s=0.2)
    _holds(admission, clock, 5, 0.5)
    assert _hint_with_waiting(admission, 10) == 0.2
    # And never below the floor, even with a tiny wait_queue_timeout_ms.
    tiny = _admission(clock, wait_timeout_s=0.001)
    assert tiny.retry_after() == MIN_RETRY_AFTER_S


def test_the_hint_follows_the_recent_load():
    clock = Clock()
    admission = _admission(clock, slots=1)
    _holds(admission, clock, 10, 1.0)
    assert admission.mean_hold_s() == pytest.approx(1.0)
    clock.advance(60)  # long idle: the slow holds are history
    _holds(admission, clock, 10, 0.002)
    assert admission.mean_hold_s() == pytest.approx(0.002)


def test_a_full_queue_is_refused_with_the_hint():
    clock = Clock()
    admission = _admission(clock, slots=1, max_waiting=1, wait_timeout_s=1.0)
    _holds(admission, clock, 20, 0.003)

    async def run() -> QueueFullError:
        await admission.acquire(10.0)
        clock.advance(0.003)
        waiter = asyncio.ensure_future(admission.acquire(10.0))
        await asyncio.sleep(0)
        assert admission.waiting == 1
        with pytest.raises(QueueFullError) as refused:
            await admission.acquire(10.0)
        admission.release()
        await waiter
        admission.release()
        return refused.value

    error = asyncio.run(run())
    # 3 ms holds, one waiting and the refused one on one slot: about 6 ms, not a second.
    assert error.retry_after_s == pytest.approx(0.006)
    assert error.reason == "POOL_EXHAUSTED"
