"""FindOne: the unary lookup, its agreement with Find, its bad paths, and the client's use of it."""

from __future__ import annotations

import json
from concurrent import futures
from typing import Any

import bson
import grpc
import pytest
from broker_client import BrokerClient
from broker_client.errors import BrokerError
from broker_client.proto.broker.v1 import broker_pb2_grpc

from broker.errors import Reason, RpcError
from tests.rpc import database_stats, fails, find_all, pb


@pytest.fixture
def filled(broker, stub, collection_name):
    """n = 0..49, inserted in shuffled order."""
    documents = [bson.encode({"n": (i * 17) % 50, "tag": "t" * 20}) for i in range(50)]
    stub.Insert(pb.InsertRequest(database=broker.db_name, collection=collection_name, documents=documents))
    return collection_name


def test_answers_what_find_with_limit_one_answers_byte_for_byte(broker, stub, filled):
    for fields in (
        {"filter": bson.encode({"n": 33})},
        {"sort": bson.encode({"n": -1})},
        {"sort": bson.encode({"n": 1}), "skip": 7, "projection": bson.encode({"_id": 0, "n": 1})},
        {"filter": bson.encode({"n": {"$gte": 10}}), "sort": bson.encode({"n": 1}), "limit": 1},
    ):
        request = pb.FindRequest(database=broker.db_name, collection=filled, **fields)
        one = stub.FindOne(request, timeout=10)
        as_find = pb.FindRequest()
        as_find.CopyFrom(request)
        as_find.limit = 1
        streamed = [d for message in stub.Find(as_find, timeout=10) for d in message.documents]
        assert list(one.documents) == streamed, fields
        assert len(one.documents) == 1
    seventh = pb.FindRequest(database=broker.db_name, collection=filled, sort=bson.encode({"n": 1}), skip=7)
    assert bson.decode(stub.FindOne(seventh, timeout=10).documents[0])["n"] == 7


def test_no_match_and_missing_collection_answer_no_document(broker, stub, filled, collection_name):
    none = stub.FindOne(
        pb.FindRequest(database=broker.db_name, collection=filled, filter=bson.encode({"n": 999})), timeout=10
    )
    assert list(none.documents) == [] and list(none.json_documents) == []
    missing = stub.FindOne(pb.FindRequest(database=broker.db_name, collection=collection_name + "_absent"))
    assert list(missing.documents) == []


def test_limit_above_one_is_refused_and_names_find(broker, stub, filled):
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST") as failure:
        stub.FindOne(pb.FindRequest(database=broker.db_name, collection=filled, limit=2), timeout=10)
    assert "limit must be 0 or 1, got 2" in failure.message and "use Find" in failure.message


def test_extended_json_both_ways(broker, stub, filled):
    response = stub.FindOne(
        pb.FindRequest(
            database=broker.db_name,
            collection=filled,
            encoding=pb.ENCODING_CANONICAL_JSON,
            filter_json='{"n": {"$numberInt": "12"}}',
            projection_json='{"_id": 0}',
        ),
        timeout=10,
    )
    assert list(response.documents) == []
    (text,) = response.json_documents
    assert json.loads(text) == {"n": {"$numberInt": "12"}, "tag": "t" * 20}


def test_request_id_comes_back_in_the_trailers_on_success_and_on_failure(broker, stub, filled):
    request = pb.FindRequest(database=broker.db_name, collection=filled)
    _, call = stub.FindOne.with_call(request, metadata=(("x-request-id", "lookup-1"),), timeout=10)
    assert ("x-request-id", "lookup-1") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as caught:
        stub.FindOne(
            pb.FindRequest(database=broker.db_name, collection=filled, limit=5),
            metadata=(("x-request-id", "lookup-2"),),
            timeout=10,
        )
    error: Any = caught.value  # grpc.RpcError is also the call, as typed stubs do not say
    trailers = dict(error.trailing_metadata())
    assert trailers["x-request-id"] == "lookup-2"
    assert "grpc-status-details-bin" in trailers  # the rich details survive alongside


def test_counted_as_findone_and_leaves_no_cursor_or_connection_in_use(broker, stub, filled):
    before = database_stats(stub, broker.db_name)
    for n in range(20):
        request = pb.FindRequest(database=broker.db_name, collection=filled, filter=bson.encode({"n": n}))
        response = stub.FindOne(request, timeout=10)
        assert bson.decode(response.documents[0])["n"] == n
    after = database_stats(stub, broker.db_name)
    assert after.rpcs["FindOne"] - before.rpcs.get("FindOne", 0) == 20
    assert after.open_cursors == 0 and after.connections_in_use == 0
    # A single-batch find: one find command each, no getMore or killCursors.
    assert after.operations["find"] - before.operations.get("find", 0) == 20
    assert after.operations.get("killCursors", 0) == before.operations.get("killCursors", 0)


def test_python_client_find_one_is_one_findone_call(broker, stub, filled):
    before = database_stats(stub, broker.db_name)
    with BrokerClient(broker.unix_target) as client:
        collection = client[broker.db_name][filled]
        found = collection.find_one({"n": 4})
        last = collection.find_one(sort=[("n", -1)])
        assert collection.find_one({"n": 4000}) is None
    assert found is not None and found["n"] == 4
    assert last is not None and last["n"] == 49
    after = database_stats(stub, broker.db_name)
    assert after.rpcs["FindOne"] - before.rpcs.get("FindOne", 0) == 3
    assert after.rpcs.get("Find", 0) == before.rpcs.get("Find", 0)


class _FindOnlyBroker(broker_pb2_grpc.BrokerServicer):
    """A servicer without FindOne: the base servicer answers it UNIMPLEMENTED, from gRPC itself."""

    def __init__(self) -> None:
        self.finds: list[pb.FindRequest] = []

    def Find(self, request, context):
        self.finds.append(request)
        yield pb.FindResponse(documents=[bson.encode({"_id": 1, "old": True})])


class _NotSupportedBroker(_FindOnlyBroker):
    """A broker whose database refuses the query: its own UNIMPLEMENTED, with a reason."""

    def FindOne(self, request, context):
        error = RpcError(grpc.StatusCode.UNIMPLEMENTED, "the database cannot do that", Reason.NOT_SUPPORTED)
        context.abort_with_status(error.to_status())


@pytest.fixture
def serve(tmp_path):
    servers: list[grpc.Server] = []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)
        target = f"unix://{tmp_path}/{len(servers)}.sock"
        server.add_insecure_port(target)
        server.start()
        servers.append(server)
        return target

    yield start
    for server in servers:
        server.stop(0)


@pytest.mark.parametrize(
    ("servicer_class", "reason"), [(_FindOnlyBroker, ""), (_NotSupportedBroker, "NOT_SUPPORTED")]
)
def test_python_client_find_one_raises_unimplemented_as_it_comes(serve, servicer_class, reason):
    # gRPC's own UNIMPLEMENTED (no such method) and the broker's (the database
    # refuses the query) alike: find_one makes no other call in their place.
    servicer = servicer_class()
    with BrokerClient(serve(servicer)) as client, pytest.raises(BrokerError) as caught:
        client["appdb"]["items"].find_one({"_id": 1})
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED and caught.value.reason == reason
    assert servicer.finds == []


def test_find_and_findone_agree_on_an_empty_filter(broker, stub, filled):
    documents, _ = find_all(stub, database=broker.db_name, collection=filled, limit=1)
    one = stub.FindOne(pb.FindRequest(database=broker.db_name, collection=filled), timeout=10)
    assert [bson.decode(d) for d in one.documents] == documents
