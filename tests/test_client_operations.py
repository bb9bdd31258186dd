"""The bundled client's other operations: updates, deletes, find-and-modify, counts,
distinct, aggregate and bulk writes, in pymongo's names.

Most tests run against the live broker in front of the test server (FerretDB
unless a mongod is at hand) and read the collection back directly with
pymongo. What FerretDB lacks (collation, ``let``, array filters, update
pipelines, ``$out``) is checked as the request the client builds, in
tests/unit/test_client_requests.py, or here as the class of the error.

The retry rules and the error mapping are also checked over real gRPC
against an in-process fake broker, whose failures can be chosen exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import bson
import grpc
import pytest
from broker_client import (
    BrokerClient,
    BulkWriteError,
    BulkWriteResult,
    Collection,
    DeleteMany,
    DeleteOne,
    DeleteResult,
    DuplicateKeyError,
    InsertOne,
    InvalidOperation,
    OperationFailure,
    PermissionDenied,
    ReplaceOne,
    ReturnDocument,
    ServerSelectionTimeoutError,
    UnknownDatabase,
    UpdateMany,
    UpdateOne,
    UpdateResult,
    WriteError,
)
from broker_client.proto.broker.v1 import broker_pb2 as pb
from broker_client.proto.broker.v1 import broker_pb2_grpc
from bson import ObjectId
from bson.son import SON
from pymongo import ReadPreference
from pymongo.collation import Collation
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from broker.errors import RpcError

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def client(broker: Any) -> Iterator[BrokerClient[Doc]]:
    with BrokerClient(broker.unix_target) as c:
        yield c


@pytest.fixture
def items(client: BrokerClient[Doc], broker: Any, collection_name: str) -> Collection[Doc]:
    return client[broker.db_name][collection_name]


@pytest.fixture
def filled(items: Collection[Doc], mongo_collection: Any) -> Collection[Doc]:
    """Ten documents: ``_id`` 0..9, ``a`` = ``_id`` % 3, ``s`` alternating "a"/"B"."""
    mongo_collection.insert_many(
        [{"_id": i, "a": i % 3, "s": "B" if i % 2 else "a", "tags": ["x", f"t{i % 2}"]} for i in range(10)]
    )
    return items


def _stored(mongo_collection: Any) -> list[Doc]:
    return list(mongo_collection.find({}, sort=[("_id", 1)]))


def _is_refused_as_unsupported(error: BaseException) -> bool:
    code = getattr(error, "code", None)
    return code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT)


# --- update_one, update_many, replace_one ---------------------------------------------


def test_update_one_changes_the_first_match_only(filled: Collection[Doc], mongo_collection: Any) -> None:
    result = filled.update_one({"a": 1}, {"$set": {"seen": True}, "$inc": {"n": 2}})
    assert isinstance(result, UpdateResult)
    assert (result.matched_count, result.modified_count, result.upserted_id) == (1, 1, None)
    assert result.acknowledged and not result.did_upsert
    assert result.raw_result["n"] == 1 and result.raw_result["nModified"] == 1
    changed = list(mongo_collection.find({"seen": True}))
    assert len(changed) == 1 and changed[0]["a"] == 1 and changed[0]["n"] == 2


def test_update_many_changes_every_match(filled: Collection[Doc], mongo_collection: Any) -> None:
    result = filled.update_many({"a": 0}, {"$set": {"zero": 1}})
    assert (result.matched_count, result.modified_count) == (4, 4)
    assert sorted(d["_id"] for d in mongo_collection.find({"zero": 1})) == [0, 3, 6, 9]
    # Matched but already as asked: not modified.
    again = filled.update_many({"a": 0}, {"$set": {"zero": 1}})
    assert (again.matched_count, again.modified_count) == (4, 0)


def test_nothing_matched_is_zero_and_no_upsert(filled: Collection[Doc]) -> None:
    result = filled.update_one({"_id": 100}, {"$set": {"x": 1}})
    assert (result.matched_count, result.modified_count, result.upserted_id) == (0, 0, None)


def test_upsert_inserts_and_returns_the_id(items: Collection[Doc], mongo_collection: Any) -> None:
    result = items.update_one({"sku": "new"}, {"$set": {"qty": 1}}, upsert=True)
    assert result.matched_count == 0 and result.did_upsert
    assert isinstance(result.upserted_id, ObjectId)
    assert _stored(mongo_collection) == [{"_id": result.upserted_id, "sku": "new", "qty": 1}]
    # pymongo's positional upsert.
    positional = items.update_many({"_id": "chosen"}, {"$set": {"qty": 2}}, True)
    assert positional.upserted_id == "chosen"
    assert mongo_collection.find_one({"_id": "chosen"}) == {"_id": "chosen", "qty": 2}


def test_replace_one_replaces_the_whole_document(filled: Collection[Doc], mongo_collection: Any) -> None:
    result = filled.replace_one({"_id": 4}, {"whole": "new"})
    assert (result.matched_count, result.modified_count) == (1, 1)
    assert mongo_collection.find_one({"_id": 4}) == {"_id": 4, "whole": "new"}
    upserted = filled.replace_one({"_id": 50}, {"b": 1}, upsert=True)
    assert upserted.upserted_id == 50 and mongo_collection.find_one({"_id": 50}) == {"_id": 50, "b": 1}


def test_update_options_that_the_server_supports(filled: Collection[Doc], mongo_collection: Any) -> None:
    result = filled.update_one(
        {"_id": 1},
        {"$set": {"opt": 1}},
        bypass_document_validation=True,
        hint="_id_",
        comment="update with options",
        write_concern=WriteConcern(w=1),
    )
    assert result.modified_count == 1
    by_keys = filled.update_many({"a": 2}, {"$set": {"opt": 2}}, hint=[("_id", 1)], write_concern={"w": 1})
    assert by_keys.modified_count == 3
    replaced = filled.replace_one({"_id": 3}, {"r": 1}, hint={"_id": 1}, comment="replace")
    assert replaced.modified_count == 1
    assert mongo_collection.count_documents({"opt": {"$exists": True}}) == 4


def test_an_update_that_the_server_refuses_is_a_write_error(
    filled: Collection[Doc], mongo_collection: Any
) -> None:
    with pytest.raises(WriteError) as immutable:
        filled.update_one({"_id": 1}, {"$set": {"_id": 5}})
    assert immutable.value.mongo_code == 66
    assert immutable.value.details["code"] == 66 and immutable.value.details["index"] == 0
    assert immutable.value.attempts == 1
    with pytest.raises(WriteError) as mismatch:
        filled.update_one({"_id": 1}, {"$inc": {"s": 1}})
    assert mismatch.value.mongo_code == 14
    assert mongo_collection.find_one({"_id": 1})["s"] == "B"


def test_a_duplicate_key_on_upsert_is_a_duplicate_key_error(
    items: Collection[Doc], mongo_collection: Any
) -> None:
    mongo_collection.create_index("sku", unique=True)
    items.insert_one({"_id": 1, "sku": "k"})
    with pytest.raises(DuplicateKeyError) as info:
        items.update_one({"_id": 2, "sku": "k"}, {"$set": {"qty": 1}}, upsert=True)
    assert info.value.code is grpc.StatusCode.ALREADY_EXISTS and info.value.mongo_code == 11000
    assert info.value.details["code"] == 11000
    with pytest.raises(DuplicateKeyError):
        items.replace_one({"_id": 3}, {"sku": "k"}, upsert=True)
    assert _stored(mongo_collection) == [{"_id": 1, "sku": "k"}]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.update_one({}, {"a": 1}), r"update only works with \$ operators"),
        (lambda c: c.update_many({}, {"$set": {"a": 1}, "b": 2}), r"update only works with \$ operators"),
        (lambda c: c.update_one({}, {}), "update cannot be empty"),
        (lambda c: c.find_one_and_update({}, {"a": 1}), r"update only works with \$ operators"),
        (lambda c: c.replace_one({}, {"$set": {"a": 1}}), r"replacement can not include \$ operators"),
        (
            lambda c: c.find_one_and_replace({}, {"$inc": {"a": 1}}),
            r"replacement can not include \$ operators",
        ),
    ],
)
def test_bad_updates_and_replacements_are_refused_before_sending(call: Any, message: str) -> None:
    # Nothing listens there: a call that reached the channel would fail otherwise.
    client: BrokerClient[Doc] = BrokerClient("unix:///nonexistent/broker.sock", retries=None)
    with pytest.raises(ValueError, match=message):
        call(client["appdb"]["items"])
    assert client._holder.channels_created == 0


def test_the_broker_refuses_a_non_operator_update_too(broker: Any, collection_name: str) -> None:
    # Past the client's own check (the raw stub): the contract's answer.
    from tests.rpc import open_stub

    with open_stub(broker.unix_target) as stub, pytest.raises(grpc.RpcError) as info:
        stub.Update(
            pb.UpdateRequest(
                database=broker.db_name,
                collection=collection_name,
                filter=bson.encode({}),
                update=bson.encode({"a": 1}),
            ),
            timeout=10,
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# --- delete_one, delete_many ------------------------------------------------------------


def test_delete_one_and_delete_many(filled: Collection[Doc], mongo_collection: Any) -> None:
    one = filled.delete_one({"a": 1})
    assert isinstance(one, DeleteResult) and one.deleted_count == 1 and one.acknowledged
    assert mongo_collection.count_documents({"a": 1}) == 2
    many = filled.delete_many({"a": 1}, hint="_id_", comment="bye")
    assert many.deleted_count == 2 and many.raw_result == {"n": 2, "ok": 1.0}
    assert filled.delete_one({"a": 1}).deleted_count == 0
    everything = filled.delete_many({})
    assert everything.deleted_count == 7 and _stored(mongo_collection) == []


def test_a_delete_with_a_key_pattern_hint(filled: Collection[Doc], mongo_collection: Any) -> None:
    assert filled.delete_one({"_id": 2}, hint=[("_id", 1)]).deleted_count == 1
    assert mongo_collection.find_one({"_id": 2}) is None


# --- find_one_and_update, find_one_and_replace, find_one_and_delete ----------------------


def test_find_one_and_update_returns_before_or_after(filled: Collection[Doc], mongo_collection: Any) -> None:
    before = filled.find_one_and_update({"_id": 3}, {"$inc": {"a": 10}})
    assert before == {"_id": 3, "a": 0, "s": "B", "tags": ["x", "t1"]}
    after = filled.find_one_and_update({"_id": 3}, {"$inc": {"a": 10}}, return_document=ReturnDocument.AFTER)
    assert after is not None and after["a"] == 20
    assert mongo_collection.find_one({"_id": 3})["a"] == 20
    assert filled.find_one_and_update({"_id": 99}, {"$set": {"a": 1}}) is None


def test_find_one_and_update_sorts_to_choose_and_upserts(
    filled: Collection[Doc], mongo_collection: Any
) -> None:
    last = filled.find_one_and_update({"a": 0}, {"$set": {"picked": True}}, sort=[("_id", -1)], hint="_id_")
    assert last is not None and last["_id"] == 9
    assert [d["_id"] for d in mongo_collection.find({"picked": True})] == [9]
    # Upsert: nothing before, the new document after.
    assert filled.find_one_and_update({"_id": 100}, {"$set": {"new": 1}}, upsert=True) is None
    created = filled.find_one_and_update(
        {"_id": 101}, {"$set": {"new": 2}}, upsert=True, return_document=ReturnDocument.AFTER, maxTimeMS=5000
    )
    assert created == {"_id": 101, "new": 2}
    assert mongo_collection.find_one({"_id": 100}) == {"_id": 100, "new": 1}


def test_find_one_and_replace(filled: Collection[Doc], mongo_collection: Any) -> None:
    before = filled.find_one_and_replace({"_id": 5}, {"r": 1}, comment="replace")
    assert before is not None and before["a"] == 2
    assert mongo_collection.find_one({"_id": 5}) == {"_id": 5, "r": 1}
    after = filled.find_one_and_replace({"_id": 5}, {"r": 2}, return_document=ReturnDocument.AFTER)
    assert after == {"_id": 5, "r": 2}
    upserted = filled.find_one_and_replace(
        {"_id": 77}, {"r": 3}, upsert=True, return_document=ReturnDocument.AFTER
    )
    assert upserted == {"_id": 77, "r": 3}


def test_find_one_and_delete(filled: Collection[Doc], mongo_collection: Any) -> None:
    gone = filled.find_one_and_delete({"a": 2}, sort=[("_id", -1)])
    assert gone is not None and gone["_id"] == 8
    assert mongo_collection.find_one({"_id": 8}) is None
    assert filled.find_one_and_delete({"_id": 8}) is None
    assert mongo_collection.count_documents({}) == 9


def test_find_one_and_update_decodes_with_the_collection_codec_options(
    filled: Collection[Doc], broker: Any, client: BrokerClient[Doc]
) -> None:
    from bson.codec_options import CodecOptions

    son = client[broker.db_name].get_collection(filled.name, CodecOptions(document_class=SON))
    found = son.find_one_and_update({"_id": 1}, {"$set": {"z": 1}}, return_document=ReturnDocument.AFTER)
    assert isinstance(found, SON) and next(iter(found)) == "_id"
    assert isinstance(son.find_one({"_id": 1}), SON)


def test_a_duplicate_key_in_find_one_and_update_is_a_duplicate_key_error(
    items: Collection[Doc], mongo_collection: Any, real_mongodb: bool
) -> None:
    mongo_collection.create_index("sku", unique=True)
    items.insert_many([{"_id": 1, "sku": "a"}, {"_id": 2, "sku": "b"}])
    # FerretDB reports this one as its storage's constraint error, without
    # MongoDB's code 11000: a WriteError. mongod says duplicate key.
    with pytest.raises(DuplicateKeyError if real_mongodb else WriteError):
        items.find_one_and_update({"_id": 2}, {"$set": {"sku": "a"}})
    assert mongo_collection.find_one({"_id": 2}) == {"_id": 2, "sku": "b"}


# --- count_documents, estimated_document_count, distinct ---------------------------------


def test_count_documents_with_skip_limit_and_hint(filled: Collection[Doc]) -> None:
    assert filled.count_documents({}) == 10
    assert filled.count_documents({"a": 0}) == 4
    assert filled.count_documents({}, skip=2, limit=5) == 5
    assert filled.count_documents({}, skip=8) == 2
    assert filled.count_documents({"a": 0}, limit=3) == 3
    assert filled.count_documents({"a": 0}, skip=3, limit=3) == 1
    assert filled.count_documents({}, hint="_id_", comment="count", maxTimeMS=5000) == 10
    assert filled.count_documents({"_id": {"$gte": 5}}, hint=[("_id", 1)]) == 5
    assert filled.count_documents({"missing": 1}) == 0


def test_estimated_document_count(filled: Collection[Doc], items: Collection[Doc]) -> None:
    assert filled.estimated_document_count() == 10
    assert filled.estimated_document_count("estimate", maxTimeMS=5000) == 10


def test_distinct(filled: Collection[Doc]) -> None:
    assert sorted(filled.distinct("a")) == [0, 1, 2]
    assert sorted(filled.distinct("s", {"a": 0})) == ["B", "a"]
    # An array field's elements, each once.
    assert sorted(filled.distinct("tags")) == ["t0", "t1", "x"]
    assert filled.distinct("tags", {"_id": 0}, comment="d", maxTimeMS=5000) in (["x", "t0"], ["t0", "x"])
    assert filled.distinct("nowhere") == []


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.count_documents({}, collation={"locale": "fr"}),
        lambda c: c.find({}, collation=Collation("fr")).to_list(),
        lambda c: c.find_one({}, collation={"locale": "fr"}),
        lambda c: c.distinct("s", collation={"locale": "fr", "strength": 1}),
        lambda c: c.aggregate([{"$match": {}}], collation={"locale": "fr"}),
        lambda c: c.update_one({"_id": 1}, {"$set": {"b": 1}}, collation={"locale": "fr"}),
        lambda c: c.delete_one({"_id": 1}, collation={"locale": "fr"}),
        lambda c: c.update_one({"_id": 1}, {"$set": {"b": "$$v"}}, let={"v": 1}),
        lambda c: c.update_one({"_id": 1}, {"$set": {"tags.$[t]": "z"}}, array_filters=[{"t": "x"}]),
        lambda c: c.update_one({"_id": 1}, [{"$set": {"b": "$a"}}]),
        lambda c: c.find_one_and_update({"_id": 1}, {"$set": {"b": 1}}, projection={"b": 1}),
        lambda c: c.aggregate([{"$match": {"$expr": {"$eq": ["$a", "$$v"]}}}], let={"v": 1}),
    ],
    ids=[
        "count-collation",
        "find-collation",
        "find_one-collation",
        "distinct-collation",
        "aggregate-collation",
        "update-collation",
        "delete-collation",
        "update-let",
        "update-array_filters",
        "update-pipeline",
        "find_one_and_update-projection",
        "aggregate-let",
    ],
)
def test_what_the_test_server_lacks_reaches_it_and_is_refused(
    filled: Collection[Doc], real_mongodb: bool, call: Any
) -> None:
    # The option travels to the server, which answers it: mongod does it,
    # FerretDB refuses it as unsupported (or, for an update pipeline, as a
    # malformed update), and the broker maps the refusal.
    if real_mongodb:
        call(filled)
        return
    with pytest.raises(OperationFailure) as info:
        call(filled)
    assert _is_refused_as_unsupported(info.value), info.value


# --- aggregate ------------------------------------------------------------------------------


def test_aggregate_streams_several_batches(items: Collection[Doc], mongo_collection: Any) -> None:
    mongo_collection.insert_many([{"_id": i, "g": i % 4} for i in range(20)])
    cursor = items.aggregate([{"$match": {"_id": {"$gte": 3}}}, {"$sort": {"_id": 1}}], batchSize=5)
    # As pymongo's, aggregate() sends at once: the first batch is here.
    assert cursor.retrieved == 5
    first = [next(cursor) for _ in range(5)]
    assert [d["_id"] for d in first] == [3, 4, 5, 6, 7] and cursor.retrieved == 5
    assert next(cursor)["_id"] == 8 and cursor.retrieved == 10
    rest = cursor.to_list()
    assert [d["_id"] for d in rest] == list(range(9, 20))
    assert cursor.retrieved == 17 and not cursor.alive


def test_aggregate_groups_and_takes_its_options(filled: Collection[Doc]) -> None:
    grouped = list(
        filled.aggregate(
            [{"$group": {"_id": "$a", "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}],
            allowDiskUse=True,
            comment="agg",
            maxTimeMS=5000,
        )
    )
    assert grouped == [{"_id": 0, "n": 4}, {"_id": 1, "n": 3}, {"_id": 2, "n": 3}]
    hinted = filled.aggregate(
        [{"$match": {"a": 1}}, {"$project": {"_id": 1}}, {"$sort": {"_id": 1}}], hint="_id_"
    )
    assert hinted.to_list() == [{"_id": 1}, {"_id": 4}, {"_id": 7}]
    # pymongo allows an empty pipeline: every document.
    assert len(filled.aggregate([]).to_list()) == 10
    with filled.aggregate([{"$match": {}}], batchSize=2) as cursor:
        assert next(cursor)["_id"] in range(10)
    assert not cursor.alive


def test_a_pipeline_the_server_refuses_raises_from_aggregate_itself(filled: Collection[Doc]) -> None:
    with pytest.raises(OperationFailure) as info:
        filled.aggregate([{"$nosuchstage": {}}])
    assert info.value.code is not None


# --- bulk_write -------------------------------------------------------------------------------


def test_bulk_write_runs_every_kind_of_request(items: Collection[Doc], mongo_collection: Any) -> None:
    fresh: Doc = {"name": "made-id"}
    result = items.bulk_write(
        [
            InsertOne({"_id": 1, "n": 1}),
            InsertOne(fresh),
            UpdateOne({"_id": 10}, {"$set": {"n": 10}}, upsert=True),
            UpdateOne({"_id": 1}, {"$inc": {"n": 1}}),
            InsertOne({"_id": 2, "n": 2}),
            InsertOne({"_id": 3, "n": 3}),
            UpdateMany({"_id": {"$in": [2, 3]}}, {"$set": {"many": True}}),
            ReplaceOne({"_id": 3}, {"replaced": True}),
            DeleteOne({"_id": 2}),
            DeleteMany({"name": "made-id"}),
        ]
    )
    assert isinstance(result, BulkWriteResult) and result.acknowledged
    assert (result.inserted_count, result.matched_count, result.modified_count) == (4, 4, 4)
    assert (result.deleted_count, result.upserted_count, result.upserted_ids) == (2, 1, {2: 10})
    # The id was made here and set on the document, as insert_one does.
    assert isinstance(fresh["_id"], ObjectId)
    assert _stored(mongo_collection) == [
        {"_id": 1, "n": 2},
        {"_id": 3, "replaced": True},
        {"_id": 10, "n": 10},
    ]


def test_bulk_write_takes_pymongos_own_requests(items: Collection[Doc], mongo_collection: Any) -> None:
    import pymongo

    document: Doc = {"p": 1}
    result = items.bulk_write(
        [
            pymongo.InsertOne(document),
            pymongo.UpdateOne({"p": 1}, {"$set": {"q": 2}}),
            pymongo.DeleteMany({"x": 1}),
        ],
        comment="pymongo's",
    )
    assert (result.inserted_count, result.modified_count) == (1, 1)
    assert _stored(mongo_collection) == [{"_id": document["_id"], "p": 1, "q": 2}]


def _failing_in_the_middle() -> list[Any]:
    return [
        InsertOne({"_id": 1}),
        InsertOne({"_id": 2}),
        InsertOne({"_id": 1, "again": True}),  # index 2: duplicate key
        UpdateOne({"_id": 2}, {"$set": {"after": True}}),
        InsertOne({"_id": 3}),
    ]


def test_an_ordered_bulk_write_stops_at_the_failure(items: Collection[Doc], mongo_collection: Any) -> None:
    with pytest.raises(BulkWriteError) as info:
        items.bulk_write(_failing_in_the_middle())
    error = info.value
    assert error.code is grpc.StatusCode.ALREADY_EXISTS and error.reason == "DUPLICATE_KEY"
    assert error.attempts == 1 and error.failed_index == 2
    details = error.details
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(2, 11000)]
    assert "E11000" in details["writeErrors"][0]["errmsg"]
    assert (details["nInserted"], details["nMatched"], details["nModified"], details["nRemoved"]) == (
        2,
        0,
        0,
        0,
    )
    assert details["nUpserted"] == 0 and details["upserted"] == [] and details["writeConcernErrors"] == []
    assert _stored(mongo_collection) == [{"_id": 1}, {"_id": 2}]


def test_an_unordered_bulk_write_carries_on_past_the_failure(
    items: Collection[Doc], mongo_collection: Any
) -> None:
    with pytest.raises(BulkWriteError) as info:
        items.bulk_write(_failing_in_the_middle(), ordered=False)
    details = info.value.details
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(2, 11000)]
    assert (details["nInserted"], details["nMatched"], details["nModified"]) == (3, 1, 1)
    assert info.value.failed_index == 2
    assert _stored(mongo_collection) == [{"_id": 1}, {"_id": 2, "after": True}, {"_id": 3}]


def test_a_bulk_write_failure_reports_the_upserts_that_landed(
    items: Collection[Doc], mongo_collection: Any
) -> None:
    items.insert_one({"_id": "taken"})
    with pytest.raises(BulkWriteError) as info:
        items.bulk_write(
            [
                UpdateOne({"_id": "up"}, {"$set": {"v": 1}}, upsert=True),
                UpdateOne({"_id": "taken"}, {"$set": {"v": 2}}),
                InsertOne({"_id": "taken"}),  # index 2: duplicate key
                DeleteOne({"_id": "up"}),
            ]
        )
    details = info.value.details
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(2, 11000)]
    assert details["nUpserted"] == 1 and details["upserted"] == [{"index": 0, "_id": "up"}]
    assert (details["nMatched"], details["nModified"], details["nRemoved"]) == (1, 1, 0)
    assert _stored(mongo_collection) == [{"_id": "taken", "v": 2}, {"_id": "up", "v": 1}]


def test_bad_bulk_writes_are_refused_before_sending(items: Collection[Doc]) -> None:
    with pytest.raises(InvalidOperation, match="No operations to execute"):
        items.bulk_write([])
    with pytest.raises(TypeError, match="is not a valid request"):
        items.bulk_write([{"insertOne": {"document": {}}}])
    with pytest.raises(ValueError, match=r"update only works with \$ operators"):
        items.bulk_write([UpdateOne({}, {"a": 1})])


# --- read preference, read concern, collection options ---------------------------------


def test_read_preference_and_read_concern_the_pymongo_way(
    filled: Collection[Doc], client: BrokerClient[Doc], broker: Any
) -> None:
    database = client[broker.db_name]
    reads = database.get_collection(
        filled.name, read_preference=ReadPreference.SECONDARY_PREFERRED, read_concern=ReadConcern("majority")
    )
    assert reads.read_preference is ReadPreference.SECONDARY_PREFERRED
    assert reads.count_documents({}) == 10
    assert len(reads.find({"a": 1}).to_list()) == 3
    assert reads.find_one({"_id": 2}) is not None
    assert sorted(reads.distinct("a")) == [0, 1, 2]
    assert len(reads.aggregate([{"$match": {"a": 2}}]).to_list()) == 3
    local = filled.with_options(read_concern=ReadConcern("local"))
    assert local.read_concern == ReadConcern("local") and local.estimated_document_count() == 10
    assert local == filled
    with pytest.raises(TypeError, match="read_preference must be one of pymongo's"):
        filled.with_options(read_preference="secondary")


def test_a_collections_write_concern_is_the_default_of_its_writes(
    items: Collection[Doc], mongo_collection: Any
) -> None:
    unacknowledged = items.with_options(write_concern=WriteConcern(w=0))
    # The broker refuses w=0 (it could confirm nothing): the collection's
    # concern was sent with the write.
    with pytest.raises(OperationFailure):
        unacknowledged.update_one({"_id": 1}, {"$set": {"a": 1}}, upsert=True)
    acknowledged = unacknowledged.update_one(
        {"_id": 1}, {"$set": {"a": 1}}, upsert=True, write_concern={"w": 1}
    )
    assert acknowledged.upserted_id == 1 and _stored(mongo_collection) == [{"_id": 1, "a": 1}]


# --- refusals ----------------------------------------------------------------------------------


def test_an_unknown_database_is_refused_for_every_operation(client: BrokerClient[Doc]) -> None:
    nowhere = client["no_such_database"]["items"]
    for call in (
        lambda: nowhere.update_one({}, {"$set": {"a": 1}}),
        lambda: nowhere.delete_many({}),
        lambda: nowhere.find_one_and_delete({}),
        lambda: nowhere.count_documents({}),
        lambda: nowhere.distinct("a"),
        lambda: nowhere.aggregate([{"$match": {}}]),
        lambda: nowhere.bulk_write([InsertOne({"a": 1})]),
    ):
        with pytest.raises(UnknownDatabase):
            call()


_READ_ONLY_TOKEN = "reports-token-0123456789abcdef"


@pytest.mark.parametrize("read_only", ["database", "token"])
def test_a_read_only_database_or_token_refuses_every_write_and_answers_reads(
    start_broker: Any, db_server: Any, collection_name: str, mongo_collection: Any, read_only: str
) -> None:
    config = start_broker.base_config()
    if read_only == "database":
        config["databases"]["archive"] = {"uri": db_server.uri, "database": "broker_test", "read_only": True}
        database, token = "archive", None
    else:
        config["auth"] = {"tokens": [{"name": "reports", "token": _READ_ONLY_TOKEN, "read_only": True}]}
        database, token = "appdb", _READ_ONLY_TOKEN
    proc = start_broker(config)
    mongo_collection.insert_one({"_id": 1, "a": 1})
    with BrokerClient(proc.unix_target, token=token) as client:
        archive = client[database][collection_name]
        for call in (
            lambda: archive.update_one({"_id": 1}, {"$set": {"a": 2}}),
            lambda: archive.replace_one({"_id": 1}, {"a": 2}),
            lambda: archive.delete_many({}),
            lambda: archive.find_one_and_update({"_id": 1}, {"$set": {"a": 2}}),
            lambda: archive.find_one_and_delete({"_id": 1}),
            lambda: archive.bulk_write([UpdateOne({"_id": 1}, {"$set": {"a": 2}})]),
            lambda: archive.aggregate([{"$match": {}}, {"$out": "copy"}]),
        ):
            with pytest.raises(PermissionDenied) as info:
                call()
            assert info.value.reason == "NOT_AUTHORIZED" and info.value.attempts == 1
        assert archive.count_documents({}) == 1
        assert archive.distinct("a") == [1]
        assert archive.aggregate([{"$match": {}}]).to_list() == [{"_id": 1, "a": 1}]
    assert _stored(mongo_collection) == [{"_id": 1, "a": 1}]


# --- the retry rules and the error mapping, against a fake broker ------------------------------


def _unavailable() -> RpcError:
    return RpcError(grpc.StatusCode.UNAVAILABLE, "connection lost", "DATABASE_UNAVAILABLE")


class _FakeBroker(broker_pb2_grpc.BrokerServicer):
    """Answers each call as the test sets it up, and records what it was sent."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = {}
        self.failures: dict[str, list[RpcError]] = {}
        self.lock = threading.Lock()

    def fail(self, method: str, *errors: RpcError) -> None:
        self.failures.setdefault(method, []).extend(errors)

    def _record(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.setdefault(method, []).append(request)
            pending = self.failures.get(method)
            error = pending.pop(0) if pending else None
        if error is not None:
            context.abort_with_status(error.to_status())

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("Update", request, context)
        return pb.UpdateResponse(matched_count=1, modified_count=1)

    def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("Delete", request, context)
        return pb.DeleteResponse(deleted_count=1)

    def FindOneAndModify(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("FindOneAndModify", request, context)
        return pb.FindOneAndModifyResponse(document=bson.encode({"_id": 1}))

    def BulkWrite(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("BulkWrite", request, context)
        return pb.BulkWriteResponse(inserted_count=len(request.operations))

    def Count(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("Count", request, context)
        return pb.CountResponse(count=42)

    def Distinct(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        attempt = len(self.calls.get("Distinct", ()))
        yield pb.DistinctResponse(values=bson.encode({"values": [1, 2]}))
        # The first attempt fails after its first message: the restart must
        # not hand the first values over twice.
        if attempt == 0:
            self._record("Distinct", request, context)
            context.abort_with_status(_unavailable().to_status())
        self._record("Distinct", request, context)
        yield pb.DistinctResponse(values=bson.encode({"values": ["three"]}))

    def Aggregate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._record("Aggregate", request, context)
        for start in range(0, 6, 2):
            yield pb.FindResponse(documents=[bson.encode({"_id": i}) for i in range(start, start + 2)])


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[_FakeBroker, BrokerClient[Doc]]]:
    # The calls it does not serve are the base servicer's (UNIMPLEMENTED);
    # the stubs declare them abstract.
    servicer = _FakeBroker()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)
    target = f"unix://{tmp_path}/fake.sock"
    server.add_insecure_port(target)
    server.start()
    try:
        with BrokerClient(target, timeout=10) as client:
            yield servicer, client
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("Update", lambda c: c.update_one({"_id": 1}, {"$set": {"a": 1}})),
        ("Update", lambda c: c.replace_one({"_id": 1}, {"a": 1})),
        ("Delete", lambda c: c.delete_many({})),
        ("FindOneAndModify", lambda c: c.find_one_and_update({}, {"$inc": {"n": 1}})),
        ("BulkWrite", lambda c: c.bulk_write([UpdateOne({}, {"$inc": {"n": 1}})])),
    ],
)
def test_writes_that_are_not_idempotent_are_sent_once(
    fake: tuple[_FakeBroker, BrokerClient[Doc]], method: str, call: Any
) -> None:
    servicer, client = fake
    servicer.fail(method, _unavailable(), _unavailable())
    with pytest.raises(ServerSelectionTimeoutError) as info:
        call(client["appdb"]["items"])
    assert info.value.attempts == 1 and len(servicer.calls[method]) == 1
    # The same call, answered, succeeds: the failure above was not retried.
    servicer.failures.clear()
    call(client["appdb"]["items"])
    assert len(servicer.calls[method]) == 2


def test_reads_are_retried(fake: tuple[_FakeBroker, BrokerClient[Doc]]) -> None:
    servicer, client = fake
    items = client["appdb"]["items"]
    servicer.fail("Count", _unavailable())
    assert items.count_documents({"a": 1}) == 42 and len(servicer.calls["Count"]) == 2
    servicer.fail("Count", _unavailable())
    assert items.estimated_document_count() == 42 and servicer.calls["Count"][-1].estimated
    # A distinct stream that fails part-way is read again from the start.
    assert items.distinct("a") == [1, 2, "three"] and len(servicer.calls["Distinct"]) == 2
    servicer.fail("Aggregate", _unavailable())
    cursor = items.aggregate([{"$match": {}}], batchSize=2)
    assert cursor.attempts == 2 and [d["_id"] for d in cursor] == [0, 1, 2, 3, 4, 5]


def test_an_aggregate_that_writes_is_sent_once(fake: tuple[_FakeBroker, BrokerClient[Doc]]) -> None:
    servicer, client = fake
    servicer.fail("Aggregate", _unavailable())
    with pytest.raises(ServerSelectionTimeoutError) as info:
        client["appdb"]["items"].aggregate([{"$match": {}}, {"$merge": {"into": "copy"}}])
    assert info.value.attempts == 1 and len(servicer.calls["Aggregate"]) == 1


def test_a_write_error_from_the_broker_becomes_pymongos(fake: tuple[_FakeBroker, BrokerClient[Doc]]) -> None:
    servicer, client = fake
    servicer.fail(
        "FindOneAndModify",
        RpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "Cannot apply $inc to a value of non-numeric type",
            "QUERY_REJECTED",
            {
                "mongo_code": "14",
                "mongo_code_name": "TypeMismatch",
                "failed_index": "0",
                "write_errors": '[{"index": 0, "code": 14, "codeName": "TypeMismatch", "errmsg": "no $inc"}]',
            },
        ),
    )
    with pytest.raises(WriteError) as single:
        client["appdb"]["items"].find_one_and_update({}, {"$inc": {"s": 1}})
    assert single.value.details == {"index": 0, "code": 14, "codeName": "TypeMismatch", "errmsg": "no $inc"}
    assert single.value.code is grpc.StatusCode.INVALID_ARGUMENT and single.value.status_details

    servicer.fail(
        "BulkWrite",
        RpcError(
            grpc.StatusCode.ALREADY_EXISTS,
            "write failed at document 1",
            "DUPLICATE_KEY",
            {
                "mongo_code": "11000",
                "failed_index": "1",
                "inserted_count": "1",
                "upserted_count": "1",
                "write_errors": '[{"index": 1, "code": 11000, "codeName": "DuplicateKey", '
                '"errmsg": "E11000"}]',
                "upserted_ids": '[{"index": 0, "_id": {"$numberLong": "7"}}]',
            },
        ),
    )
    document: Doc = {"x": 1}
    with pytest.raises(BulkWriteError) as bulk:
        client["appdb"]["items"].bulk_write(
            [UpdateOne({"_id": 7}, {"$set": {"a": 1}}, upsert=True), InsertOne(document)]
        )
    assert bulk.value.details["writeErrors"] == [
        {"index": 1, "code": 11000, "codeName": "DuplicateKey", "errmsg": "E11000"}
    ]
    assert bulk.value.details["upserted"] == [{"index": 0, "_id": 7}]
    assert (bulk.value.details["nInserted"], bulk.value.details["nUpserted"]) == (1, 1)
    # The document's id was made by the client and sent with it.
    sent = servicer.calls["BulkWrite"][-1].operations[1].insert_one.document
    assert bson.decode(sent) == document and isinstance(document["_id"], ObjectId)
