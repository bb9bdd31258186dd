"""pymongo CMAP/SDAM/command listeners and the broker's own counters, per database.

The driver owns the pool; the broker observes it through the driver's own
events (as mongobetween does with the Go driver's PoolMonitor) and keeps
plain counters that Stats, /metrics and the pool-size advice all read.

A listener runs inside pymongo's operations and monitors, so it must never
raise: every callback is wrapped, and a failure is logged, not propagated.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec

from pymongo import errors, monitoring
from pymongo.server_description import ServerDescription
from pymongo.server_type import SERVER_TYPE
from pymongo.topology_description import TopologyDescription

__all__ = [
    "CommandMonitor",
    "DatabaseStats",
    "DocumentSizes",
    "PoolAdvice",
    "PoolMonitor",
    "Reservoir",
    "TopologyMonitor",
]

log = logging.getLogger("mongo_broker.monitoring")

_P = ParamSpec("_P")

# What a heartbeat fails with when the driver itself cancelled the check
# (pymongo.errors._OperationCancelled, private; looked up so that a pymongo
# without it only loses the distinction).
_CANCELLED: type[Exception] | None = getattr(errors, "_OperationCancelled", None)


def _never_raises(method: Callable[_P, None]) -> Callable[_P, None]:
    """A broken listener must not break the operation that called it."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            log.exception("listener %s failed", method.__qualname__)

    return wrapper


class Reservoir:
    """The most recent samples of a duration, for percentiles without unbounded memory."""

    def __init__(self, size: int = 2048) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self.maximum = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self._samples.append(value)
        self.count += 1
        self.maximum = max(self.maximum, value)

    def percentile(self, p: float) -> float:
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        rank = max(0, math.ceil(p / 100 * len(ordered)) - 1)
        return ordered[rank]


class PoolMonitor(monitoring.ConnectionPoolListener):
    """Counts one MongoClient's pool connections and how long they are held."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.open = 0
        self.in_use = 0
        self.created = 0
        self.closed = 0
        self.clears = 0
        self.checkouts = 0
        self.checkout_failures: collections.Counter[str] = collections.Counter()
        # Seconds connections spent checked out, summed over check-ins: the
        # numerator of Little's law (mean connections busy = hold time / time).
        self.hold_seconds = 0.0
        self._checked_out_at: dict[tuple[Any, int], float] = {}

    @property
    def idle(self) -> int:
        return max(0, self.open - self.in_use)

    def busy_seconds(self) -> float:
        """Hold time so far, counting connections still checked out up to now."""
        now = time.monotonic()
        return self.hold_seconds + sum(now - t for t in self._checked_out_at.values())

    def pool_created(self, event: monitoring.PoolCreatedEvent) -> None:
        pass

    def pool_ready(self, event: monitoring.PoolReadyEvent) -> None:
        pass

    @_never_raises
    def pool_cleared(self, event: monitoring.PoolClearedEvent) -> None:
        self.clears += 1
        log.warning("pool for database %s at %s:%s cleared", self.database, *event.address)

    def pool_closed(self, event: monitoring.PoolClosedEvent) -> None:
        pass

    @_never_raises
    def connection_created(self, event: monitoring.ConnectionCreatedEvent) -> None:
        self.open += 1
        self.created += 1

    def connection_ready(self, event: monitoring.ConnectionReadyEvent) -> None:
        pass

    @_never_raises
    def connection_closed(self, event: monitoring.ConnectionClosedEvent) -> None:
        self.open -= 1
        self.closed += 1

    def connection_check_out_started(self, event: monitoring.ConnectionCheckOutStartedEvent) -> None:
        pass

    @_never_raises
    def connection_check_out_failed(self, event: monitoring.ConnectionCheckOutFailedEvent) -> None:
        self.checkout_failures[str(event.reason)] += 1

    @_never_raises
    def connection_checked_out(self, event: monitoring.ConnectionCheckedOutEvent) -> None:
        self.in_use += 1
        self.checkouts += 1
        self._checked_out_at[(event.address, event.connection_id)] = time.monotonic()

    @_never_raises
    def connection_checked_in(self, event: monitoring.ConnectionCheckedInEvent) -> None:
        self.in_use -= 1
        started = self._checked_out_at.pop((event.address, event.connection_id), None)
        if started is not None:
            self.hold_seconds += time.monotonic() - started


class CommandMonitor(monitoring.CommandListener):
    """Counts the commands the broker sent to MongoDB, by name, and their failures."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.sent: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()

    @_never_raises
    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    @_never_raises
    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.failures[event.command_name] += 1


class TopologyMonitor(monitoring.TopologyListener, monitoring.ServerHeartbeatListener):
    """Whether one client's database can take writes, whether it is known down, its RTT.

    pymongo's CSOT replaces serverSelectionTimeoutMS with the whole remaining
    time limit, so a call to a dead database would wait out its full deadline.
    The broker consults this monitor first and waits at most
    server_selection_timeout_ms, or nothing at all once heartbeats have found
    the database down.

    "Down" is a heartbeat's verdict, never one operation's. An operation's
    network error also marks the server Unknown (the SDAM spec), and the
    spec forbids the driver to re-check it at once: the server stays Unknown
    until the next heartbeat, up to heartbeat_frequency_ms later, while
    other connections to it work. One poison request (a document the server
    drops the connection on) must not black the database out for that long,
    so the heartbeat outcomes are tracked here and a server merely marked
    Unknown is re-checked on demand (see `recheck`).

    The state is read from the client's live topology description: pymongo
    publishes SDAM *events* from a queue drained once a second, which would
    make every decision up to a second stale. Heartbeat events are published
    as they happen. The events drive the health service and the log, where a
    second does not matter.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self.on_change: list[Callable[[bool], None]] = []
        self._describe: Callable[[], TopologyDescription] | None = None
        self._reported = False
        # Per server address: did its latest heartbeat fail?
        self._heartbeat_failed: dict[Any, bool] = {}
        self._heartbeats_succeeded = 0
        self._probe: asyncio.Task[None] | None = None
        # The last description read and whether it had a writable server:
        # pymongo replaces the description on every change and never alters
        # one, and every call asks (see call.require_available).
        self._seen: tuple[TopologyDescription | None, bool] = (None, False)

    def attach(self, describe: Callable[[], TopologyDescription]) -> None:
        """Read the state from ``describe`` (the client's topology_description)."""
        self._describe = describe

    def _servers(self) -> list[ServerDescription]:
        if self._describe is None:
            return []
        return list(self._describe().server_descriptions().values())

    @property
    def available(self) -> bool:
        if self._describe is None:
            return False
        description = self._describe()
        seen, writable = self._seen
        if description is not seen:
            writable = description.has_writable_server()
            self._seen = (description, writable)
        return writable

    @property
    def last_error(self) -> str | None:
        errors = [str(sd.error) for sd in self._servers() if sd.error]
        return errors[0] if errors and not self.available else None

    @property
    def known_down(self) -> bool:
        """Unavailable, and the latest heartbeat of every Unknown server failed.

        Not merely undiscovered, nor marked Unknown by one operation's error.
        """
        if self.available:
            return False
        unknown = [sd.address for sd in self._servers() if sd.server_type == SERVER_TYPE.Unknown]
        return bool(unknown) and all(self._heartbeat_failed.get(address, False) for address in unknown)

    @property
    def server_type(self) -> str:
        return ",".join(sorted({sd.server_type_name for sd in self._servers()})) or "Unknown"

    @property
    def rtt_s(self) -> float | None:
        rtts = [sd.round_trip_time for sd in self._servers() if sd.round_trip_time is not None]
        return min(rtts) if rtts else None

    def recheck(self, probe: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``probe`` (an operation that needs the server) unless one is running.

        pymongo's server selection requests an immediate check of every
        server when none is suitable, and the monitor answers within its
        minimum interval (500 ms); that is the re-check an operation's
        network error does not get. One probe at a time per database,
        however many calls are waiting; its own context, so it carries no
        caller's time limit.
        """
        if self._probe is not None and not self._probe.done():
            return
        self._probe = asyncio.get_running_loop().create_task(
            _quietly(probe(), self.database), context=contextvars.Context()
        )

    async def wait_available(self, timeout: float, *, until_down: bool = False) -> bool:
        """Wait up to ``timeout`` seconds for the database to become available.

        Also True as soon as a heartbeat succeeds: the server answers, even if
        another operation's network error has marked it Unknown again since.
        A caller repeating a request the server drops the connection on (as
        pymongo's read retries do under a time limit) flips it back to
        Unknown within milliseconds of each check, faster than this polls;
        pymongo's own server selection, which the call then goes on to, waits
        on the topology itself and catches those moments. With
        ``until_down``, stop waiting as soon as a heartbeat finds it down.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        answered = self._heartbeats_succeeded
        while not self.available and loop.time() < deadline:
            if self._heartbeats_succeeded != answered:
                return True
            if until_down and self.known_down:
                break
            await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
        return self.available

    # -- heartbeats ------------------------------------------------------------

    def started(self, event: monitoring.ServerHeartbeatStartedEvent) -> None:
        pass

    @_never_raises
    def succeeded(self, event: monitoring.ServerHeartbeatSucceededEvent) -> None:
        self._heartbeat_failed[event.connection_id] = False
        self._heartbeats_succeeded += 1

    @_never_raises
    def failed(self, event: monitoring.ServerHeartbeatFailedEvent) -> None:
        if _CANCELLED is not None and isinstance(event.reply, _CANCELLED):
            # The driver cancelled this check itself, because an operation hit
            # a network error: no verdict on the server.
            return
        self._heartbeat_failed[event.connection_id] = True
        self._report(self.available)

    # -- topology --------------------------------------------------------------

    def opened(self, event: monitoring.TopologyOpenedEvent) -> None:
        pass

    def closed(self, event: monitoring.TopologyClosedEvent) -> None:
        pass

    @_never_raises
    def description_changed(self, event: monitoring.TopologyDescriptionChangedEvent) -> None:
        self._report(event.new_description.has_writable_server())

    def _report(self, available: bool) -> None:
        """Tell the followers (health) when the database comes up or is found down."""
        if not available and not self.known_down:
            return  # not yet discovered, or Unknown after one operation's error: no verdict
        if available == self._reported:
            return
        if available:
            log.info("database %s is available", self.database)
        else:
            log.warning("database %s is unreachable: %s", self.database, self.last_error)
        self._reported = available
        for callback in self.on_change:
            callback(available)


async def _quietly(operation: Coroutine[Any, Any, Any], database: str) -> None:
    try:
        await operation
    except Exception as exc:  # the waiting calls read the outcome from the topology
        log.debug("re-check of database %s: %r", database, exc)


class DocumentSizes:
    """Mean document size per collection seen by recent Finds, to size first batches.

    Bounded: the least recently seen collection is forgotten first, so a
    caller naming endless collections cannot grow it.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._means: collections.OrderedDict[str, float] = collections.OrderedDict()

    def get(self, collection: str) -> float | None:
        return self._means.get(collection)

    def remember(self, collection: str, mean_bytes: float) -> None:
        self._means[collection] = mean_bytes
        self._means.move_to_end(collection)
        while len(self._means) > self._size:
            self._means.popitem(last=False)


@dataclass
class PoolAdvice:
    """A recommended max_pool_size from Little's law over the recent window."""

    recommended: int
    demand: float  # peak mean connections wanted (busy + waiting) per second
    arrival_rate: float  # database round trips per second over the window
    mean_hold_ms: float  # mean time a connection is held per round trip
    window_s: float


# One sample a second: the advice looks at the last minute.
_SAMPLES = 61


@dataclass
class _Sample:
    at: float
    round_trips: int
    busy_s: float
    queued_s: float


@dataclass
class DatabaseStats:
    """Everything observed about one configured database."""

    database: str
    max_pool_size: int
    min_pool_size: int
    pool: PoolMonitor
    topology: TopologyMonitor
    commands: CommandMonitor
    queue_waits: Reservoir = field(default_factory=Reservoir)
    queue_wait_total_s: float = 0.0
    round_trips: int = 0
    rpcs: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    in_flight: int = 0
    open_cursors: int = 0
    # Round trips that outlived their time limit and were left behind.
    abandoned: int = 0
    # Find streams ended at their time limit while their client was not
    # reading (a write blocked on HTTP/2 flow control).
    stalled_streams: int = 0
    document_sizes: DocumentSizes = field(default_factory=DocumentSizes)
    _samples: collections.deque[_Sample] = field(default_factory=lambda: collections.deque(maxlen=_SAMPLES))
    _last_warning: float = 0.0

    @classmethod
    def create(cls, database: str, max_pool_size: int, min_pool_size: int) -> DatabaseStats:
        return cls(
            database,
            max_pool_size,
            min_pool_size,
            PoolMonitor(database),
            TopologyMonitor(database),
            CommandMonitor(database),
        )

    def listeners(self) -> list[monitoring._EventListener]:
        return [self.pool, self.topology, self.commands]

    def record_queue_wait(self, seconds: float) -> None:
        self.round_trips += 1
        self.queue_wait_total_s += seconds
        self.queue_waits.add(seconds)

    # -- pool-size advice (Little's law) ------------------------------------

    def sample(self, now: float | None = None) -> None:
        """Take the once-a-second sample the advice is computed from."""
        self._samples.append(
            _Sample(
                time.monotonic() if now is None else now,
                self.round_trips,
                self.pool.busy_seconds(),
                self.queue_wait_total_s,
            )
        )

    def advice(self) -> PoolAdvice:
        """Recommend max_pool_size: the peak of (busy + waiting) per second, plus headroom.

        Mean connections busy over an interval is hold time / interval, and
        mean calls waiting is queue time / interval (Little's law: L = lambda x W).
        Their sum is what the pool would have needed for no call to wait.
        """
        samples = list(self._samples)
        if len(samples) < 2:
            return PoolAdvice(self.max_pool_size, 0.0, 0.0, 0.0, 0.0)
        peak = 0.0
        for before, after in itertools.pairwise(samples):
            span = after.at - before.at
            if span > 0:
                demand = (after.busy_s - before.busy_s + after.queued_s - before.queued_s) / span
                peak = max(peak, demand)
        first, last = samples[0], samples[-1]
        window = last.at - first.at
        trips = last.round_trips - first.round_trips
        hold = last.busy_s - first.busy_s
        # 25% headroom for bursts shorter than a sample, and never below the
        # configured warm minimum or one connection.
        recommended = max(1, self.min_pool_size, math.ceil(peak * 1.25))
        return PoolAdvice(
            recommended=recommended,
            demand=peak,
            arrival_rate=trips / window if window > 0 else 0.0,
            mean_hold_ms=hold / trips * 1000 if trips else 0.0,
            window_s=window,
        )

    def warn_if_mis_sized(self, now: float, every_s: float = 300.0) -> None:
        """Log, at most every ``every_s``, when the pool is clearly too small or too big."""
        if now - self._last_warning < every_s or len(self._samples) < _SAMPLES // 2:
            return
        advice = self.advice()
        if advice.arrival_rate <= 0:
            return
        if advice.recommended > self.max_pool_size:
            self._last_warning = now
            log.warning(
                "database %s: callers are waiting for connections; demand peaked at %.1f "
                "connections for max_pool_size=%d; consider max_pool_size=%d",
                self.database,
                advice.demand,
                self.max_pool_size,
                advice.recommended,
            )
        elif self.max_pool_size > 4 and advice.recommended * 2 < self.max_pool_size:
            self._last_warning = now
            log.warning(
                "database %s: the pool is mostly idle (peak demand %.1f connections) and "
                "larger than it needs to be; consider max_pool_size=%d",
                self.database,
                advice.demand,
                advice.recommended,
            )
