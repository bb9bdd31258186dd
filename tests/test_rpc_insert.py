"""Insert over the raw contract: ids, type fidelity, and every bad path."""

from __future__ import annotations

import datetime
import uuid
from concurrent import futures
from typing import Any

import bson
import grpc
import pytest
from broker_client import BrokerClient
from bson import Binary, Decimal128, Int64, ObjectId
from bson.raw_bson import RawBSONDocument

from tests.rawbson import array, document
from tests.rpc import database_stats, fails, find_all, open_stub, pb


def _ids(reply: Any) -> list[Any]:
    return [bson.decode(raw)["_id"] for raw in reply.inserted_ids]


def test_insert_keeps_given_ids_and_generates_missing_ones(broker, stub, collection_name, mongo_collection):
    given = ObjectId()
    documents: list[dict[str, Any]] = [
        {"_id": given, "n": 0},
        {"n": 1},
        {"_id": "text-id", "n": 2},
        {"_id": 7, "n": 3},
    ]
    reply = stub.Insert(
        pb.InsertRequest(
            database=broker.db_name,
            collection=collection_name,
            documents=[bson.encode(d) for d in documents],
        )
    )
    ids = _ids(reply)
    assert reply.inserted_count == 4
    assert ids[0] == given and ids[2] == "text-id" and ids[3] == 7
    assert isinstance(ids[1], ObjectId)
    stored = {d["n"]: d for d in mongo_collection.find()}
    assert [stored[n]["_id"] for n in range(4)] == ids
    # The generated _id goes first, as pymongo puts it; the rest is untouched.
    raw = mongo_collection.with_options(
        codec_options=bson.CodecOptions(document_class=RawBSONDocument)
    ).find_one({"n": 1})
    assert list(raw.keys()) == ["_id", "n"]


def _fidelity_document(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "_id": ObjectId(),
        "when": datetime.datetime(2024, 2, 29, 12, 30, 15, 123000),
        "big": Int64(2**62),
        "small": 42,
        "ratio": 0.25,
        "blob": Binary(b"\x00\x01\xff", 0x80),
        "uuid": Binary(uuid.UUID("12345678-1234-5678-1234-567812345678").bytes, 4),
        "nested": {"a": {"b": [1, "two", {"c": None}]}, "flag": True},
        "text": "grüße ✓",
        **extra,
    }


def _round_trip(broker, stub, collection_name, document: dict[str, Any]) -> None:
    encoded = bson.encode(document)
    stub.Insert(pb.InsertRequest(database=broker.db_name, collection=collection_name, documents=[encoded]))
    (message,) = stub.Find(pb.FindRequest(database=broker.db_name, collection=collection_name))
    (raw,) = message.documents
    # Byte for byte: nothing was decoded and re-encoded on the way.
    assert raw == encoded
    back = bson.decode(raw)
    assert back == document
    assert type(back["big"]) is Int64 and type(back["small"]) is int
    assert back["blob"].subtype == 0x80 and back["uuid"].subtype == 4


def test_types_round_trip_exactly(broker, stub, collection_name):
    _round_trip(broker, stub, collection_name, _fidelity_document({}))


@pytest.mark.mongod
def test_decimal128_round_trips_exactly(broker, stub, collection_name):
    document = _fidelity_document({"price": Decimal128("1234.5678901234567890")})
    _round_trip(broker, stub, collection_name, document)


def test_ordered_insert_stops_at_duplicate_and_says_how_many_landed(
    broker, stub, collection_name, mongo_collection
):
    documents = [bson.encode({"_id": i}) for i in (1, 2, 2, 3)]
    with fails(grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_KEY") as failure:
        stub.Insert(
            pb.InsertRequest(database=broker.db_name, collection=collection_name, documents=documents)
        )
    assert failure.metadata["mongo_code"] == "11000"
    assert failure.metadata["failed_index"] == "2"
    assert failure.metadata["inserted_count"] == "2"
    assert sorted(d["_id"] for d in mongo_collection.find()) == [1, 2]


def test_unordered_insert_carries_on_past_duplicate(broker, stub, collection_name, mongo_collection):
    documents = [bson.encode({"_id": i}) for i in (1, 1, 2)]
    with fails(grpc.StatusCode.ALREADY_EXISTS) as failure:
        stub.Insert(
            pb.InsertRequest(
                database=broker.db_name,
                collection=collection_name,
                documents=documents,
                ordered=False,
            )
        )
    assert failure.metadata["inserted_count"] == "2"
    assert sorted(d["_id"] for d in mongo_collection.find()) == [1, 2]


def test_retried_insert_with_client_id_is_detected_as_duplicate(
    broker, stub, collection_name, mongo_collection
):
    document = bson.encode({"_id": ObjectId(), "v": 1})
    request = pb.InsertRequest(database=broker.db_name, collection=collection_name, documents=[document])
    stub.Insert(request)
    with fails(grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_KEY"):
        stub.Insert(request)
    assert mongo_collection.count_documents({}) == 1


def test_write_concern_is_accepted(broker, stub, collection_name, mongo_collection):
    reply = stub.Insert(
        pb.InsertRequest(
            database=broker.db_name,
            collection=collection_name,
            documents=[bson.encode({"x": 1})],
            write_concern=pb.WriteConcern(w_nodes=1, j=True, wtimeout_ms=1000),
        )
    )
    assert reply.inserted_count == 1
    assert mongo_collection.count_documents({}) == 1


@pytest.mark.parametrize(
    ("documents", "needle"),
    [
        ([], "documents is empty"),
        ([b"not bson"], "documents[0] is not a valid BSON document"),
        ([bson.encode({"ok": 1}), bson.encode({"a": 1})[:-1]], "documents[1] is not a valid BSON"),
        ([bson.encode({"ok": 1}) + b"\x00"], "documents[0]"),
        ([bson.encode({"s": "x"}).replace(b"x", b"\xff")], "utf-8"),
        (
            [bson.encode({"ok": 1}), document(("_id", 1), ("n", 1), ("_id", 2))],
            "documents[1]._id: duplicate key",
        ),
        (
            [document(("a", document(("b", array({"c": 1}, document(("d", 1), ("d", 2)))))))],
            "documents[0].a.b[1].d: duplicate key",
        ),
    ],
    ids=["empty", "garbage", "truncated", "trailing-byte", "bad-utf8", "duplicate-id", "duplicate-deep"],
)
def test_bad_documents_are_rejected_and_nothing_is_stored(
    broker, stub, collection_name, mongo_collection, documents, needle
):
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        stub.Insert(
            pb.InsertRequest(database=broker.db_name, collection=collection_name, documents=documents)
        )
    assert needle in failure.message
    assert mongo_collection.count_documents({}) == 0


def _document_of_size(size: int, **fields: Any) -> bytes:
    """A document of exactly ``size`` bytes: ``fields`` and a binary filling the rest."""
    empty = len(bson.encode({**fields, "blob": Binary(b"")}))
    encoded = bson.encode({**fields, "blob": Binary(b"x" * (size - empty))})
    assert len(encoded) == size
    return encoded


def test_document_over_the_server_limit_is_refused_and_nothing_is_stored(
    broker, stub, collection_name, mongo, mongo_collection
):
    # pymongo does not check a RawBSONDocument's size; a server that stored
    # one larger than its maxBsonObjectSize could not send it back.
    limit = mongo.admin.command("hello")["maxBsonObjectSize"]
    small = bson.encode({"_id": 1})
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED") as failure:
        stub.Insert(
            pb.InsertRequest(
                database=broker.db_name,
                collection=collection_name,
                documents=[small, _document_of_size(limit + 1, _id=2)],
            ),
            timeout=60,
        )
    assert failure.message.startswith(f"documents[1] is {limit + 1} bytes")
    assert f"maxBsonObjectSize ({limit} bytes)" in failure.message
    assert failure.metadata["index"] == "1"
    # Without an _id the broker adds one (17 bytes): that counts too.
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED") as failure:
        stub.Insert(
            pb.InsertRequest(
                database=broker.db_name, collection=collection_name, documents=[_document_of_size(limit - 16)]
            ),
            timeout=60,
        )
    assert f"with the _id the broker added ({limit - 16} as sent)" in failure.message
    assert mongo_collection.count_documents({}) == 0


def test_the_largest_document_the_server_holds_round_trips_through_the_client(broker, collection_name, mongo):
    limit = mongo.admin.command("hello")["maxBsonObjectSize"]
    largest = _document_of_size(limit, _id="largest")
    with BrokerClient(broker.unix_target, timeout=120) as client:
        collection = client[broker.db_name][collection_name]
        collection.insert_one(RawBSONDocument(largest))
        (found,) = list(collection.find({}))
        assert bson.encode(found) == largest
        one = collection.find_one({"_id": "largest"})
        assert one is not None and bson.encode(one) == largest


def test_ping_answers_while_a_large_insert_is_validated(broker, stub, collection_name, mongo_collection):
    # Three 8 MB documents of tiny fields: validating them takes the broker
    # a second or more. w_nodes=0 is refused right after validation, so the
    # Insert answers as soon as its validation ends, and stores nothing.
    big = bson.encode({f"k{i:06d}": 1 for i in range(600_000)})
    request = pb.InsertRequest(
        database=broker.db_name,
        collection=collection_name,
        documents=[big, big, big],
        write_concern=pb.WriteConcern(w_nodes=0),
    )
    with futures.ThreadPoolExecutor(1) as pool:
        insert = pool.submit(stub.Insert, request, timeout=120)
        # Wait until the broker has the Insert in hand: while validation held
        # the event loop, no other call could even see it in flight.
        while database_stats(stub, broker.db_name, timeout=120).rpcs_in_flight == 0 and not insert.done():
            pass
        assert not insert.done(), "the Insert was answered before any other call could run beside it"
        reply = stub.Ping(pb.PingRequest(database=broker.db_name), timeout=120)
        assert reply.databases[0].ok
        # Answered while the Insert is still being validated, not after it.
        assert not insert.done()
        with pytest.raises(grpc.RpcError) as caught:
            insert.result()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "w_nodes = 0" in (caught.value.details() or "")
    assert mongo_collection.count_documents({}) == 0


def test_negative_write_concern_is_invalid(broker, stub, collection_name):
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        stub.Insert(
            pb.InsertRequest(
                database=broker.db_name,
                collection=collection_name,
                documents=[bson.encode({"x": 1})],
                write_concern=pb.WriteConcern(w_nodes=-1),
            )
        )
    assert "w_nodes" in failure.message


def test_field_names_the_server_refuses_are_invalid_argument(broker, stub, collection_name):
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "QUERY_REJECTED") as failure:
        stub.Insert(
            pb.InsertRequest(
                database=broker.db_name,
                collection=collection_name,
                documents=[bson.encode({"$bad": 1})],
            )
        )
    assert failure.metadata["inserted_count"] == "0"


@pytest.mark.parametrize(
    ("database", "collection", "code", "needle"),
    [
        ("", "c", grpc.StatusCode.INVALID_ARGUMENT, "database is required"),
        ("nope", "c", grpc.StatusCode.NOT_FOUND, "'nope' is not configured"),
        ("appdb", "", grpc.StatusCode.INVALID_ARGUMENT, "collection is required"),
        ("appdb", "a$b", grpc.StatusCode.INVALID_ARGUMENT, "must not contain '$'"),
        ("appdb", "x" * 300, grpc.StatusCode.INVALID_ARGUMENT, "longer than 255"),
    ],
)
def test_bad_names(broker, stub, database, collection, code, needle):
    with fails(code) as failure:
        stub.Insert(
            pb.InsertRequest(database=database, collection=collection, documents=[bson.encode({"a": 1})])
        )
    assert needle in failure.message


def test_insert_then_find_through_tcp_listener(broker, collection_name):
    with open_stub(broker.tcp_target) as tcp:
        tcp.Insert(
            pb.InsertRequest(
                database=broker.db_name,
                collection=collection_name,
                documents=[bson.encode({"t": 1})],
            )
        )
        documents, _ = find_all(tcp, database=broker.db_name, collection=collection_name)
    assert [d["t"] for d in documents] == [1]
