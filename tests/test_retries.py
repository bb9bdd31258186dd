"""The clients' retries against a real broker, with faults from a real toxiproxy.

Two places to put a fault: between the broker and the database (the
broker's ``databases.appdb.uri`` points at a proxy), and between the client
and the broker's TCP listener (the client's target is a proxy). The second
is how a *lost reply* is made: the insert reaches the database, and the
connection dies before the answer reaches the client.

Each fault is lifted at a known moment: on the client's own DEBUG log record
of a retry (logger ``broker_client.retry``), which comes after the failed
attempt and before the next one. So the tests need no sleeps and assert no
timings; bounds on elapsed time only rule out hangs.

Every scenario that concerns both clients runs with ``BrokerClient`` and
with ``AsyncBrokerClient`` (`Api`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from broker_client import (
    AsyncBrokerClient,
    BrokerClient,
    DuplicateKeyError,
    ExecutionTimeout,
    RetryPolicy,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
)
from broker_client.errors import BrokerError
from broker_client.retry import MIN_ATTEMPT_S, MIN_SEND_S, RetryState, is_retryable
from bson import ObjectId
from bson.raw_bson import RawBSONDocument

from harness.toxiproxy import Proxy
from tests.conftest import proxied_config

MONGO_DB = "broker_test"
# The broker notices a dead database quickly, and finds it again quickly.
FAST_DB = {"heartbeat_frequency_ms": 500, "server_selection_timeout_ms": 2000, "connect_timeout_ms": 500}
# Enough tries to outlast the broker's rediscovery of its database (about a
# heartbeat) once a fault is lifted; the deadline still bounds each test.
PATIENT = RetryPolicy(max_attempts=60, initial_backoff=0.05, max_backoff=0.5)
HANG_GUARD_S = 60.0

Doc = dict[str, Any]


def _through(start_broker: Any, proxy: Proxy, **options: Any) -> Any:
    """A broker whose database connections go through ``proxy``."""
    return start_broker(proxied_config(start_broker, proxy, **options))


class Api:
    """One test body for both clients: ``api(call)`` runs a sync result or an awaitable.

    The async client runs on one event loop for the whole test (an
    ``asyncio.Runner``), as a grpc.aio channel belongs to one loop.
    """

    def __init__(self, asynchronous: bool, target: str, **options: Any) -> None:
        self.asynchronous = asynchronous
        self.client: Any
        if asynchronous:
            self._runner: asyncio.Runner | None = asyncio.Runner()
            self.client = AsyncBrokerClient(target, **options)
        else:
            self._runner = None
            self.client = BrokerClient(target, **options)

    def __call__(self, result: Any) -> Any:
        return self._runner.run(result) if self._runner is not None else result

    def close(self) -> None:
        self(self.client.close())
        if self._runner is not None:
            self._runner.close()


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def make_api(request: pytest.FixtureRequest) -> Iterator[Callable[..., Api]]:
    made: list[Api] = []

    def make(target: str, **options: Any) -> Api:
        api = Api(request.param, target, **options)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


@contextlib.contextmanager
def on_retry(action: Callable[[logging.LogRecord], None] | None = None) -> Iterator[list[logging.LogRecord]]:
    """Collect the client's retry records, running ``action`` on each as it is logged."""
    records: list[logging.LogRecord] = []
    failures: list[BaseException] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            if action is not None:
                try:
                    action(record)
                except BaseException as exc:  # re-raised below, not lost in logging
                    failures.append(exc)

    logger = logging.getLogger("broker_client.retry")
    handler = Handler(logging.DEBUG)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if failures:
        raise failures[0]


def _retry_info(record: logging.LogRecord) -> dict[str, Any]:
    info: dict[str, Any] = record.broker_retry  # type: ignore[attr-defined]
    return info


def _codes(records: list[logging.LogRecord]) -> set[str]:
    return {_retry_info(r)["error"].code.name for r in records}


def _wait_until(check: Callable[[], bool], what: str, timeout: float = HANG_GUARD_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting: {what}")
        time.sleep(0.02)


def _database_down(broker: Any) -> bool:
    with BrokerClient(broker.unix_target, retries=None) as c:
        return not c.stats("appdb", timeout=10)["appdb"].available


# 9 ---------------------------------------------------------------------------------------


def test_9_client_retry_after_lost_reply_stores_exactly_once(
    start_broker: Any,
    make_proxy: Callable[[str], Proxy],
    make_api: Callable[..., Api],
    mongo: Any,
    collection_name: str,
) -> None:
    """The insert lands, its reply is lost; the retry's ALREADY_EXISTS on our own id is success."""
    broker = start_broker(start_broker.base_config())
    client_proxy = make_proxy(broker.tcp_target)
    api = make_api(
        f"127.0.0.1:{client_proxy.port}", retries=RetryPolicy(max_attempts=3), timeout=HANG_GUARD_S
    )
    stored = mongo[MONGO_DB][collection_name]
    assert api(api.client.ping()).ok  # the connection through the proxy is up

    # Broker -> client bytes are dropped; client -> broker bytes flow. The
    # request goes through and the insert runs; the reply goes nowhere. (A
    # toxic that cuts at the first byte down, limit_data or reset_peer, cuts
    # too soon: the broker sends its initial metadata before the insert,
    # and drops the call when its client goes.)
    client_proxy.add_toxic("timeout", stream="downstream", timeout=0)

    def cut_once_stored() -> None:
        _wait_until(lambda: stored.count_documents({}) > 0, "the insert to reach the database")
        client_proxy.disable()  # the connection dies, the reply with it

    cutter = threading.Thread(target=cut_once_stored, daemon=True)
    cutter.start()
    doc: Doc = {"sku": "lost-reply"}

    def heal(record: logging.LogRecord) -> None:
        # Once the cut is complete, the retry goes through a healthy proxy.
        cutter.join(HANG_GUARD_S)
        client_proxy.clear()

    with on_retry(heal) as retries:
        result = api(api.client["appdb"][collection_name].insert_one(doc))
    cutter.join(HANG_GUARD_S)

    assert isinstance(doc["_id"], ObjectId)
    assert result.inserted_id == doc["_id"]
    assert result.attempts == 2
    assert _codes(retries) == {"UNAVAILABLE"}
    assert list(stored.find()) == [doc], "exactly one document, the one we sent"
    # The second attempt really met the first one's document.
    with BrokerClient(broker.unix_target) as direct:
        stats = direct.stats("appdb")["appdb"]
    assert stats.errors.get("ALREADY_EXISTS") == 1
    assert stats.rpcs["Insert"] == 2


# inserts ---------------------------------------------------------------------------------


def test_inserts_with_caller_ids_are_not_retried(
    start_broker: Any, proxy: Proxy, make_api: Callable[..., Api], collection_name: str
) -> None:
    broker = _through(start_broker, proxy, **FAST_DB)
    api = make_api(broker.tcp_target, retries=PATIENT, timeout=HANG_GUARD_S)
    items = api.client["appdb"][collection_name]
    proxy.disable()
    _wait_until(lambda: _database_down(broker), "the broker to see its database down")

    with on_retry() as retries:
        for insert in (
            lambda: items.insert_one({"_id": 1}),
            lambda: items.insert_many([{"n": 1}, {"_id": 2, "n": 2}]),  # one caller id is enough
            lambda: items.insert_one(RawBSONDocument(b"\x05\x00\x00\x00\x00")),  # the broker makes its id
        ):
            with pytest.raises(ServerSelectionTimeoutError) as info:
                api(insert())
            assert info.value.attempts == 1
            assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert retries == []

    # The same fault, with ids made by the client: retried, up to max_attempts.
    few = make_api(broker.tcp_target, retries=RetryPolicy(max_attempts=3, initial_backoff=0.01), timeout=30)
    with on_retry() as retries, pytest.raises(ServerSelectionTimeoutError) as info:
        few(few.client["appdb"][collection_name].insert_one({"n": 3}))
    assert info.value.attempts == 3
    assert len(retries) == 2


def test_insert_many_after_an_unanswered_attempt_sends_only_the_rest(
    start_broker: Any, proxy: Proxy, make_api: Callable[..., Api], mongo: Any, collection_name: str
) -> None:
    """Ordered: a retry meets the first documents already stored, and carries on after them.

    What the database holds after the unanswered attempt is set up directly:
    its first three documents, as an ordered insert cut short leaves it.
    """
    broker = _through(start_broker, proxy, **FAST_DB)
    api = make_api(broker.tcp_target, retries=PATIENT, timeout=HANG_GUARD_S)
    stored = mongo[MONGO_DB][collection_name]
    docs: list[Doc] = [{"n": n} for n in range(8)]
    proxy.disable()
    _wait_until(lambda: _database_down(broker), "the broker to see its database down")

    def first_part_landed(record: logging.LogRecord) -> None:
        if not stored.count_documents({}):
            stored.insert_many([dict(d) for d in docs[:3]])  # with the ids the client made
            proxy.enable()

    with on_retry(first_part_landed) as retries:
        result = api(api.client["appdb"][collection_name].insert_many(docs))

    assert result.inserted_ids == [d["_id"] for d in docs]
    assert all(isinstance(i, ObjectId) for i in result.inserted_ids)
    assert sorted(d["n"] for d in stored.find()) == list(range(8)), "each document exactly once"
    # At least: the failed one, the one that met the stored part, the rest.
    assert result.attempts >= 3
    assert "UNAVAILABLE" in _codes(retries)


def test_unordered_insert_many_after_an_unanswered_attempt(
    start_broker: Any, proxy: Proxy, make_api: Callable[..., Api], mongo: Any, collection_name: str
) -> None:
    broker = _through(start_broker, proxy, **FAST_DB)
    api = make_api(broker.tcp_target, retries=PATIENT, timeout=HANG_GUARD_S)
    stored = mongo[MONGO_DB][collection_name]
    docs: list[Doc] = [{"n": n} for n in range(6)]
    proxy.disable()
    _wait_until(lambda: _database_down(broker), "the broker to see its database down")

    def some_landed(record: logging.LogRecord) -> None:
        if not stored.count_documents({}):
            stored.insert_many([dict(docs[1]), dict(docs[4])])  # any subset, unordered
            proxy.enable()

    with on_retry(some_landed):
        result = api(api.client["appdb"][collection_name].insert_many(docs, ordered=False))
    assert result.inserted_ids == [d["_id"] for d in docs]
    assert sorted(d["n"] for d in stored.find()) == list(range(6))


def test_a_real_duplicate_after_a_retry_is_raised_not_taken_for_our_own(
    start_broker: Any, proxy: Proxy, make_api: Callable[..., Api], mongo: Any, collection_name: str
) -> None:
    """A unique index other than _id: the retry's duplicate is someone else's document."""
    broker = _through(start_broker, proxy, **FAST_DB)
    api = make_api(broker.tcp_target, retries=PATIENT, timeout=HANG_GUARD_S)
    stored = mongo[MONGO_DB][collection_name]
    stored.create_index("sku", unique=True)
    proxy.disable()
    _wait_until(lambda: _database_down(broker), "the broker to see its database down")

    def someone_else_took_the_sku(record: logging.LogRecord) -> None:
        if not stored.count_documents({}):
            stored.insert_one({"_id": "theirs", "sku": "a1"})
            proxy.enable()

    docs: list[Doc] = [{"sku": "z9"}, {"sku": "a1"}, {"sku": "b2"}]
    with on_retry(someone_else_took_the_sku), pytest.raises(DuplicateKeyError) as info:
        api(api.client["appdb"][collection_name].insert_many(docs))
    assert info.value.attempts >= 2
    # In the caller's list: z9 went in, a1 failed, b2 was not tried.
    assert (info.value.failed_index, info.value.inserted_count) == (1, 1)
    assert sorted(d["sku"] for d in stored.find()) == ["a1", "z9"]
    assert stored.find_one({"sku": "a1"})["_id"] == "theirs"


# reads -------------------------------------------------------------------------------------


def test_reads_are_retried_on_unavailable_and_succeed_once_the_database_is_back(
    start_broker: Any, proxy: Proxy, make_api: Callable[..., Api], collection_name: str
) -> None:
    broker = _through(start_broker, proxy, **FAST_DB)
    api = make_api(broker.tcp_target, retries=PATIENT, timeout=HANG_GUARD_S)
    items = api.client["appdb"][collection_name]
    api(items.insert_many([{"_id": n} for n in range(5)]))

    for read in ("find", "find_one", "ping"):
        proxy.disable()
        _wait_until(lambda: _database_down(broker), "the broker to see its database down")
        with on_retry(lambda record: proxy.enable()) as retries:
            if read == "find":
                cursor = items.find({}, sort="_id", batch_size=2)
                assert [d["_id"] for d in api(cursor.to_list())] == [0, 1, 2, 3, 4]
                assert cursor.attempts == len(retries) + 1 >= 2
            elif read == "find_one":
                assert api(items.find_one({"_id": 3})) == {"_id": 3}
            else:
                assert api(api.client["appdb"].ping()).attempts == len(retries) + 1 >= 2
        assert retries, read
        assert _codes(retries) == {"UNAVAILABLE"}, read


def test_a_find_that_fails_after_its_first_batch_raises_instead_of_restarting(
    start_broker: Any, make_proxy: Callable[[str], Proxy], make_api: Callable[..., Api], collection_name: str
) -> None:
    """A restart would hand the caller its first documents twice."""
    broker = start_broker(start_broker.base_config())
    client_proxy = make_proxy(broker.tcp_target)
    api = make_api(f"127.0.0.1:{client_proxy.port}", retries=PATIENT, timeout=HANG_GUARD_S)
    items = api.client["appdb"][collection_name]
    # 19 MB in 30 batches: far more than HTTP/2 flow control lets the broker
    # send ahead of a reader, so the rest of the stream is still to come when
    # the proxy goes down, however slowly this test runs.
    pad = "x" * 64_000
    for chunk in range(0, 300, 50):
        api(items.insert_many([{"_id": n, "pad": pad} for n in range(chunk, chunk + 50)]))
    cursor = items.find({}, sort="_id", batch_size=10)
    first = api(cursor.next())
    assert first["_id"] == 0
    client_proxy.disable()  # the stream's connection dies after the first batch
    try:
        with on_retry() as retries, pytest.raises(ServerSelectionTimeoutError) as info:
            api(cursor.to_list())
    finally:
        client_proxy.enable()
    assert retries == []
    assert info.value.attempts == 1
    assert not cursor.alive


# the deadline and RetryInfo ------------------------------------------------------------


def test_retries_stop_at_the_deadline(
    start_broker: Any, proxy: Proxy, make_api: Callable[..., Api], collection_name: str
) -> None:
    broker = _through(start_broker, proxy, **FAST_DB)
    many = RetryPolicy(max_attempts=100_000, initial_backoff=0.01, max_backoff=0.05)
    api = make_api(broker.tcp_target, retries=many)
    proxy.disable()
    _wait_until(lambda: _database_down(broker), "the broker to see its database down")

    # Long enough for several attempts even on a busy machine; a fail-fast
    # UNAVAILABLE normally takes milliseconds.
    timeout = 5.0
    started = time.monotonic()
    with on_retry() as retries, pytest.raises((ServerSelectionTimeoutError, ExecutionTimeout)) as info:
        api(api.client["appdb"][collection_name].find_one({}, timeout=timeout))
    elapsed = time.monotonic() - started

    # Stopped by the deadline, long before max_attempts.
    assert 2 <= info.value.attempts < many.max_attempts
    assert info.value.attempts == len(retries) + 1
    # No retry was started without time left for it.
    assert all(_retry_info(r)["left"] >= MIN_ATTEMPT_S for r in retries)
    assert elapsed < HANG_GUARD_S


def test_resource_exhausted_is_retried_no_sooner_than_retry_info_says(
    start_broker: Any, proxy: Proxy, make_api: Callable[..., Api], collection_name: str
) -> None:
    """One pool slot, held by a slow call: the next call is refused with POOL_EXHAUSTED."""
    broker = _through(start_broker, proxy, max_pool_size=1, max_waiting=1, wait_queue_timeout_ms=200)
    # Tiny jitter, so that the pauses are the broker's RetryInfo.
    api = make_api(
        broker.tcp_target,
        retries=RetryPolicy(max_attempts=200, initial_backoff=0.001, max_backoff=0.001),
        timeout=HANG_GUARD_S,
    )
    items = api.client["appdb"][collection_name]
    api(items.insert_one({"n": 0}))
    proxy.add_toxic("latency", stream="downstream", latency=1500)

    with BrokerClient(broker.unix_target, retries=None, timeout=HANG_GUARD_S) as other:
        slow = threading.Thread(target=other["appdb"][collection_name].find_one, daemon=True)
        slow.start()
        _wait_until(lambda: other.stats("appdb")["appdb"].rpcs_in_flight >= 1, "the slow call to start")
        with on_retry() as retries:
            cursor = items.find({})
            assert [d["n"] for d in api(cursor.to_list())] == [0]
        slow.join(HANG_GUARD_S)

    exhausted = [_retry_info(r) for r in retries if _retry_info(r)["error"].code.name == "RESOURCE_EXHAUSTED"]
    assert exhausted, "the slot was free: no POOL_EXHAUSTED to retry"
    for info in exhausted:
        error = info["error"]
        assert isinstance(error, WaitQueueTimeoutError)
        assert error.reason == "POOL_EXHAUSTED"
        assert error.retry_after is not None and error.retry_after > 0
        assert info["delay"] >= error.retry_after  # the broker's delay is the least pause
    assert cursor.attempts == len(retries) + 1 >= 2


def test_retry_info_longer_than_the_time_left_ends_the_call_at_once() -> None:
    """The rule above at the deadline's edge, on the retry state alone (no I/O involved)."""
    error = WaitQueueTimeoutError(
        "saturated", code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="POOL_EXHAUSTED", retry_after=5.0
    )
    state = RetryState(RetryPolicy(max_attempts=10), time.monotonic() + 1.0, "Find")
    state.next_timeout()
    with pytest.raises(WaitQueueTimeoutError) as info:
        state.backoff(error)
    assert info.value is error
    assert state.failures == 0

    roomy = RetryState(RetryPolicy(max_attempts=10), time.monotonic() + 60.0, "Find")
    assert 5.0 <= roomy.backoff(error) <= 60.0


def test_no_call_is_sent_with_less_than_a_millisecond_left() -> None:
    """gRPC counts deadlines in whole milliseconds; the client answers such a call itself."""
    late = RetryState(RetryPolicy(max_attempts=10), time.monotonic() + MIN_SEND_S / 2, "Insert")
    with pytest.raises(ExecutionTimeout, match="Insert: the timeout ran out before the call") as info:
        late.next_timeout()
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert not is_retryable(info.value)
    assert late.attempts == 0

    roomy = RetryState(RetryPolicy(max_attempts=10), time.monotonic() + 60.0, "Insert")
    assert 59.0 < roomy.next_timeout() <= 60.0
    assert roomy.attempts == 1


# the policy itself -------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=0.5, multiplier=2.0)
    assert [policy.backoff_cap(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert policy.backoff_cap(10_000) == 0.5  # no overflow
    unavailable = BrokerError("down", code=grpc.StatusCode.UNAVAILABLE)
    state = RetryState(policy, time.monotonic() + 600, "Ping")
    pauses = []
    for n in range(1, 10):
        pause = state.backoff(unavailable)
        assert 0 <= pause <= policy.backoff_cap(n)
        pauses.append(pause)
    assert len(set(pauses)) > 1  # random, not fixed
    with pytest.raises(BrokerError):  # the tenth try is the last
        state.backoff(unavailable)


@pytest.mark.parametrize(
    ("code", "reason", "retried"),
    [
        (grpc.StatusCode.UNAVAILABLE, "", True),
        (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", True),
        (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", True),
        # Only a stopping server's reaches the loop (see is_retryable).
        (grpc.StatusCode.CANCELLED, "", True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED", True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED", False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "TIMEOUT", False),
        (grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_KEY", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", False),
    ],
)
def test_which_errors_are_retried(code: grpc.StatusCode, reason: str, retried: bool) -> None:
    state = RetryState(RetryPolicy(), time.monotonic() + 600, "Ping")
    error = BrokerError("x", code=code, reason=reason)
    if retried:
        assert state.backoff(error) >= 0
    else:
        with pytest.raises(BrokerError):
            state.backoff(error)


def test_retry_policy_is_checked() -> None:
    assert RetryPolicy() == RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=1.0, multiplier=2.0)
    for bad in (
        {"max_attempts": 0},
        {"max_attempts": 2.5},
        {"initial_backoff": -1},
        {"initial_backoff": 2.0, "max_backoff": 1.0},
        {"multiplier": 0.5},
        {"max_backoff": float("inf")},
    ):
        with pytest.raises((TypeError, ValueError)):
            RetryPolicy(**bad)
    with pytest.raises(TypeError, match="retries"):
        BrokerClient("127.0.0.1:1", retries=3)  # type: ignore[arg-type]


def test_no_retries_at_all(tmp_path: Any, make_api: Callable[..., Api]) -> None:
    api = make_api(str(tmp_path / "nobody.sock"), retries=None, timeout=10)
    with on_retry() as retries, pytest.raises(ServerSelectionTimeoutError) as info:
        api(api.client.ping())
    assert info.value.attempts == 1
    assert retries == []
    patient = make_api(str(tmp_path / "nobody.sock"), timeout=10)  # the default policy
    with pytest.raises(ServerSelectionTimeoutError) as info:
        patient(patient.client.ping())
    assert info.value.attempts == 3
