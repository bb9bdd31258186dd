"""The admission queue's RetryInfo arithmetic (pure code, a made-up clock, no server)."""

from __future__ import annotations

import asyncio

import pytest

from broker.admission import MIN_RETRY_AFTER_S, Admission, QueueFullError


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
