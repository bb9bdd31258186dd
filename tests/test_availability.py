"""One bad connection is not an outage; a database that is really down still fails fast.

An operation's network error marks the server Unknown, and the SDAM spec
forbids the driver to check it again at once: without help it stays Unknown
until the next heartbeat. The broker must neither refuse every call meanwhile
(fail_fast) nor make each wait for that heartbeat; it fails fast only once a
heartbeat has found the database down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import bson
import grpc
import pytest
from bson.decimal128 import Decimal128
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.process import free_port
from tests.conftest import proxied_config
from tests.rpc import database_stats, eventually, fails, open_stub, pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


@pytest.mark.parametrize("fail_fast", [True, False])
def test_one_dropped_connection_does_not_black_out_the_database(
    start_broker, collection_name, real_mongodb, fail_fast
):
    if real_mongodb:
        pytest.skip("real MongoDB stores Decimal128; this needs a server that drops the connection on it")
    # The default heartbeat (5 s): a blackout until the next one would be plain to see.
    config = start_broker.base_config(fail_fast=fail_fast)
    config["health"] = {"tcp": f"127.0.0.1:{free_port()}"}
    proc = start_broker(config)
    health_channel = grpc.insecure_channel(config["health"]["tcp"])
    health = health_pb2_grpc.HealthStub(health_channel)

    def status(service: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    try:
        with open_stub(proc.unix_target) as stub:
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})]
                ),
                timeout=10,
            )
            # Health learns of the first discovery from pymongo's SDAM events,
            # published once a second.
            assert eventually(lambda: status("appdb") == SERVING, timeout=15)
            for _ in range(2):
                # FerretDB cannot store Decimal128 and drops the connection.
                with fails(grpc.StatusCode.UNAVAILABLE):
                    stub.Insert(
                        pb.InsertRequest(
                            database="appdb",
                            collection=collection_name,
                            documents=[bson.encode({"d": Decimal128("1.5")})],
                        ),
                        timeout=10,
                    )
                assert status("appdb") == SERVING

                def find_one() -> object:
                    return stub.FindOne(
                        pb.FindRequest(database="appdb", collection=collection_name), timeout=10
                    )

                def ping() -> object:
                    (db,) = stub.Ping(pb.PingRequest(database="appdb"), timeout=10).databases
                    assert db.ok
                    return db

                # Unrelated calls right after the drop, at once: none is refused.
                with ThreadPoolExecutor(15) as pool:
                    outcomes = list(pool.map(_outcome, [find_one] * 10 + [ping] * 5))
                assert outcomes == ["OK"] * 15, outcomes
                assert status("appdb") == SERVING and status("") == SERVING
                assert database_stats(stub).available
    finally:
        health_channel.close()


def test_fail_fast_still_refuses_at_once_once_heartbeats_find_the_database_down(
    start_broker, proxy, collection_name
):
    config = proxied_config(
        start_broker,
        proxy,
        heartbeat_frequency_ms=500,
        server_selection_timeout_ms=3000,
        connect_timeout_ms=500,
    )
    config["health"] = {"tcp": f"127.0.0.1:{free_port()}"}
    proc = start_broker(config)
    health_channel = grpc.insecure_channel(config["health"]["tcp"])
    health = health_pb2_grpc.HealthStub(health_channel)

    def appdb_status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service="appdb"), timeout=10).status

    try:
        with open_stub(proc.unix_target) as stub:
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})]
                ),
                timeout=10,
            )
            assert eventually(lambda: appdb_status() == SERVING, timeout=15)
            proxy.disable()
            assert eventually(lambda: appdb_status() == NOT_SERVING, timeout=15)
            latencies = []
            for _ in range(5):
                start = time.monotonic()
                with fails(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"):
                    stub.FindOne(pb.FindRequest(database="appdb", collection=collection_name), timeout=10)
                latencies.append(time.monotonic() - start)
            # Refused without waiting out server_selection_timeout_ms (3 s).
            assert max(latencies) < 1.0, latencies
            proxy.enable()
            assert eventually(lambda: appdb_status() == SERVING, timeout=15)
            assert stub.FindOne(
                pb.FindRequest(database="appdb", collection=collection_name), timeout=10
            ).documents
    finally:
        health_channel.close()
