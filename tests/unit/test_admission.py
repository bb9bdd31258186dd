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

from broker.admission import Admission, QueueFullError
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
