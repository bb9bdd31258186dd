"""Queue-time coalescing: waiting Inserts and FindOne lookups share round trips, each its own answer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import bson
import grpc
import pytest
from bson import ObjectId

from tests.conftest import proxied_config
from tests.rpc import database_stats, open_stub, pb

CALLS = 24
# Every round trip is slow, and the pool has one connection: calls queue.
LATENCY_MS = 40


@pytest.fixture
def slow_broker(start_broker, proxy):
    proxy.add_toxic("latency", latency=LATENCY_MS)
    return start_broker(
        proxied_config(
            start_broker, proxy, max_pool_size=1, max_waiting=200, min_pool_size=1, coalesce_max_calls=64
        )
    )


def _together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run every call at once (threads released together); each one's result or exception."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        start.wait()
        try:
            return call()
        except grpc.RpcError as exc:
            return exc

    with futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _insert(stub: Any, collection: str, document: dict[str, Any], timeout: float = 30) -> Callable[[], Any]:
    request = pb.InsertRequest(database="appdb", collection=collection, documents=[bson.encode(document)])
    return lambda: stub.Insert(request, timeout=timeout)


def test_waiting_inserts_share_round_trips_and_each_gets_its_own_id(
    slow_broker, collection_name, mongo_collection
):
    with open_stub(slow_broker.unix_target) as stub:
        before = database_stats(stub)
        ids = [ObjectId() for _ in range(CALLS)]
        replies = _together([_insert(stub, collection_name, {"_id": i, "n": n}) for n, i in enumerate(ids)])
        after = database_stats(stub)
    assert all(not isinstance(r, Exception) for r in replies), replies
    assert [bson.decode(r.inserted_ids[0])["_id"] for r in replies] == ids
    assert sorted(d["n"] for d in mongo_collection.find()) == list(range(CALLS))
    carried = after.coalesced_calls - before.coalesced_calls
    trips = after.coalesced_round_trips - before.coalesced_round_trips
    assert trips >= 1 and carried >= 2 * trips, (trips, carried)
    # Fewer inserts reached the server than calls were made.
    assert after.operations["insert"] - before.operations.get("insert", 0) < CALLS


def test_a_duplicate_in_a_coalesced_batch_fails_only_its_own_caller(
    slow_broker, collection_name, mongo_collection
):
    mongo_collection.insert_one({"_id": "taken"})
    documents: list[dict[str, Any]] = [{"_id": f"d{n}"} for n in range(CALLS)]
    documents[CALLS // 2] = {"_id": "taken", "mine": True}
    with open_stub(slow_broker.unix_target) as stub:
        before = database_stats(stub)
        replies = _together([_insert(stub, collection_name, d) for d in documents])
        after = database_stats(stub)
    failed = [n for n, r in enumerate(replies) if isinstance(r, grpc.RpcError)]
    assert failed == [CALLS // 2]
    assert replies[CALLS // 2].code() == grpc.StatusCode.ALREADY_EXISTS
    assert mongo_collection.count_documents({}) == CALLS
    assert mongo_collection.find_one({"_id": "taken"}) == {"_id": "taken"}
    assert after.coalesced_calls > before.coalesced_calls


def test_a_caller_whose_deadline_passes_mid_batch_alone_times_out(
    slow_broker, collection_name, mongo_collection
):
    documents = [{"_id": f"d{n}"} for n in range(CALLS)]
    with open_stub(slow_broker.unix_target) as stub:
        calls = [_insert(stub, collection_name, d) for d in documents]
        # One caller gives the queue almost no time: it cannot be served in time.
        calls[-1] = _insert(stub, collection_name, documents[-1], timeout=0.02)
        replies = _together(calls)
    assert isinstance(replies[-1], grpc.RpcError)
    assert replies[-1].code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(not isinstance(r, Exception) for r in replies[:-1]), replies
    stored = {d["_id"] for d in mongo_collection.find()}
    # Every acknowledged insert is stored; the timed-out one may or may not be
    # (it is left out of a group it had not gone out with yet).
    assert {d["_id"] for d in documents[:-1]} <= stored


def test_waiting_lookups_by_id_share_a_find_and_each_gets_its_own_document(
    slow_broker, collection_name, mongo_collection
):
    mongo_collection.insert_many([{"_id": n, "v": f"value {n}"} for n in range(CALLS)])
    with open_stub(slow_broker.unix_target) as stub:
        before = database_stats(stub)

        def lookup(n: int) -> Callable[[], Any]:
            # Some ids are missing: their callers must get no document.
            request = pb.FindRequest(
                database="appdb", collection=collection_name, filter=bson.encode({"_id": n})
            )
            return lambda: stub.FindOne(request, timeout=30)

        wanted = [n if n % 5 else n + 1000 for n in range(CALLS)]
        replies = _together([lookup(n) for n in wanted])
        after = database_stats(stub)
    for n, reply in zip(wanted, replies, strict=True):
        assert not isinstance(reply, Exception), reply
        found = [bson.decode(d) for d in reply.documents]
        assert found == ([] if n >= 1000 else [{"_id": n, "v": f"value {n}"}]), n
    assert after.coalesced_calls > before.coalesced_calls
    assert after.operations["find"] - before.operations.get("find", 0) < CALLS


def test_a_lone_call_never_waits_for_company(start_broker, collection_name, mongo_collection):
    broker = start_broker(start_broker.base_config(coalesce_max_calls=64))
    with open_stub(broker.unix_target) as stub:
        for n in range(20):
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode({"n": n})]
                ),
                timeout=10,
            )
        stats = database_stats(stub)
    assert (stats.coalesced_round_trips, stats.coalesced_calls) == (0, 0)
    assert mongo_collection.count_documents({}) == 20


def test_coalescing_is_off_by_default(start_broker, proxy, collection_name, mongo_collection):
    proxy.add_toxic("latency", latency=LATENCY_MS)
    config = proxied_config(start_broker, proxy, max_pool_size=1, max_waiting=200)
    broker = start_broker(config)
    with open_stub(broker.unix_target) as stub:
        replies = _together([_insert(stub, collection_name, {"n": n}) for n in range(8)])
        stats = database_stats(stub)
    assert all(not isinstance(r, Exception) for r in replies)
    assert stats.coalesced_calls == 0
    assert mongo_collection.count_documents({}) == 8
