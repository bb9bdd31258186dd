"""Find streams whose client never reads: they end at their time limit and lock nobody out.

A client that opens streams without a deadline and never reads them blocks
the broker's writes on HTTP/2 flow control. Such a stream must end at its
time limit (DEADLINE_EXCEEDED, server cursor closed), hold about one batch
while it waits, and never take the room Ping, Stats and health need.
"""

from __future__ import annotations

import json
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.rpc import database_stats, eventually, fails, open_stub, pb

PAD = 20_000  # bytes per document
DOCUMENTS = 1_000  # 20 MB: far more than a client's HTTP/2 windows take in


def _fill(mongo_collection) -> None:
    for start in range(0, DOCUMENTS, 250):
        mongo_collection.insert_many([{"n": n, "pad": "x" * PAD} for n in range(start, start + 250)])


def _metric(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("database") == "appdb":
                return sample.value
    return 0.0


def test_parked_streams_end_at_their_time_limit_and_leave_room_for_ping_stats_and_health(
    start_broker, collection_name, mongo_collection
):
    limit = 6
    timeout_ms = 10_000
    # A connection for each stream and a wait as long as the time limit: on
    # a slow machine a 2 MB first batch from FerretDB takes a second or more,
    # and every parked stream must get its cursor before the first of them
    # reaches its limit (a queued one refused after wait_queue_timeout_ms,
    # or still waiting, would never hold one).
    config = start_broker.base_config(
        max_pool_size=limit,
        min_pool_size=0,
        max_waiting=10,
        wait_queue_timeout_ms=timeout_ms,
        default_timeout_ms=timeout_ms,
    )
    config["server"] = {"max_concurrent_rpcs": limit}
    config["metrics"] = {"listen": "127.0.0.1:0"}
    proc = start_broker(config)
    metrics = json.loads(proc.ready_path.read_text())["metrics"]
    _fill(mongo_collection)
    # The parking client has a connection of its own, as another worker would.
    parking = grpc.insecure_channel(
        proc.unix_target,
        options=[("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 32 << 20)],
    )
    find = parking.unary_stream(
        "/broker.v1.Broker/Find",
        request_serializer=pb.FindRequest.SerializeToString,
        response_deserializer=pb.FindResponse.FromString,
    )
    health_channel = grpc.insecure_channel(proc.unix_target)
    health = health_pb2_grpc.HealthStub(health_channel)
    try:
        with open_stub(proc.unix_target) as stub:
            kills_before = database_stats(stub).operations.get("killCursors", 0)
            # Health learns of the first discovery from pymongo's SDAM events,
            # published once a second.
            assert eventually(
                lambda: health.Check(health_pb2.HealthCheckRequest(service="appdb"), timeout=10).status == 1,
                timeout=15,
            )
            # More streams than the data-plane limit, no deadline, never read.
            parked = [
                find(pb.FindRequest(database="appdb", collection=collection_name)) for _ in range(limit + 2)
            ]
            assert eventually(lambda: database_stats(stub).open_cursors == limit, timeout=30)
            assert database_stats(stub).rpcs_in_flight == limit

            # Another data-plane call is refused by the broker, with a reason and a RetryInfo...
            with fails(grpc.StatusCode.RESOURCE_EXHAUSTED, "POOL_EXHAUSTED") as failure:
                stub.FindOne(pb.FindRequest(database="appdb", collection=collection_name), timeout=10)
            assert "server.max_concurrent_rpcs" in failure.message
            # ...while Ping, Stats and health on the same listener still answer.
            for _ in range(3):
                assert stub.Ping(pb.PingRequest(), timeout=10).databases[0].ok
                assert stub.Ping(pb.PingRequest(database="appdb"), timeout=10).databases[0].ok
                assert database_stats(stub).database == "appdb"
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
                assert health.Check(health_pb2.HealthCheckRequest(service="appdb"), timeout=10).status == 1

            # At their time limit the parked streams end although nobody reads
            # them: their server cursors are closed and each is counted.
            assert eventually(
                lambda: (
                    database_stats(stub).open_cursors == 0
                    and _metric(metrics, "mongo_broker_stalled_streams_total") == limit
                ),
                timeout=timeout_ms / 1000 + 20,
            )
            stats = database_stats(stub)
            assert stats.operations.get("killCursors", 0) == kills_before + limit
            assert stats.connections_in_use == 0
            # Their DEADLINE_EXCEEDED waits in gRPC behind the unread message,
            # holding the call's slot until the client reads or goes away; the
            # reserve still answers Ping, Stats and health meanwhile.
            assert stub.Ping(pb.PingRequest(database="appdb"), timeout=10).databases[0].ok
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
            codes = []
            for call in parked:
                try:
                    for _ in call:
                        pass
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
            # The two over the limit were refused at once; the rest timed out.
            assert sorted(codes) == sorted(["DEADLINE_EXCEEDED"] * limit + ["RESOURCE_EXHAUSTED"] * 2), codes
            # Once the client has read its answers, every slot is free again.
            assert eventually(lambda: database_stats(stub).rpcs_in_flight == 0, timeout=20)
            assert stub.FindOne(
                pb.FindRequest(database="appdb", collection=collection_name), timeout=10
            ).documents
    finally:
        parking.close()
        health_channel.close()


def test_find_batches_are_sized_to_about_one_message(start_broker, collection_name, mongo_collection):
    """A Find holds about one message's worth of documents per batch, not batch_size of any size."""
    proc = start_broker(start_broker.base_config())
    _fill(mongo_collection)
    with open_stub(proc.unix_target) as stub:

        def read() -> tuple[int, int, list[int]]:
            before = database_stats(stub).operations.get("getMore", 0)
            sizes = [
                len(m.documents)
                for m in stub.Find(pb.FindRequest(database="appdb", collection=collection_name), timeout=60)
            ]
            return sum(sizes), database_stats(stub).operations.get("getMore", 0) - before, sizes

        total, get_mores, sizes = read()
        assert total == DOCUMENTS
        # 1 MiB messages hold 52 documents of 20 KB: each getMore asks for
        # about that many, not default_batch_size (1000).
        assert get_mores >= (DOCUMENTS - 101) // 53, (get_mores, sizes)
        assert max(sizes) <= 52
        # A second Find starts from the size the first one saw.
        total, get_mores, sizes = read()
        assert total == DOCUMENTS and sizes[0] <= 52 and get_mores >= DOCUMENTS // 53
