"""Pool governance and observability: deadlines, admission, fail-fast, Stats, metrics, logs.

Faults between the broker and the database come from a real toxiproxy
(built by `make tools`), never from a mocked database.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bson
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import METRIC_NAMES
from harness.toxiproxy import Proxy
from tests.conftest import proxied_config
from tests.rpc import database_stats, eventually, fails, find_all, open_stub, pb


def _proxied_config(start_broker, proxy: Proxy, **options):
    return proxied_config(start_broker, proxy, **options)


def _insert(stub, collection: str, count: int, database: str = "appdb") -> None:
    stub.Insert(
        pb.InsertRequest(
            database=database,
            collection=collection,
            documents=[bson.encode({"n": n, "pad": "p" * 64}) for n in range(count)],
        ),
        timeout=30,
    )


# --- deadlines -----------------------------------------------------------------


def test_deadline_shorter_than_a_slow_operation_ends_in_time(
    start_broker, proxy, collection_name, record_property
):
    proc = start_broker(_proxied_config(start_broker, proxy))
    with open_stub(proc.unix_target) as stub:
        _insert(stub, collection_name, 10)
        proxy.add_toxic("latency", latency=2000)
        observed = []
        for deadline in (0.3, 0.6):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                find_all_with_timeout(stub, collection_name, deadline)
            observed.append(time.monotonic() - start)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert observed[-1] <= deadline + 0.2, (deadline, observed[-1])
        record_property("deadline_requested_vs_observed_s", list(zip((0.3, 0.6), observed, strict=True)))
        proxy.clear()
        # The handler let go: nothing in flight, no connection held, no pool
        # clear (a timeout is not a network error), and the next call works.
        assert eventually(
            lambda: (now := database_stats(stub)).rpcs_in_flight == 0 and now.connections_in_use == 0
        )
        assert database_stats(stub).pool_clears == 0
        documents, _ = find_all(stub, database="appdb", collection=collection_name)
        assert len(documents) == 10


def find_all_with_timeout(stub, collection: str, timeout: float) -> list[bytes]:
    return [
        d
        for m in stub.Find(pb.FindRequest(database="appdb", collection=collection), timeout=timeout)
        for d in m.documents
    ]


def test_broker_side_time_limit_applies_without_client_deadline(start_broker, proxy, collection_name):
    config = _proxied_config(start_broker, proxy, default_timeout_ms=400)
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        _insert(stub, collection_name, 1)
        proxy.add_toxic("latency", latency=3000)
        start = time.monotonic()
        with fails(grpc.StatusCode.DEADLINE_EXCEEDED, "TIMEOUT"):
            # No gRPC deadline: the broker's default_timeout_ms bounds the call.
            list(stub.Find(pb.FindRequest(database="appdb", collection=collection_name)))
        assert time.monotonic() - start < 2.5


def test_cancelled_find_kills_its_cursor_and_returns_the_connection(broker, collection_name):
    with open_stub(broker.unix_target) as stub:
        for _ in range(5):
            _insert(stub, collection_name, 1000)
        before = database_stats(stub).operations.get("killCursors", 0)
        call = stub.Find(
            pb.FindRequest(database="appdb", collection=collection_name, batch_size=100), timeout=30
        )
        first = next(iter(call))
        assert len(first.documents) == 100
        assert eventually(lambda: database_stats(stub).open_cursors == 1)
        call.cancel()
        assert eventually(lambda: database_stats(stub).open_cursors == 0)
        stats = database_stats(stub)
        assert stats.connections_in_use == 0
        assert stats.operations.get("killCursors", 0) == before + 1


# --- admission -----------------------------------------------------------------


def _outcome(fn: Callable[[], object]) -> tuple[grpc.StatusCode, Any]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc
    return grpc.StatusCode.OK, None


def _retry_info(exc) -> error_details_pb2.RetryInfo | None:
    status = rpc_status.from_call(exc)
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info
    return None


def test_full_queue_is_refused_at_once_with_retry_info(start_broker, proxy, collection_name):
    config = _proxied_config(
        start_broker, proxy, max_pool_size=1, min_pool_size=0, max_waiting=1, wait_queue_timeout_ms=5000
    )
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        _insert(stub, collection_name, 1)
        proxy.add_toxic("latency", latency=700)

        def slow_find() -> object:
            return find_all(stub, database="appdb", collection=collection_name)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_outcome, slow_find) for _ in range(6)]
            results = [f.result(timeout=30) for f in futures]
        proxy.clear()
        codes = sorted(code.name for code, _ in results)
        # One runs, one waits its turn, four are refused at once.
        assert codes.count("OK") == 2, codes
        assert codes.count("RESOURCE_EXHAUSTED") == 4, codes
        for code, exc in results:
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "1/1 connections busy, 1/1 calls waiting" in exc.details()
                retry = _retry_info(exc)
                assert retry is not None and retry.retry_delay.ToNanoseconds() > 0
        stats = database_stats(stub)
        assert stats.checkout_failures["queue_full"] == 4
        assert stats.wait_queue_max == 1 and stats.wait_queue_length == 0
        assert stats.errors["RESOURCE_EXHAUSTED"] == 4


def test_wait_longer_than_wait_queue_timeout_is_refused(start_broker, proxy, collection_name):
    config = _proxied_config(
        start_broker, proxy, max_pool_size=1, min_pool_size=0, max_waiting=5, wait_queue_timeout_ms=200
    )
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        _insert(stub, collection_name, 1)
        proxy.add_toxic("latency", latency=1500)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(
                _outcome, lambda: find_all(stub, database="appdb", collection=collection_name)
            )
            time.sleep(0.3)
            start = time.monotonic()
            code, exc = _outcome(lambda: find_all(stub, database="appdb", collection=collection_name))
            waited = time.monotonic() - start
            assert first.result(timeout=30)[0] == grpc.StatusCode.OK
        proxy.clear()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "wait_queue_timeout_ms (200 ms" in exc.details()
        assert waited < 1.2  # refused after its 200 ms wait, not after the slow call ended
        assert database_stats(stub).checkout_failures["wait_timeout"] == 1


def test_a_burst_on_one_database_does_not_starve_another(start_broker, proxy, collection_name):
    config = _proxied_config(start_broker, proxy, max_pool_size=1, min_pool_size=0, max_waiting=2)
    config["databases"]["other"] = {**config["databases"]["appdb"], "uri": start_broker.db_server.uri}
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        _insert(stub, collection_name, 1)
        proxy.add_toxic("latency", latency=500)
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                _outcome(lambda: find_all(stub, database="appdb", collection=collection_name))

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            for n in range(10):
                stub.Insert(
                    pb.InsertRequest(
                        database="other", collection=collection_name, documents=[bson.encode({"n": n})]
                    ),
                    timeout=2,
                )
            other = database_stats(stub, "other")
            assert other.errors == {} and other.rpcs["Insert"] == 10
            assert database_stats(stub, "appdb").checkout_failures["queue_full"] > 0
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            proxy.clear()


# --- fail fast -----------------------------------------------------------------


def test_fail_fast_while_database_is_down_and_recovery(start_broker, proxy, collection_name, record_property):
    config = _proxied_config(
        start_broker,
        proxy,
        heartbeat_frequency_ms=500,
        server_selection_timeout_ms=3000,
        connect_timeout_ms=500,
    )
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        _insert(stub, collection_name, 1)
        proxy.disable()
        assert eventually(lambda: not database_stats(stub).available, timeout=15)
        latencies = []
        for _ in range(5):
            start = time.monotonic()
            with fails(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE") as failure:
                _insert(stub, collection_name, 1)
            latencies.append(time.monotonic() - start)
        assert "is unreachable" in failure.message
        record_property("fail_fast_latency_ms", [round(x * 1000, 2) for x in latencies])
        # Refused without waiting out server_selection_timeout_ms (3 s).
        assert max(latencies) < 1.0
        proxy.enable()
        assert eventually(lambda: database_stats(stub).available, timeout=15)
        _insert(stub, collection_name, 1)
        documents, _ = find_all(stub, database="appdb", collection=collection_name)
        assert len(documents) == 2


# --- stats, metrics, logs ------------------------------------------------------


def test_stats_counts_exactly_what_was_done(start_broker, collection_name):
    proc = start_broker(start_broker.base_config())
    with open_stub(proc.unix_target) as stub:
        for n in range(7):
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode({"_id": n})]
                )
            )
        for _ in range(4):
            find_all(stub, database="appdb", collection=collection_name)
        for _ in range(2):
            with fails(grpc.StatusCode.INVALID_ARGUMENT):
                find_all(stub, database="appdb", collection=collection_name, filter=b"bad")
        with fails(grpc.StatusCode.ALREADY_EXISTS):
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode({"_id": 0})]
                )
            )
        stats = database_stats(stub)
        assert dict(stats.rpcs) == {"Insert": 8, "Find": 6}
        assert dict(stats.errors) == {"INVALID_ARGUMENT": 2, "ALREADY_EXISTS": 1}
        assert stats.operations["insert"] == 8
        assert stats.operations["find"] == 4
        assert stats.rpcs_in_flight == 0 and stats.open_cursors == 0
        assert stats.available and stats.server_rtt_ms > 0
        assert stats.max_pool_size == 10 and stats.max_waiting == 50
        assert 1 <= stats.connections_open <= 10 and stats.connections_created >= stats.connections_open
        with fails(grpc.StatusCode.NOT_FOUND):
            stub.Stats(pb.StatsRequest(database="nope"), timeout=5)


def test_stats_cli_table_and_json(broker):
    import subprocess
    import sys

    table = subprocess.run(
        [sys.executable, "-m", "broker", "stats", "--target", broker.unix_target],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for needle in ("database appdb", "connections", "wait queue", "queue wait", "pool advice"):
        assert needle in table.stdout
    raw = subprocess.run(
        [sys.executable, "-m", "broker", "stats", "--target", broker.unix_target, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    (db,) = json.loads(raw.stdout)["databases"]
    assert db["database"] == "appdb" and db["maxPoolSize"] == "10"


def test_metrics_endpoint_parses_and_has_every_documented_metric(start_broker, collection_name):
    config = start_broker.base_config()
    config["metrics"] = {"listen": "127.0.0.1:0"}
    proc = start_broker(config)
    ready = json.loads(proc.ready_path.read_text())
    with open_stub(proc.unix_target) as stub:
        _insert(stub, collection_name, 3)
        find_all(stub, database="appdb", collection=collection_name)
        with fails(grpc.StatusCode.INVALID_ARGUMENT):
            find_all(stub, database="appdb", collection=collection_name, filter=bson.encode({"$bogus": 1}))
        stub.Ping(pb.PingRequest(database="appdb"), timeout=5)
    with urllib.request.urlopen(f"http://{ready['metrics']}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    names = set(families) | {f"{n}_total" for n, f in families.items() if f.type == "counter"}
    missing = [m for m in METRIC_NAMES if m not in names]
    assert not missing, missing
    latency = families["mongo_broker_rpc_duration_seconds"]
    counts = {
        (s.labels["method"], s.labels["code"]): s.value for s in latency.samples if s.name.endswith("_count")
    }
    assert counts[("Insert", "OK")] == 1 and counts[("Find", "OK")] == 1
    assert counts[("Find", "INVALID_ARGUMENT")] == 1


def test_pool_advice_follows_the_load(start_broker, proxy, collection_name):
    config = _proxied_config(start_broker, proxy, max_pool_size=4, min_pool_size=0, max_waiting=50)
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        _insert(stub, collection_name, 1)
        proxy.add_toxic("latency", latency=50)
        end = time.monotonic() + 3.2
        while time.monotonic() < end:  # light: one caller at a time
            find_all(stub, database="appdb", collection=collection_name)
        light = database_stats(stub).recommended_max_pool_size
        stop = threading.Event()

        def caller() -> None:
            while not stop.is_set():
                _outcome(lambda: find_all(stub, database="appdb", collection=collection_name))

        threads = [threading.Thread(target=caller) for _ in range(12)]
        for t in threads:
            t.start()
        time.sleep(3.2)
        heavy = database_stats(stub)
        stop.set()
        for t in threads:
            t.join(10)
        proxy.clear()
    assert light <= 2, light
    # Twelve callers on four connections: demand is well above the pool.
    assert heavy.recommended_max_pool_size > 4, heavy
    assert heavy.demand_connections > 4 and heavy.mean_hold_ms >= 40


def test_request_id_is_echoed_and_logged_and_json_logs_parse(start_broker, collection_name):
    config = start_broker.base_config()
    config["log"] = {"format": "json"}
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        _, call = stub.Insert.with_call(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})]),
            metadata=(("x-request-id", "worker-7.job-42"),),
        )
        assert ("x-request-id", "worker-7.job-42") in call.trailing_metadata()
        _, call = stub.Insert.with_call(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"a": 2})]),
            metadata=(("x-request-id", "bad id with spaces"),),
        )
        generated = str(dict(call.trailing_metadata())["x-request-id"])
        assert re.fullmatch(r"[0-9a-f]{16}", generated)
    proc.stop()
    lines = [json.loads(line) for line in proc.log_text().splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry["logger"] == "mongo_broker.access"]
    assert {entry["request_id"] for entry in access} >= {"worker-7.job-42", generated}
    entry = next(e for e in access if e["request_id"] == "worker-7.job-42")
    assert entry["method"] == "Insert" and entry["code"] == "OK" and entry["documents"] == 1
    assert entry["collection"] == collection_name and entry["bytes"] > 0
