"""The pool-size advice (Little's law over the last minute), from synthetic samples."""

from __future__ import annotations

import pytest

from broker.monitoring import DatabaseStats, Reservoir, _Sample


def _stats(max_pool_size: int = 10, min_pool_size: int = 1) -> DatabaseStats:
    return DatabaseStats.create("appdb", max_pool_size, min_pool_size)


def _feed(stats: DatabaseStats, samples: list[tuple[float, int, float, float]]) -> None:
    for at, trips, busy, queued in samples:
        stats._samples.append(_Sample(at, trips, busy, queued))


def test_too_few_samples_advise_the_configured_size() -> None:
    stats = _stats(max_pool_size=7)
    _feed(stats, [(0.0, 0, 0.0, 0.0)])
    advice = stats.advice()
    assert (advice.recommended, advice.demand, advice.arrival_rate) == (7, 0.0, 0.0)


def test_demand_is_busy_plus_waiting_per_second_and_the_advice_adds_a_quarter() -> None:
    stats = _stats()
    # Second 1: 2.0 s of hold time and 0.4 s of queue time -> 2.4 connections wanted.
    # Second 2: 1.0 s of hold time, nothing queued -> 1.0.
    _feed(stats, [(0.0, 0, 0.0, 0.0), (1.0, 400, 2.0, 0.4), (2.0, 600, 3.0, 0.4)])
    advice = stats.advice()
    assert advice.demand == pytest.approx(2.4)
    assert advice.recommended == 3  # ceil(2.4 * 1.25)
    assert advice.arrival_rate == pytest.approx(300.0)  # 600 round trips in 2 s
    assert advice.mean_hold_ms == pytest.approx(5.0)  # 3.0 s over 600 round trips
    assert advice.window_s == pytest.approx(2.0)


def test_the_advice_never_drops_below_the_warm_minimum_or_one() -> None:
    idle = _stats(min_pool_size=0)
    _feed(idle, [(0.0, 0, 0.0, 0.0), (1.0, 0, 0.0, 0.0)])
    assert idle.advice().recommended == 1
    warm = _stats(min_pool_size=4)
    _feed(warm, [(0.0, 0, 0.0, 0.0), (1.0, 10, 0.01, 0.0)])
    assert warm.advice().recommended == 4


def test_a_too_small_pool_is_warned_about_at_most_every_five_minutes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = _stats(max_pool_size=2)
    # Half a minute of samples, each second wanting 4 connections.
    _feed(stats, [(float(s), 100 * s, 3.0 * s, 1.0 * s) for s in range(40)])
    stats.warn_if_mis_sized(now=1000.0)
    stats.warn_if_mis_sized(now=1100.0)
    warnings = [r for r in caplog.records if "callers are waiting" in r.getMessage()]
    assert len(warnings) == 1
    assert "consider max_pool_size=5" in warnings[0].getMessage()


def test_a_mostly_idle_large_pool_is_warned_about() -> None:
    stats = _stats(max_pool_size=20)
    _feed(stats, [(float(s), 10 * s, 0.5 * s, 0.0) for s in range(40)])
    assert stats.advice().recommended == 1
    stats.warn_if_mis_sized(now=1000.0)
    assert stats._last_warning == 1000.0


def test_the_reservoir_keeps_recent_samples_and_the_all_time_maximum() -> None:
    reservoir = Reservoir(size=4)
    for value in (9.0, 1.0, 2.0, 3.0, 4.0):
        reservoir.add(value)
    assert reservoir.maximum == 9.0 and reservoir.count == 5
    assert reservoir.percentile(50) == 2.0  # of the last four: 1, 2, 3, 4
    assert reservoir.percentile(100) == 4.0
    assert Reservoir().percentile(99) == 0.0
