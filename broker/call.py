"""One call's life: request id, drain refusal, authentication, the database and its
time limit, fail-fast, the admission slot of each round trip, the status it ends
with, and its access-log line and metrics.

Every RPC goes through `Calls.serve` (Ping of every database and Stats as
*local* calls, answered from the broker's own state), so none of these is
skipped by any method. The handlers in service.py only validate, run their
round trips through `Call.round_trip`, and answer.

Every database call runs inside `pymongo.timeout(...)` built from the gRPC
deadline (or the database's default_timeout_ms), so server selection, pool
checkout and the server-side maxTimeMS all stop when the caller stops
waiting. Every database round trip first takes a slot from the database's
admission queue (see admission.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import pymongo

from broker import coalesce
from broker.errors import Reason, RpcError, invalid_argument, to_rpc_error
from broker.logs import log_value
from broker.metrics import BrokerMetrics
from broker.peers import Peers, peer_host
from broker.pools import DatabasePool, Pools
from broker.security import ANONYMOUS, Authenticator, Principal
from broker.settings import Settings

__all__ = [
    "DATA_PLANE",
    "DEADLINE_SLACK_S",
    "REQUEST_ID_HEADER",
    "Call",
    "Calls",
    "Context",
    "DatabaseCall",
    "LocalCall",
    "require_available",
    "time_limit",
    "transmit",
]

# The call path logs under the service's name, as it did before it had a module of its own.
log = logging.getLogger("mongo_broker.service")
access_log = logging.getLogger("mongo_broker.access")

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")

# pymongo may raise a timeout a hair before the deadline (it leaves the
# server maxTimeMS minus one round trip); within this margin it is ours.
DEADLINE_SLACK_S = 0.010
_NO_DEADLINE_S = 10 * 365 * 86400
# The longest time limit a call gets. pymongo sends what is left of it to the
# server as maxTimeMS, which MongoDB (and FerretDB) refuse above 2^31-1 ms,
# about 24.8 days, as out of range (BadValue): a 30-day gRPC deadline failed
# every call with QUERY_REJECTED. 24 whole days stays under that bound with
# a margin, and no operation of a sidecar's caller needs longer.
_MAX_TIME_LIMIT_S = 24 * 86400
# How long past its time limit a database round trip may run before the
# broker abandons it (see Call.round_trip).
_ROUND_TRIP_GUARD_S = 1.0
# When a caller refused for the call limit should come back: parked streams
# end at their time limit, ordinary calls within milliseconds.
_CALL_LIMIT_RETRY_S = 1.0
# The methods that count against server.max_concurrent_rpcs; Ping, Stats,
# health and reflection run in the reserve above it (see BrokerService).
DATA_PLANE = frozenset(
    {
        "Find",
        "FindOne",
        "Insert",
        "Update",
        "Delete",
        "FindOneAndModify",
        "Count",
        "Distinct",
        "Aggregate",
        "BulkWrite",
    }
)
_T = TypeVar("_T")

Context = grpc.aio.ServicerContext[Any, Any]


class Call:
    """One call's record: what it asked for, its limits, and what it did (for the access log).

    A call starts as this record; once authenticated it becomes a
    `DatabaseCall` (one database, its pool, round trips) or a `LocalCall`
    (answered from the broker's own state), which take the record over.
    """

    __slots__ = (
        "bytes", "code", "collection", "counted", "data_plane", "database", "deadline",
        "documents", "method", "peer", "queue_wait_s", "request_id", "stage", "started",
    )  # fmt: skip

    def __init__(self, method: str, database: str, collection: str, request_id: str, peer: str = "") -> None:
        self.method = method
        self.database = database
        self.collection = collection
        self.request_id = request_id
        # The caller's address as gRPC names it: "ipv4:10.0.0.7:53412", "unix:".
        self.peer = peer
        self.started = time.monotonic()
        self.deadline = self.started + _NO_DEADLINE_S
        # The databases the call is counted under in Stats and metrics: its
        # own, or each one a Ping of every database pinged; none before the
        # database is resolved.
        self.counted: tuple[DatabasePool, ...] = ()
        self.code = "OK"
        self.documents = 0
        self.bytes = 0
        self.queue_wait_s = 0.0
        # Holds one of the broker's data-plane call slots (see Calls).
        self.data_plane = False
        # Where the call is now, for SIGUSR1 diagnostics of a stuck broker.
        self.stage = "start"

    def _take_over(self, record: Call) -> None:
        for name in Call.__slots__:
            setattr(self, name, getattr(record, name))

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def count_under(self, pools: Sequence[DatabasePool]) -> None:
        """Count this call under each of ``pools``: in flight now, by method when it ends."""
        self.counted = tuple(pools)
        for pool in self.counted:
            pool.stats.in_flight += 1

    def comment(self, comment: str = "") -> str:
        # Ties the server's slow-query log and currentOp back to the worker.
        return f"{comment} rid={self.request_id}" if comment else f"rid={self.request_id}"


class LocalCall(Call):
    """An authenticated call answered from the broker's own state (a Ping of every database, Stats)."""

    __slots__ = ("principal",)

    def __init__(self, record: Call, principal: Principal) -> None:
        self._take_over(record)
        self.principal = principal


class DatabaseCall(Call):
    """An authenticated call on one configured database: its pool, and round trips through it."""

    __slots__ = ("_pools", "pool", "principal")

    def __init__(self, record: Call, principal: Principal, pool: DatabasePool, pools: Pools) -> None:
        self._take_over(record)
        self.principal = principal
        self.pool = pool
        self._pools = pools

    def require_writable(self, pool: DatabasePool, collection: str | None = None) -> None:
        """PERMISSION_DENIED unless this caller may write to ``pool`` (and ``collection`` in it).

        Checked at the start of every write method, and again for what an
        Aggregate's $out or $merge writes to, which only its pipeline names.
        """
        if collection is not None:
            self.principal.authorize(pool.name, collection, write=True, method=self.method)
        if pool.settings.read_only:
            raise RpcError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"database {pool.name!r} is read-only on this broker",
                Reason.NOT_AUTHORIZED,
            )

    def other_pool(self, database: str) -> DatabasePool:
        """Another configured database this caller may use (an aggregation's $out or $merge target)."""
        if not self.principal.may_use(database):
            self.principal.authorize(database, "", write=False)
        return self._pools.get(database, self.principal.may_use)

    async def round_trip(self, operation: Coroutine[Any, Any, _T]) -> _T:
        """Run one database round trip while holding an admission slot.

        The operation runs in a task of its own that the call's cancellation
        does not reach. pymongo's async pool is not safe against a task being
        cancelled inside it: under a storm of clients giving up, cancelled
        checkouts left the pool wedged (every later call timed out). So a
        departed client's operation is left to finish under its own time
        limit (CSOT), which pymongo enforces, and its admission slot is
        released only when it has. If it is still running a second after the
        time limit the call is answered DEADLINE_EXCEEDED anyway.
        """
        pool = self.pool
        self.stage = "waiting for a connection"
        waited = await pool.admission.acquire(self.remaining())
        self.queue_wait_s += waited
        pool.stats.record_queue_wait(waited)
        self.stage = "database round trip"
        loop = asyncio.get_running_loop()
        task = loop.create_task(operation)
        # The call waits on a future of its own, which the task's end or the
        # guard's timer resolves: cancelling the call cancels only this
        # waiter, never the task (as asyncio.shield, or asyncio.wait, would
        # do, with more futures, callbacks and a set per round trip).
        waiter: asyncio.Future[None] = loop.create_future()

        def done(finished: asyncio.Future[_T]) -> None:
            pool.admission.release()
            # A departed caller never reads the outcome: mark it read, so an
            # error is not logged as "never retrieved".
            if not finished.cancelled():
                finished.exception()
            if not waiter.done():
                waiter.set_result(None)

        task.add_done_callback(done)
        guard = loop.call_at(loop.time() + max(self.remaining(), 0.0) + _ROUND_TRIP_GUARD_S, _wake, waiter)
        try:
            await waiter
            if task.done():
                return task.result()
            pool.stats.abandoned += 1
            log.warning(
                "%s on %r: a database round trip outlived its time limit by %.1fs; answering without it",
                self.method,
                self.database,
                _ROUND_TRIP_GUARD_S,
            )
            raise RpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the database operation outlived the call's time limit and was abandoned",
                Reason.TIMEOUT,
            ) from None
        finally:
            guard.cancel()
            self.stage = "between round trips"

    async def coalesced(
        self,
        key: Hashable,
        item: Any,
        size: int,
        run: Callable[[list[Any]], Coroutine[Any, Any, list[Any]]],
    ) -> Any:
        """One item's round trip, going out with compatible waiting calls when the pool is busy.

        ``run`` takes the items of a group and returns one outcome per item,
        a value or an exception (the call's own error). With a free slot, or
        coalescing off, the call goes alone at once (see coalesce.py).
        """
        pool, coalescer = self.pool, self.pool.coalescer
        if coalescer is None or not pool.admission.would_wait():
            return _outcome((await self.round_trip(run([item])))[0])
        member = coalesce.Member(item, size, remaining=self.remaining)
        if coalescer.join(key, member):
            self.stage = "waiting with a coalesced round trip"
            start = time.monotonic()
            outcome = await self._answer(member)
            self.queue_wait_s += time.monotonic() - start
            if outcome is coalesce.ALONE:
                return _outcome((await self.round_trip(run([item])))[0])
            return _outcome(outcome)
        group = coalescer.lead(key, member)
        self.stage = "waiting for a connection"
        try:
            waited = await pool.admission.acquire(self.remaining())
        except BaseException:
            coalescer.abandon(group)
            raise
        self.queue_wait_s += waited
        pool.stats.record_queue_wait(waited)
        members = coalescer.close(group)
        # The group's operation may take as long as its longest-lived member;
        # each member waits only for its own time limit.
        limit = max((m.remaining() for m in members), default=0.0)
        task = asyncio.get_running_loop().create_task(
            _run_group(run, members, limit), context=contextvars.Context()
        )
        task.add_done_callback(lambda _: pool.admission.release())
        self.stage = "database round trip (coalesced)"
        try:
            return _outcome(await self._answer(member))
        finally:
            self.stage = "between round trips"

    async def _answer(self, member: coalesce.Member[Any]) -> Any:
        try:
            return await coalesce.answer_of(member, self.remaining())
        except TimeoutError:
            raise RpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the call's time limit ran out while its coalesced round trip was waiting or running",
                Reason.TIMEOUT,
            ) from None


async def _run_group(
    run: Callable[[list[Any]], Coroutine[Any, Any, list[Any]]],
    members: list[coalesce.Member[Any]],
    limit: float,
) -> None:
    """Run a group's operation under its longest time limit and give every member its outcome."""
    try:
        with pymongo.timeout(limit):
            outcomes = await run([m.item for m in members])
    except Exception as exc:
        coalesce.fail_all(members, exc)
        return
    coalesce.deliver(members, outcomes)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _outcome(outcome: Any) -> Any:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    # 16 random hex digits, as uuid4().hex[:16] gave, without building a UUID.
    return os.urandom(8).hex()


def time_limit(context: Context, pool: DatabasePool, max_time_ms: int) -> float:
    remaining = context.time_remaining()
    # No deadline from the client shows up as None or as a huge number.
    if remaining is None or remaining > _NO_DEADLINE_S:
        remaining = pool.settings.default_timeout_ms / 1000
    if max_time_ms > 0:
        remaining = min(remaining, max_time_ms / 1000)
    return float(min(remaining, _MAX_TIME_LIMIT_S))


_C = TypeVar("_C", bound=Call)


class _Held:
    """The call a lifecycle is serving: the record at first, then what it became."""

    __slots__ = ("_inflight", "_task", "call", "principal")

    def __init__(
        self, call: Call, task: asyncio.Task[Any] | None, inflight: dict[asyncio.Task[Any], Call]
    ) -> None:
        self.call = call
        self.principal = ANONYMOUS
        self._task = task
        self._inflight = inflight
        self._track()

    def become(self, call: _C) -> _C:
        """Serve ``call`` (which took this record over) from now on: it is the one logged and listed."""
        self.call = call
        self._track()
        return call

    def _track(self) -> None:
        if self._task is not None:
            self._inflight[self._task] = self.call


class Calls:
    """The calls in flight, and the one path every call takes (see `serve`)."""

    def __init__(self, pools: Pools, settings: Settings, metrics: BrokerMetrics) -> None:
        self._pools = pools
        self._metrics = metrics
        self._inflight: dict[asyncio.Task[Any], Call] = {}
        self._drain_aborted: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._draining = False
        self.peers = Peers()
        # Data-plane calls (every method but Ping and Stats) running now, and their
        # bound. gRPC's own maximum_concurrent_rpcs is this bound plus
        # server.reserved_rpcs (see server.py), so however many streams one
        # client parks, Ping, Stats and health still have room. Fixed at
        # start like gRPC's: a reload that added databases must not eat the
        # reserve.
        self._data_calls = 0
        self._data_call_limit = settings.concurrency_limit()
        self.configure(settings)

    def describe_in_flight(self) -> list[str]:
        """One line per call in flight: method, database, stage and age."""
        now = time.monotonic()
        # The names are the callers' own: escaped, as in the access log.
        return [
            f"{c.method} db={log_value(c.database)} coll={log_value(c.collection)} "
            f"rid={log_value(c.request_id)} stage={log_value(c.stage)} "
            f"age_s={now - c.started:.1f} remaining_s={c.remaining():.1f}"
            for c in self._inflight.values()
        ]

    def configure(self, settings: Settings) -> None:
        """Apply (re)loaded settings to calls from now on."""
        self._settings = settings
        self._auth = Authenticator(settings.auth)

    async def drain(self, grace_s: float) -> tuple[int, int]:
        """Refuse new calls; let running ones finish for ``grace_s``; abort the rest.

        Returns (calls that finished, calls aborted with UNAVAILABLE).
        """
        self._draining = True
        running = set(self._inflight)
        if running:
            await asyncio.wait(running, timeout=grace_s)
        left = {task for task in running if not task.done()}
        for task in left:
            self._drain_aborted.add(task)
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=2.0)
        return len(running) - len(left), len(left)

    async def close_cursor(self, cursor: Any, call: Call) -> None:
        """Close a Find's server cursor (killCursors), even if this call was cancelled.

        An exhausted cursor was closed by pymongo when its last batch came;
        only a cursor left with results (or never run) needs a close. The
        close runs in a task the call's cancellation cannot reach, for the
        same reason as round trips (see Call.round_trip).
        """
        if not cursor.alive:
            return
        call.stage = "closing the cursor"
        # A context of its own: pymongo.timeout() nests by taking the earlier
        # deadline, so under the call's (often spent) time limit _kill_cursor's
        # fresh one would be ignored and killCursors never sent.
        task = asyncio.get_running_loop().create_task(_kill_cursor(cursor), context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    @asynccontextmanager
    async def serve(
        self,
        context: Context,
        method: str,
        database: str,
        collection: str = "",
        max_time_ms: int = 0,
        *,
        write: bool = False,
    ) -> AsyncIterator[DatabaseCall]:
        """A call on one database: authorised, resolved, admitted, under its time limit."""
        async with self._lifecycle(context, method, database, collection) as held:
            if not database:
                raise invalid_argument("database is required: name one of the configured databases")
            principal = held.principal
            # Authorised before the lookup: a name the token may not use is
            # PERMISSION_DENIED whether or not it is configured, so a scoped
            # token cannot probe for other databases' names.
            principal.authorize(database, collection, write=write, method=method)
            pool = self._pools.get(database, principal.may_use)
            call = held.become(DatabaseCall(held.call, principal, pool, self._pools))
            if write:
                call.require_writable(pool)
            self._admit(call)
            limit = time_limit(context, pool, max_time_ms)
            call.deadline = call.started + limit
            if limit <= 0:
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the call's deadline had already passed when it reached the broker",
                    Reason.TIMEOUT,
                )
            await require_available(pool, limit)
            with pymongo.timeout(limit):
                yield call

    @asynccontextmanager
    async def serve_local(
        self, context: Context, method: str, database: str = ""
    ) -> AsyncIterator[LocalCall]:
        """A call answered from the broker's own state (a Ping of every database, Stats).

        It gets the request id, drain refusal, authentication, status
        mapping and access log of every call, and resolves its databases
        itself.
        """
        async with self._lifecycle(context, method, database, "") as held:
            yield held.become(LocalCall(held.call, held.principal))

    @asynccontextmanager
    async def _lifecycle(
        self, context: Context, method: str, database: str, collection: str
    ) -> AsyncIterator[_Held]:
        """What every call shares: registry, request id, drain refusal, authentication,
        failures mapped to statuses, and the access log and metrics at the end."""
        task = asyncio.current_task()
        peer = context.peer() or ""
        self.peers.record(peer_host(peer))
        held = _Held(Call(method, database, collection, _request_id(context), peer), task, self._inflight)
        try:
            # The id travels back in the trailers: they go out with the status
            # in the call's last batch, where headers sent now would cost
            # every call one more round of gRPC operations.
            context.set_trailing_metadata(((REQUEST_ID_HEADER, held.call.request_id),))
            if self._draining:
                raise _shutting_down()
            held.principal = self._principal(context)
            yield held
        except asyncio.CancelledError:
            call = held.call
            if task not in self._drain_aborted:
                call.code = "CANCELLED"
                raise
            # Cancelled by the drain, not by the client: tell it to go elsewhere.
            error = _shutting_down()
            call.code = error.code.name
            await _answer(context, error, call.request_id)
        except Exception as exc:
            call = held.call
            if context.cancelled():
                # The client left, or its deadline passed, while this call ran:
                # gRPC refuses to send anything more, and nobody would read it.
                call.code = "DEADLINE_EXCEEDED" if call.remaining() <= 0 else "CANCELLED"
                raise asyncio.CancelledError() from None
            passed = call.remaining() <= DEADLINE_SLACK_S
            error = to_rpc_error(exc, database=database, deadline_passed=passed)
            call.code = error.code.name
            log.debug("%s on %r failed: %r", method, database, error)
            # A stalled stream's status waits here behind the message its
            # client has not read, until the client reads or leaves.
            call.stage = "sending the status"
            await _answer(context, error, call.request_id)
        finally:
            if task is not None:
                self._inflight.pop(task, None)
                self._drain_aborted.discard(task)
            self._finish(held.call)

    def _admit(self, call: DatabaseCall) -> None:
        """Count the call under its database, and a data-plane one against server.max_concurrent_rpcs.

        Refused past that limit with RESOURCE_EXHAUSTED (POOL_EXHAUSTED): the
        same back-off as a full wait queue, so clients need no new rule.
        """
        call.count_under((call.pool,))
        if call.method not in DATA_PLANE:
            return
        if self._data_calls >= self._data_call_limit:
            raise _too_many_calls(self._data_call_limit)
        self._data_calls += 1
        call.data_plane = True

    def _principal(self, context: Context) -> Principal:
        return self._auth.authenticate(context.invocation_metadata())

    def _finish(self, call: Call) -> None:
        elapsed = time.monotonic() - call.started
        if call.data_plane:
            self._data_calls -= 1
        counted = call.counted
        for pool in counted:
            stats = pool.stats
            stats.in_flight -= 1
            stats.rpcs[call.method] += 1
            if call.code != "OK":
                stats.errors[call.code] += 1
            self._metrics.observe_queue_wait(pool.name, call.queue_wait_s)
            self._metrics.observe_call(call.method, pool.name, call.code, elapsed)
        if not counted:
            # Unknown database names are not used as labels: a caller could
            # otherwise create any number of time series.
            self._metrics.observe_call(call.method, "", call.code, elapsed)
        if self._settings.log.access and access_log.isEnabledFor(logging.INFO):
            _log_access(call, elapsed)


def _log_access(call: Call, elapsed: float) -> None:
    """The call's access-log line.

    Database and collection are whatever the caller sent, logged even when
    the call is refused: escaped, so that a name holding a line break cannot
    write an access-log line of its own. The JSON fields keep the exact
    values (json.dumps escapes them).

    The record is made and handled directly, as Logger.info would, less its
    search of the stack for the caller's file and line, which no formatter
    of the broker's prints.
    """
    record = access_log.makeRecord(
        access_log.name,
        logging.INFO,
        __file__,
        0,
        "%s db=%s coll=%s code=%s ms=%.2f docs=%d bytes=%d wait_ms=%.2f rid=%s peer=%s",
        (
            log_value(call.method),
            log_value(call.database),
            log_value(call.collection),
            call.code,
            elapsed * 1000,
            call.documents,
            call.bytes,
            call.queue_wait_s * 1000,
            log_value(call.request_id),
            log_value(call.peer),
        ),
        None,
        "_finish",
        {
            "method": call.method,
            "database": call.database,
            "collection": call.collection,
            "code": call.code,
            "duration_ms": round(elapsed * 1000, 3),
            "documents": call.documents,
            "bytes": call.bytes,
            "queue_wait_ms": round(call.queue_wait_s * 1000, 3),
            "request_id": call.request_id,
            "peer": call.peer,
        },
    )
    access_log.handle(record)


async def transmit(sending: Awaitable[None], call: DatabaseCall) -> None:
    """Send a message; if the call has already ended, stop serving it.

    A client whose deadline passed, or that went away, ends the call in gRPC
    core before the handler notices; sending then fails inside gRPC. That is
    a cancellation, not a broker error.

    The send may take only what is left of the call's time limit. A client
    that stops reading blocks a write on HTTP/2 flow control for as long as
    it likes; without a bound such a stream kept its call slot, its server
    cursor and its batch until the client disconnected. On expiry the call
    is answered DEADLINE_EXCEEDED: gRPC queues that status behind the
    message in flight, and the handler ends, releasing all it held.
    """
    try:
        async with asyncio.timeout(max(call.remaining(), 0.0)):
            await sending
    except TimeoutError:
        call.pool.stats.stalled_streams += 1
        log.info(
            "%s on %r: the client read nothing more within the call's time limit; ending the stream",
            call.method,
            call.database,
        )
        raise RpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "the call's time limit ran out while the broker waited for the client to read the results",
            Reason.TIMEOUT,
        ) from None
    except asyncio.CancelledError:
        raise
    except Exception:
        raise asyncio.CancelledError() from None


async def _answer(context: Context, error: RpcError, request_id: str = "") -> None:
    """End the call with ``error``'s status and details (raises, as gRPC's abort does).

    ``request_id``, when given, goes into the trailers with the details: an
    abort replaces whatever trailers the call had set.
    """
    status = error.to_status(((REQUEST_ID_HEADER, request_id),) if request_id else ())
    try:
        # grpc-stubs lags grpc.aio: abort_with_status exists since grpcio 1.38.
        await context.abort_with_status(status)  # type: ignore[attr-defined]
    except grpc.aio.AbortError:
        raise
    except Exception:
        # The call ended (deadline passed, client gone) just before the
        # answer could be sent; there is nobody left to tell.
        raise asyncio.CancelledError() from None


def _too_many_calls(limit: int) -> RpcError:
    return RpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the broker is running its limit of {limit} data calls (every method but Ping and Stats) "
        "(server.max_concurrent_rpcs); back off and retry",
        Reason.POOL_EXHAUSTED,
        retry_after_s=_CALL_LIMIT_RETRY_S,
    )


def _shutting_down() -> RpcError:
    return RpcError(
        grpc.StatusCode.UNAVAILABLE,
        "the broker is shutting down; retry on another instance or after it restarts",
        Reason.SHUTTING_DOWN,
    )


async def require_available(pool: DatabasePool, limit: float) -> None:
    """Fail fast with UNAVAILABLE when the database is known to be down.

    pymongo's CSOT would otherwise spend the call's whole time limit on server
    selection; this keeps server_selection_timeout_ms meaningful.

    Known down means a heartbeat failed (see TopologyMonitor). A server that
    one operation's network error marked Unknown is not down: the call asks
    for a re-check at once and waits for it, at most
    server_selection_timeout_ms (or its time limit), instead of being
    refused, or waiting for the next heartbeat, until heartbeat_frequency_ms.
    """
    topology = pool.stats.topology
    if topology.available:
        return
    settings = pool.settings
    wait = settings.server_selection_timeout_ms / 1000
    if not (settings.fail_fast and topology.known_down):
        topology.recheck(lambda: _probe(pool, wait))
        if await topology.wait_available(min(wait, limit), until_down=settings.fail_fast):
            return
        if wait > limit and not (settings.fail_fast and topology.known_down):
            raise RpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"database {pool.name!r} did not become available within the call's time limit",
                Reason.TIMEOUT,
                {"database": pool.name},
            )
    cause = f": {topology.last_error}" if topology.last_error else ""
    raise RpcError(
        grpc.StatusCode.UNAVAILABLE,
        f"database {pool.name!r} is unreachable{cause}; the broker retries in the background "
        f"every heartbeat_frequency_ms ({settings.heartbeat_frequency_ms} ms); retry later",
        Reason.DATABASE_UNAVAILABLE,
        {"database": pool.name},
    )


async def _probe(pool: DatabasePool, timeout: float) -> None:
    """One ping: its server selection makes the driver check the server now."""
    with pymongo.timeout(timeout):
        await pool.db.command("ping")


async def _kill_cursor(cursor: Any) -> None:
    try:
        # A fresh, short time limit: the call's own may have run out.
        with pymongo.timeout(5):
            await cursor.close()
    except Exception:
        log.warning("could not close a server cursor; it will time out on the server", exc_info=True)
