"""Faults and overload: database down, restarted, cut mid-stream; killed clients; floods.

Each scenario checks the exact status the caller sees, that no call outlives
its deadline, that no acknowledged write is lost or doubled, and that the
broker's file descriptors, threads and memory come back to their baseline.
Network faults come from a real toxiproxy; the database is a real server
that is really stopped and restarted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import bson
import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.dbserver import DatabaseServer, start_database_server
from harness.process import free_port
from harness.toxiproxy import Proxy
from tests.conftest import proxied_config
from tests.rpc import database_stats, eventually, fails, find_all, open_stub, pb

FAST_DB = {
    "heartbeat_frequency_ms": 500,
    "server_selection_timeout_ms": 2000,
    "connect_timeout_ms": 500,
}


@dataclass
class Baseline:
    rss: int
    fds: int
    threads: int


def _baseline(pid: int) -> Baseline:
    process = psutil.Process(pid)
    return Baseline(process.memory_info().rss, process.num_fds(), process.num_threads())


def _back_to_baseline(pid: int, before: Baseline, timeout: float = 15.0) -> Baseline:
    """Wait for fds and threads to return to the baseline; memory may grow a little."""
    process = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    while True:
        now = Baseline(process.memory_info().rss, process.num_fds(), process.num_threads())
        settled = now.fds <= before.fds + 2 and now.threads <= before.threads + 2
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert now.fds <= before.fds + 2, f"file descriptors: {before.fds} -> {now.fds}"
    assert now.threads <= before.threads + 2, f"threads: {before.threads} -> {now.threads}"
    assert now.rss <= before.rss + 40 * 1024 * 1024, f"rss: {before.rss} -> {now.rss}"
    return now


def _eventually(check: Callable[[], bool], timeout: float = 15.0, every: float = 0.05) -> bool:
    # This suite waits for restarts and reconnects: a longer default.
    return eventually(check, timeout, every)


def _through(start_broker, proxy: Proxy, **options):
    return proxied_config(start_broker, proxy, **{**FAST_DB, **options})


@pytest.fixture
def own_server(db_server) -> Iterator[DatabaseServer]:
    """A database server of this test's own, which it may stop and restart."""
    if db_server.kind == "uri":
        pytest.skip("MONGODB_URI names a server this suite did not start and must not stop")
    server = start_database_server(kind=db_server.kind)
    try:
        yield server
    finally:
        server.close()


# 1 -------------------------------------------------------------------------------


def test_1_database_down_at_broker_start_then_appears(start_broker, own_server, collection_name):
    own_server.stop()
    config = start_broker.base_config(**FAST_DB)
    config["databases"]["appdb"]["uri"] = own_server.uri
    config["health"] = {"tcp": f"127.0.0.1:{free_port()}"}
    proc = start_broker(config)  # the broker starts although its database does not answer
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(config["health"]["tcp"]))

    def status(service: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    with open_stub(proc.unix_target) as stub:
        assert status("") == health_pb2.HealthCheckResponse.SERVING
        assert status("appdb") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _eventually(lambda: database_stats(stub, timeout=5).last_error != "")
        start = time.monotonic()
        with fails(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"):
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})]
                ),
                timeout=10,
            )
        assert time.monotonic() - start < 1.0  # fail fast, not after server selection
        own_server.start()
        assert _eventually(lambda: status("appdb") == health_pb2.HealthCheckResponse.SERVING)
        stub.Insert(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})]),
            timeout=10,
        )
        documents, _ = find_all(stub, database="appdb", collection=collection_name)
        assert len(documents) == 1


# 2 -------------------------------------------------------------------------------


@pytest.mark.parametrize("coalesce", [0, 64], ids=["alone", "coalescing"])
def test_2_database_restarted_with_50_calls_in_flight(
    start_broker, own_server, collection_name, record_property, coalesce
):
    config = start_broker.base_config(
        **FAST_DB, max_pool_size=10, max_waiting=100, coalesce_max_calls=coalesce
    )
    config["databases"]["appdb"]["uri"] = own_server.uri
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        stub.Insert(
            pb.InsertRequest(
                database="appdb",
                collection=collection_name,
                documents=[bson.encode({"seed": n}) for n in range(500)],
            )
        )
        before = _baseline(proc.pid)
        acknowledged: list[int] = []
        codes: list[str] = []
        durations: list[float] = []
        lock = threading.Lock()

        def one(n: int) -> None:
            start = time.monotonic()
            try:
                if n % 2:
                    find_all(stub, database="appdb", collection=collection_name, batch_size=50)
                else:
                    stub.Insert(
                        pb.InsertRequest(
                            database="appdb", collection=collection_name, documents=[bson.encode({"_id": n})]
                        ),
                        timeout=8,
                    )
                    with lock:
                        acknowledged.append(n)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                codes.append(code)
                durations.append(time.monotonic() - start)

        with ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(one, n) for n in range(50)]
            time.sleep(0.05)
            own_server.restart()
            restarted = time.monotonic()
            for future in futures:
                future.result(timeout=30)
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        assert max(durations) < 8 + 0.5  # none hangs past its deadline
        # Recovery within one heartbeat plus a second.
        ok = _eventually(lambda: _ping_ok(stub), timeout=0.5 + 1.0 + 5.0, every=0.05)
        recovered = time.monotonic() - restarted
        assert ok
        record_property("restart_outcomes", {c: codes.count(c) for c in set(codes)})
        record_property("recovery_s", round(recovered, 2))
        # Every acknowledged insert is stored exactly once.
        ids = [
            d["_id"]
            for d in find_all(
                stub,
                database="appdb",
                collection=collection_name,
                filter=bson.encode({"_id": {"$type": "int"}}),
            )[0]
        ]
        assert sorted(ids) == sorted(set(ids))
        assert set(acknowledged) <= set(ids)
        _back_to_baseline(proc.pid, before)


def _ping_ok(stub) -> bool:
    try:
        return stub.Ping(pb.PingRequest(database="appdb"), timeout=1).databases[0].ok
    except grpc.RpcError:
        return False


# 3 -------------------------------------------------------------------------------


def test_3_blackhole_ends_at_the_deadline(start_broker, proxy, collection_name, record_property):
    proc = start_broker(_through(start_broker, proxy))
    with open_stub(proc.unix_target) as stub:
        stub.Insert(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})])
        )
        before = _baseline(proc.pid)
        proxy.add_toxic("timeout", timeout=0)  # packets vanish; nothing is closed
        observed = []
        for deadline in (0.5, 1.0):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                list(
                    stub.Find(pb.FindRequest(database="appdb", collection=collection_name), timeout=deadline)
                )
            observed.append(round(time.monotonic() - start, 3))
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert abs(observed[-1] - deadline) <= 0.2, (deadline, observed[-1])
        record_property("blackhole_deadline_observed_s", observed)
        proxy.clear()
        assert _eventually(lambda: database_stats(stub, timeout=5).rpcs_in_flight == 0)
        _back_to_baseline(proc.pid, before)


def test_3_blackhole_under_coalesced_inserts_loses_no_acknowledged_write(
    start_broker, proxy, collection_name
):
    # One connection, so the inserts queue and coalesce; then the network
    # swallows everything while they are in flight, and comes back.
    proc = start_broker(
        _through(start_broker, proxy, max_pool_size=1, max_waiting=100, coalesce_max_calls=64)
    )
    proxy.add_toxic("latency", latency=20)
    acknowledged: list[int] = []
    codes: list[str] = []
    lock = threading.Lock()
    with open_stub(proc.unix_target) as stub:

        def one(n: int) -> None:
            try:
                stub.Insert(
                    pb.InsertRequest(
                        database="appdb", collection=collection_name, documents=[bson.encode({"_id": n})]
                    ),
                    timeout=1.5,
                )
                with lock:
                    acknowledged.append(n)
                    codes.append("OK")
            except grpc.RpcError as exc:
                with lock:
                    codes.append(exc.code().name)

        with ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(one, n) for n in range(40)]
            time.sleep(0.1)
            proxy.add_toxic("timeout", timeout=0)
            for future in futures:
                future.result(timeout=30)
        proxy.clear()
        assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "UNAVAILABLE"}, codes
        assert _eventually(lambda: _ping_ok(stub), timeout=15)
        stored = [d["_id"] for d in find_all(stub, database="appdb", collection=collection_name)[0]]
        assert sorted(stored) == sorted(set(stored))
        assert set(acknowledged) <= set(stored), sorted(set(acknowledged) - set(stored))
        assert database_stats(stub).coalesced_calls > 0


# 4 -------------------------------------------------------------------------------


def test_4_reset_mid_stream_ends_with_an_error_never_short(start_broker, proxy, collection_name):
    proc = start_broker(_through(start_broker, proxy))
    with open_stub(proc.unix_target) as stub:
        for start in range(0, 3000, 1000):
            stub.Insert(
                pb.InsertRequest(
                    database="appdb",
                    collection=collection_name,
                    documents=[bson.encode({"n": n, "pad": "p" * 200}) for n in range(start, start + 1000)],
                )
            )
        received: list[int] = []
        call = stub.Find(
            pb.FindRequest(
                database="appdb", collection=collection_name, batch_size=200, sort=bson.encode({"n": 1})
            ),
            timeout=20,
        )
        with pytest.raises(grpc.RpcError) as caught:
            for message in call:
                received.extend(bson.decode(d)["n"] for d in message.documents)
                if len(received) == 200:
                    proxy.add_toxic("reset_peer", timeout=0)  # getMore's connection is cut
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 200 <= len(received) < 3000
        assert received == list(range(len(received)))  # in order, no duplicates
        proxy.clear()
        assert _eventually(lambda: _ping_ok(stub))


# 5 -------------------------------------------------------------------------------

_SLOW_READER = """
import sys, time, grpc
from broker_client.proto.broker.v1 import broker_pb2 as pb, broker_pb2_grpc
stub = broker_pb2_grpc.BrokerStub(grpc.insecure_channel(sys.argv[1]))
call = stub.Find(pb.FindRequest(database="appdb", collection=sys.argv[2], batch_size=100))
next(call)
print("reading", flush=True)
time.sleep(600)
"""


def test_5_client_killed_mid_find_releases_cursor_and_connection(broker, collection_name):
    with open_stub(broker.unix_target) as stub:
        for _ in range(3):
            stub.Insert(
                pb.InsertRequest(
                    database="appdb",
                    collection=collection_name,
                    documents=[bson.encode({"n": n}) for n in range(1000)],
                )
            )
        kills_before = database_stats(stub, timeout=5).operations.get("killCursors", 0)
        reader = subprocess.Popen(
            [sys.executable, "-c", _SLOW_READER, broker.unix_target, collection_name],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
            assert _eventually(lambda: database_stats(stub, timeout=5).open_cursors >= 1)
            os.kill(reader.pid, signal.SIGKILL)
        finally:
            reader.wait(10)
            if reader.stdout is not None:
                reader.stdout.close()
        assert _eventually(lambda: database_stats(stub, timeout=5).open_cursors == 0)
        stats = database_stats(stub, timeout=5)
        assert stats.connections_in_use == 0
        assert stats.operations.get("killCursors", 0) == kills_before + 1


# 7 -------------------------------------------------------------------------------


def test_7_overload_ten_times_the_pool(start_broker, proxy, collection_name, record_property):
    config = _through(
        start_broker, proxy, max_pool_size=2, min_pool_size=0, max_waiting=4, wait_queue_timeout_ms=300
    )
    config["health"] = {"tcp": f"127.0.0.1:{free_port()}"}
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        stub.Insert(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})])
        )
        before = _baseline(proc.pid)
        proxy.add_toxic("latency", latency=200)
        stop = threading.Event()
        codes: list[str] = []
        lock = threading.Lock()

        def caller() -> None:
            while not stop.is_set():
                try:
                    find_all(stub, database="appdb", collection=collection_name)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes.append(code)

        threads = [threading.Thread(target=caller) for _ in range(20)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            # Operators can still ask: Ping skips the queue, health has its own listener.
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(config["health"]["tcp"]))
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1
            assert stub.Ping(pb.PingRequest(database="appdb"), timeout=3).databases[0].ok
            stats = database_stats(stub, timeout=5)
            assert stats.wait_queue_length <= 4 and stats.connections_in_use <= 2
            peak = psutil.Process(proc.pid).memory_info().rss
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        proxy.clear()
        tally = {code: codes.count(code) for code in set(codes)}
        record_property("overload_outcomes", tally)
        assert set(tally) <= {"OK", "RESOURCE_EXHAUSTED"}, tally
        assert tally.get("OK", 0) > 0 and tally.get("RESOURCE_EXHAUSTED", 0) > 0
        assert peak - before.rss < 40 * 1024 * 1024
        _back_to_baseline(proc.pid, before)


# 8 -------------------------------------------------------------------------------


def test_8_slow_database_is_a_timeout_not_a_network_error(start_broker, proxy, collection_name):
    # Heartbeats get the default connect timeout (5 s), longer than the
    # latency: only the operations are too slow, not the server's monitor.
    proc = start_broker(_through(start_broker, proxy, connect_timeout_ms=5000))
    with open_stub(proc.unix_target) as stub:
        stub.Insert(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})])
        )
        proxy.add_toxic("latency", latency=1500)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Insert(
                    pb.InsertRequest(
                        database="appdb", collection=collection_name, documents=[bson.encode({"b": 1})]
                    ),
                    timeout=0.5,
                )
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        proxy.clear()
        assert database_stats(stub, timeout=5).pool_clears == 0


# 10 ------------------------------------------------------------------------------

LARGE_RESULT = int(os.environ.get("MONGO_BROKER_LARGE_RESULT", "200000"))


def test_10_large_result_streams_in_bounded_memory(start_broker, collection_name, record_property):
    proc = start_broker(start_broker.base_config(max_pool_size=4))
    with open_stub(proc.unix_target) as stub:
        block = 10_000
        for start in range(0, LARGE_RESULT, block):
            stub.Insert(
                pb.InsertRequest(
                    database="appdb",
                    collection=collection_name,
                    documents=[bson.encode({"n": n, "pad": "x" * 100}) for n in range(start, start + block)],
                ),
                timeout=120,
            )
        process = psutil.Process(proc.pid)
        baseline = process.memory_info().rss
        peak = baseline
        count = 0
        for message in stub.Find(
            pb.FindRequest(database="appdb", collection=collection_name, batch_size=5000), timeout=600
        ):
            count += len(message.documents)
            if count % 50_000 < len(message.documents):
                peak = max(peak, process.memory_info().rss)
        peak = max(peak, process.memory_info().rss)
    record_property(
        "large_result", {"documents": count, "rss_growth_mb": round((peak - baseline) / 2**20, 1)}
    )
    assert count == LARGE_RESULT
    assert peak - baseline < 60 * 1024 * 1024, (baseline, peak)


# 13 ------------------------------------------------------------------------------


def test_13_ping_flood_gets_goaway(start_broker, proxy, collection_name):
    proc = start_broker(_through(start_broker, proxy, connect_timeout_ms=5000))
    with open_stub(proc.unix_target) as stub:
        stub.Insert(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})])
        )
    proxy.add_toxic("latency", latency=6000)
    # A client that pings every 50 ms while its call waits: the broker allows
    # one ping per min_client_ping_interval_s (10 s) without data.
    flooding = grpc.insecure_channel(
        proc.unix_target,
        options=[
            ("grpc.keepalive_time_ms", 50),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_time_between_pings_ms", 10),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )
    from broker_client.proto.broker.v1 import broker_pb2_grpc

    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(
            broker_pb2_grpc.BrokerStub(flooding).Find(
                pb.FindRequest(database="appdb", collection=collection_name), timeout=20
            )
        )
    flooding.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert "too many pings" in (caught.value.details() or "").lower()
    assert time.monotonic() - start < 6.0  # cut off by the GOAWAY, not by the slow database
    proxy.clear()
    # Well-behaved clients are unaffected.
    with open_stub(proc.unix_target) as good:
        assert good.Ping(pb.PingRequest(), timeout=10).databases[0].ok


def test_13_idle_connections_from_dead_workers_are_reaped(start_broker):
    config = start_broker.base_config()
    config["server"] = {"max_connection_idle_s": 1.0}
    proc = start_broker(config)
    process = psutil.Process(proc.pid)
    baseline = process.num_fds()
    # Separate subchannel pools: twenty connections, as from twenty workers.
    channels = [
        grpc.insecure_channel(proc.unix_target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(20)
    ]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=5)
    assert process.num_fds() >= baseline + 20
    # The workers go quiet (as if frozen or gone); the broker closes their connections.
    assert _eventually(lambda: process.num_fds() <= baseline + 2, timeout=10)
    for channel in channels:
        channel.close()


# Deadlines that expire at every point of a call ---------------------------------


def test_deadlines_expiring_anywhere_never_become_internal_errors(start_broker, collection_name):
    """A deadline may pass before the broker answers, mid-stream or mid-abort; never INTERNAL."""
    proc = start_broker(start_broker.base_config())
    with open_stub(proc.unix_target) as stub:
        stub.Insert(
            pb.InsertRequest(
                database="appdb",
                collection=collection_name,
                documents=[bson.encode({"n": n}) for n in range(2000)],
            )
        )
        rng = __import__("random").Random(7)

        def caller(seed: int) -> None:
            for i in range(150):
                timeout = rng.choice([0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05])
                try:
                    if (i + seed) % 2:
                        find_all_with(stub, collection_name, timeout)
                    else:
                        stub.Insert(
                            pb.InsertRequest(
                                database="appdb",
                                collection=collection_name,
                                documents=[bson.encode({"x": i})],
                            ),
                            timeout=timeout,
                        )
                except grpc.RpcError as exc:
                    assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        errors = dict(database_stats(stub, timeout=5).errors)
        # Nothing is left stuck: no call in flight, no connection held, and
        # the next ordinary calls work (a wedged pool would time them out).
        assert _eventually(
            lambda: (
                (now := database_stats(stub, timeout=5)).rpcs_in_flight == 0 and now.connections_in_use == 0
            )
        )
        stub.Insert(
            pb.InsertRequest(
                database="appdb", collection=collection_name, documents=[bson.encode({"after": 1})]
            ),
            timeout=10,
        )
        assert find_all_with(stub, collection_name, 10.0) > 2000
    # And it still shuts down cleanly.
    assert proc.stop() == 0
    # Mostly DEADLINE_EXCEEDED and CANCELLED. The FerretDB test server ties a
    # cursor to the connection that opened it, and a timed-out call's
    # connection is closed, so a getMore can also find its cursor gone
    # (ABORTED) or the server's own error (FAILED_PRECONDITION).
    assert "INTERNAL" not in errors and "UNKNOWN" not in errors, errors
    log = proc.log_text()
    assert "unexpected error" not in log, log[log.find("unexpected error") :][:3000]


def find_all_with(stub, collection: str, timeout: float) -> int:
    request = pb.FindRequest(database="appdb", collection=collection, batch_size=100)
    return sum(len(m.documents) for m in stub.Find(request, timeout=timeout))
